"""The model contract: metadata round trip, sidecar files, and image fitting."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from serving.core.batch_settings import BatchingConfig
from serving.core.contract import (
    ContractError,
    Fit,
    ModelContract,
    fit_image,
    from_metadata,
    from_sidecar,
    has_contract,
)
from serving.core.model import load_model
from serving.core.postprocess import abstain
from serving.core.runtime import ModelLoadError, RuntimeOptions


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


def test_a_threshold_off_the_probability_scale_needs_a_score_output() -> None:
    fit = Fit("L", 8, 8)
    with pytest.raises(ContractError, match="score_output"):
        ModelContract(labels=("a", "b"), fit=fit, abstain_threshold=4.2)
    contract = ModelContract(labels=("a", "b"), fit=fit, abstain_threshold=4.2, score_output="score")
    assert from_metadata(contract.to_metadata()) == contract
    with pytest.raises(ContractError, match="finite"):
        ModelContract(labels=("a", "b"), fit=fit, abstain_threshold=float("inf"), score_output="score")


def without_metadata(source: Path, target: Path, sidecar: dict) -> Path:
    """`source` copied as a model exported elsewhere: no convserve metadata, a model.json beside it."""
    proto = onnx.load(str(source))
    del proto.metadata_props[:]
    target.mkdir(parents=True)
    onnx.save(proto, str(target / "model.onnx"))
    (target / "model.json").write_text(json.dumps(sidecar))
    return target / "model.onnx"


def test_a_sidecar_names_the_score_output_the_server_abstains_on(
    model_repo: Path, digit_samples: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """The session's export has a `score` output (the energy score); served through a model.json
    that names it, the answers' scores are that output and the flags compare it with the threshold."""
    images, _ = digit_samples
    sidecar = {"color_mode": "L", "height": 8, "width": 8, "abstain_threshold": 4.0, "score_output": "score"}
    path = without_metadata(model_repo / "digits" / "1" / "model.onnx", tmp_path / "m" / "1", sidecar)
    options = RuntimeOptions(device="cpu", intra_op_threads=1)
    model = load_model("m", 1, path, options, BatchingConfig())
    try:
        noise = np.random.default_rng(0).integers(0, 256, size=(50, 1, 8, 8))
        rows = (np.concatenate([images[:50], noise]).astype(np.float32) / 255.0).astype(model.input_dtype)
        probabilities, scores = model.answers(model.predict(rows))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        want_probabilities, want_scores = session.run(None, {"image": rows})
        np.testing.assert_array_equal(probabilities, want_probabilities)
        np.testing.assert_array_equal(scores, want_scores)
        served, flags = abstain(probabilities, model.contract.abstain_threshold, scores)
        np.testing.assert_array_equal(served, want_scores)
        assert (flags == (want_scores < np.float32(4.0))).all()
        assert flags[50:].sum() > flags[:50].sum()  # noise is flagged, digits mostly not
    finally:
        asyncio.run(model.close())
    wrong = without_metadata(path, tmp_path / "w" / "1", {**sidecar, "score_output": "energy"})
    with pytest.raises(ModelLoadError, match="score_output: no output named 'energy'"):
        load_model("w", 1, wrong, options, BatchingConfig())


def test_a_score_output_must_be_another_output_holding_one_number_per_image(tmp_path: Path) -> None:
    """A graph whose outputs are the classes (first) and a per-image map: naming either as the score
    output is refused with the reason, at load."""
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])
    classes = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 64])
    maps = helper.make_tensor_value_info("maps", TensorProto.FLOAT, ["batch", 1, 8, 8])
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"]),
            helper.make_node("Softmax", ["flat"], ["probabilities"], axis=1),
            helper.make_node("Identity", ["image"], ["maps"]),
        ],
        "two-outputs",
        [image],
        [classes, maps],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = RuntimeOptions(device="cpu", intra_op_threads=1)
    for score_output, reason in (("probabilities", "classes are read from"), ("maps", "one score per image")):
        version = tmp_path / score_output / "1"
        version.mkdir(parents=True)
        onnx.save(model, str(version / "model.onnx"))
        sidecar = {"color_mode": "L", "height": 8, "width": 8, "score_output": score_output}
        (version / "model.json").write_text(json.dumps(sidecar))
        with pytest.raises(ModelLoadError, match=reason):
            load_model(score_output, 1, version / "model.onnx", options, BatchingConfig())
