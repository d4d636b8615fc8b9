"""The preprocessing certificate, checked at load: the version's fixture files, decoded by the server's
own code and run by its own runtime, must give exactly the input rows training made (SHA-256 of the
float32 row) and its probabilities within 1e-5. Otherwise the server would answer from other pixels than
the model was trained and tested on, silently; the version is refused unless drift is allowed.

Format (docs/guides/calibration.md): `fixtures/manifest.json` beside model.onnx, written by
training/fixtures.py or by anyone else's pipeline.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.core.contract import (
    FIXTURES_DIR,
    FIXTURES_FORMAT,
    FIXTURES_MANIFEST,
    ContractError,
    ModelContract,
)
from serving.core.errors import InvalidInput
from serving.core.preprocess import decode_to_input

MAX_PROBABILITY_DIFF = 1e-5


@dataclass(frozen=True)
class CertificateCheck:
    """What the check found: `drift` is empty when every fixture matched; `fixtures` were checked."""

    fixtures: int
    drift: str = ""

    @property
    def passed(self) -> bool:
        return not self.drift


def manifest_path(model_path: Path) -> Path:
    return model_path.parent / FIXTURES_DIR / FIXTURES_MANIFEST


def read_manifest(path: Path) -> list[dict]:
    """The manifest's fixtures; a malformed manifest is a ContractError naming what is wrong."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ContractError(f"cannot read {FIXTURES_DIR}/{FIXTURES_MANIFEST}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FIXTURES_FORMAT:
        raise ContractError(f"{FIXTURES_DIR}/{FIXTURES_MANIFEST}: format must be {FIXTURES_FORMAT}")
    fixtures = data.get("fixtures")
    if not isinstance(fixtures, list) or not fixtures:
        raise ContractError(f"{FIXTURES_DIR}/{FIXTURES_MANIFEST}: fixtures must be a non-empty list")
    for entry in fixtures:
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("file"), str)
            and Path(entry["file"]).name == entry["file"]  # no path out of the folder
            and isinstance(entry.get("input_sha256"), str)
            and isinstance(entry.get("probabilities"), list)
            and isinstance(entry.get("input", ""), str)
            and Path(entry.get("input", "")).name == entry.get("input", "")
        )
        if not ok:
            raise ContractError(
                f"{FIXTURES_DIR}/{FIXTURES_MANIFEST}: each fixture needs file, input_sha256 and "
                f"probabilities (and optionally input), plain file names; got {str(entry)[:120]}"
            )
    return fixtures


def pixel_units(contract: ModelContract, difference: float) -> str:
    """A largest input difference in pixel units: '3/255' for scale 1/255 without normalisation."""
    if contract.has_normalisation:
        return f"{difference:.3g} (model input units)"
    pixels = difference / contract.scale
    whole = round(pixels)
    text = str(whole) if abs(pixels - whole) < 1e-3 else f"{pixels:.3g}"
    return f"{text}/255" if abs(contract.scale - 1 / 255) < 1e-9 else text


def check_certificate(
    model_path: Path, contract: ModelContract, run: Callable[[np.ndarray], np.ndarray]
) -> CertificateCheck | None:
    """Checks the fixtures beside `model_path`; None when the version has none. `run` maps float32 input
    rows to probabilities (the served model's own path). The first fixture that differs is named."""
    path = manifest_path(model_path)
    if not path.exists():
        return None
    fixtures = read_manifest(path)
    folder = path.parent
    for entry in fixtures:
        name = entry["file"]
        try:
            data = (folder / name).read_bytes()
            row = decode_to_input(data, contract, out=np.empty(contract.image_shape, dtype=np.float32))
        except (OSError, InvalidInput) as exc:
            raise ContractError(f"fixture {name}: {exc}") from None
        digest = hashlib.sha256(np.ascontiguousarray(row, dtype="<f4").tobytes()).hexdigest()
        if digest != entry["input_sha256"]:
            return CertificateCheck(
                len(fixtures), f"fixture {name}, {input_difference(folder, entry, row, contract)}"
            )
        expected = np.asarray(entry["probabilities"], dtype=np.float64)
        got = run(row[None])[0].astype(np.float64)
        if got.shape != expected.shape:
            raise ContractError(f"fixture {name}: {len(expected)} probabilities for {len(got)} classes")
        gap = float(np.abs(got - expected).max())
        if not gap <= MAX_PROBABILITY_DIFF:
            return CertificateCheck(
                len(fixtures),
                f"fixture {name}, max |Δprobability| = {gap:.2e} (limit {MAX_PROBABILITY_DIFF:.0e})",
            )
    return CertificateCheck(len(fixtures))


def input_difference(folder: Path, entry: dict, row: np.ndarray, contract: ModelContract) -> str:
    """How far the server's row is from training's: max |Δpixel| when the manifest gives the row."""
    stored = entry.get("input")
    if stored:
        try:
            expected = np.load(folder / stored, allow_pickle=False)
        except (OSError, ValueError) as exc:
            return f"input hash differs ({stored} unreadable: {exc})"
        if expected.shape == row.shape:
            difference = float(np.abs(expected.astype(np.float64) - row).max())
            return f"max |Δpixel| = {pixel_units(contract, difference)}"
        return f"input shape {list(row.shape)} differs from training's {list(expected.shape)}"
    return "input hash differs from training's"
