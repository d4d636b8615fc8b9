"""The model contract: metadata round trip, sidecar files, and image fitting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.core.contract import (
    ContractError,
    Fit,
    ModelContract,
    fit_image,
    from_metadata,
    from_sidecar,
    has_contract,
)


def test_metadata_round_trip() -> None:
    contract = ModelContract(
        labels=("a", "b c", "ü"),
        fit=Fit("RGB", 24, 32),
        layout="NHWC",
        scale=1 / 255,
        mean=(0.1, 0.2, 0.3),
        std=(1.0, 2.0, 3.0),
        output_kind="logits",
    )
    metadata = contract.to_metadata()
    assert all(isinstance(v, str) for v in metadata.values())
    assert has_contract(metadata)
    assert from_metadata(metadata) == contract
    assert from_metadata(metadata).image_shape == (24, 32, 3)


def test_metadata_without_contract_is_detected() -> None:
    assert not has_contract({"producer": "someone"})
    with pytest.raises(ContractError):
        from_metadata({"convserve.color_mode": "L"})


def test_sidecar_defaults_labels_to_indices(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    path.write_text(
        json.dumps({"color_mode": "L", "height": 8, "width": 8, "layout": "NHWC", "output_kind": "logits"})
    )
    contract = from_sidecar(path, num_classes=3)
    assert contract.labels == ("0", "1", "2")
    assert contract.image_shape == (8, 8, 1)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"color_mode": "CMYK", "height": 8, "width": 8}, "color_mode"),
        ({"color_mode": "L", "height": 8}, "missing"),
        ({"color_mode": "L", "height": 8, "width": 8, "colour": "L"}, "unknown keys"),
        ({"color_mode": "RGB", "height": 8, "width": 8, "mean": [1, 2]}, "mean needs"),
    ],
)
def test_bad_sidecars_are_named(tmp_path: Path, data: dict, message: str) -> None:
    path = tmp_path / "model.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ContractError, match=message):
        from_sidecar(path, 2)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "CMYK", "I;16", "I"])
def test_fit_image_handles_every_mode(mode: str) -> None:
    source = Image.fromarray(np.full((20, 30, 3), 200, dtype=np.uint8), "RGB")
    image = source.convert("L").convert(mode) if mode in ("I;16", "I") else source.convert(mode)
    if mode == "I;16":
        image = Image.fromarray(np.full((20, 30), 200 * 257, dtype=np.uint16))
    fitted = fit_image(image, "L", 8, 6)
    assert fitted.mode == "L" and fitted.size == (6, 8)
    assert abs(int(np.asarray(fitted).mean()) - 200) <= 2
