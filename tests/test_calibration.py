"""Temperature scaling at export: the fit, the ECE, and the exported graphs' probabilities.

The digits run (conftest) is trained and exported by the session's fixtures; the graphs run in real
ONNX Runtime sessions and are compared with the PyTorch network's own logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from training.calibration import (
    auroc,
    choose_score,
    ece,
    energy_score,
    fit_temperature,
    keep_threshold,
    msp,
    outliers,
    reliability,
    softmax,
)
from training.export import EXPLAIN_FILE, MODEL_FILE, export_run, logits_of
from training.train import VAL_SPLIT, load_run, to_tensor


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def graph_outputs(path: Path, images: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: to_tensor(images).numpy()})


def graph_probabilities(path: Path, images: np.ndarray) -> np.ndarray:
    return graph_outputs(path, images)[0]


def test_fit_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (20_000, 10))
    true_t = 2.5
    cumulative = softmax(logits, true_t).cumsum(axis=1)
    labels = (cumulative < rng.random((len(logits), 1))).sum(axis=1)  # drawn from softmax(z / 2.5)
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)


def test_ece_and_auroc_on_hand_made_cases() -> None:
    # Two bins used: 0.95 confident and always right (gap 0.05), 0.55 confident and right half the time.
    probabilities = np.array([[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 4)
    labels = np.array([0, 0, 0, 0, 0, 1, 0, 1])
    assert ece(probabilities, labels) == pytest.approx((4 * 0.05 + 4 * 0.05) / 8)
    assert reliability(probabilities, labels).counts.sum() == 8
    assert auroc(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == 1.0
    assert auroc(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.5
    assert auroc(np.array([0.1]), np.array([0.9])) == 0.0
    scores = np.linspace(0, 1, 1001)
    assert (scores >= keep_threshold(scores)).mean() == pytest.approx(0.99, abs=0.002)


def test_export_calibrates_on_validation_and_lowers_the_test_ece(digits_run: Path, model_repo: Path) -> None:
    assert (digits_run / VAL_SPLIT).exists()  # the run keeps its validation split for export
    meta = metadata(model_repo / "digits" / "1" / MODEL_FILE)
    temperature = float(meta["convserve.temperature"])
    before, after = float(meta["convserve.ece_before"]), float(meta["convserve.ece_after"])
    print(f"digits: T = {temperature:.4f}, test ECE {before:.4f} -> {after:.4f}")
    assert temperature != 1.0
    assert after < before
    # The ECE written is the test split's, recomputed here from the network's logits.
    _, net = load_run(digits_run)
    test = np.load(digits_run / "test_split.npz")
    logits = logits_of(net, test["images"])
    assert ece(softmax(logits), test["labels"]) == pytest.approx(before, abs=1e-5)
    assert ece(softmax(logits, temperature), test["labels"]) == pytest.approx(after, abs=1e-5)
    # The fit used validation, not test: fitting on test gives another temperature.
    assert fit_temperature(logits, test["labels"]) != pytest.approx(temperature, rel=1e-3)


def test_graphs_give_softmax_of_logits_over_t_and_keep_the_argmax(digits_run: Path, model_repo: Path) -> None:
    version = model_repo / "digits" / "1"
    temperature = float(metadata(version / MODEL_FILE)["convserve.temperature"])
    _, net = load_run(digits_run)
    images = np.load(digits_run / "test_split.npz")["images"]
    logits = logits_of(net, images)
    served = graph_probabilities(version / MODEL_FILE, images)
    np.testing.assert_allclose(served, softmax(logits, temperature), atol=1e-6, rtol=0)
    assert (served.argmax(1) == logits.argmax(1)).all()
    # explain.onnx carries the same temperature: its probabilities are model.onnx's.
    explained = graph_probabilities(version / EXPLAIN_FILE, images)
    np.testing.assert_allclose(explained, served, atol=1e-6, rtol=0)
    assert metadata(version / EXPLAIN_FILE)["convserve.temperature"] == f"{temperature:.9g}"


def test_energy_output_is_t_logsumexp_of_logits_over_t(digits_run: Path, model_repo: Path) -> None:
    """The session's export chose the energy score (see the next test): its `score` output is
    T·logsumexp(z / T) of the network's logits, image by image, and the threshold keeps 99 % of the
    validation images' energy."""
    path = model_repo / "digits" / "1" / MODEL_FILE
    meta = metadata(path)
    assert meta["convserve.abstain_score"] == "energy"
    assert meta["convserve.score_output"] == "score"
    temperature = float(meta["convserve.temperature"])
    _, net = load_run(digits_run)
    images = np.load(digits_run / "test_split.npz")["images"]
    probabilities, score = graph_outputs(path, images)
    want = energy_score(logits_of(net, images), temperature)
    np.testing.assert_allclose(score, want, rtol=1e-5)
    np.testing.assert_allclose(probabilities, softmax(logits_of(net, images), temperature), atol=1e-6)
    val = np.load(digits_run / VAL_SPLIT)
    kept = energy_score(logits_of(net, val["images"]), temperature) >= float(
        meta["convserve.abstain_threshold"]
    )
    assert 0.985 <= kept.mean() <= 1.0


def test_auto_keeps_the_score_that_separates_outliers_better(digits_run: Path, model_repo: Path) -> None:
    """The choice, recomputed: AUROC of validation images against noise and inverted validation images,
    for both scores; the export wrote those figures and kept the larger."""
    meta = metadata(model_repo / "digits" / "1" / MODEL_FILE)
    temperature = float(meta["convserve.temperature"])
    _, net = load_run(digits_run)
    val = np.load(digits_run / VAL_SPLIT)["images"]
    val_logits, outlier_logits = logits_of(net, val), logits_of(net, outliers(val))
    by_msp = auroc(msp(val_logits, temperature), msp(outlier_logits, temperature))
    by_energy = auroc(energy_score(val_logits, temperature), energy_score(outlier_logits, temperature))
    print(f"digits: outlier AUROC max probability {by_msp:.4f}, energy {by_energy:.4f}")
    assert float(meta["convserve.abstain_auroc_msp"]) == pytest.approx(by_msp, abs=1e-4)
    assert float(meta["convserve.abstain_auroc_energy"]) == pytest.approx(by_energy, abs=1e-4)
    assert meta["convserve.abstain_score"] == ("energy" if by_energy > by_msp else "msp")


def test_choose_score_follows_the_auroc() -> None:
    rng = np.random.default_rng(0)
    # In-distribution: one large logit; outliers: a smaller one. The max probability is 1.0 in float64
    # for both (a tie, AUROC 0.5); the energy, about the peak itself, tells them apart.
    inside = rng.normal(0, 0.1, (500, 10))
    inside[:, 0] += rng.uniform(50, 60, 500)
    outside = rng.normal(0, 0.1, (500, 10))
    outside[:, 0] += rng.uniform(40, 48, 500)
    assert choose_score(inside, outside, 1.0).kind == "energy"
    # All logits scaled alike, the peaks equal: only the margin differs, which the max probability sees
    # and the energy (dominated by the shared peak) barely does.
    inside = np.zeros((500, 10))
    inside[:, 0] = 10.0
    inside[:, 1] = rng.uniform(0, 4, 500)
    outside = np.zeros((500, 10))
    outside[:, 0] = 10.0
    outside[:, 1] = rng.uniform(8, 10, 500)
    choice = choose_score(inside, outside, 1.0)
    assert choice.auroc_msp > choice.auroc_energy and choice.kind == "msp"
    assert choose_score(inside, outside, 1.0, "energy").kind == "energy"  # asked for: kept
    with pytest.raises(ValueError):
        choose_score(inside, None, 1.0)


def test_calibrate_off_keeps_the_plain_softmax(digits_run: Path, tmp_path: Path) -> None:
    report = export_run(digits_run, tmp_path, "digits", explain=False, calibrate_temperature=False)
    meta = metadata(report.path)
    assert meta["convserve.temperature"] == "1"
    assert meta["convserve.ece_before"] == meta["convserve.ece_after"]
    assert float(meta["convserve.abstain_threshold"]) > 0  # the abstain threshold is measured either way
    _, net = load_run(digits_run)
    images = np.load(digits_run / "test_split.npz")["images"]
    np.testing.assert_allclose(
        graph_probabilities(report.path, images), softmax(logits_of(net, images)), atol=1e-6, rtol=0
    )


def test_a_run_without_its_validation_split_needs_the_dataset(digits_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "old-run"
    shutil.copytree(digits_run, run)
    (run / VAL_SPLIT).unlink()
    with pytest.raises(FileNotFoundError, match="--dataset"):
        export_run(run, tmp_path / "models", "digits", explain=False)
    # Recomputed from the dataset with the run's seed: the very split the run kept, so the same T.
    report = export_run(run, tmp_path / "models", "digits", explain=False, dataset="digits")
    kept = metadata(model_repo_path(digits_run, tmp_path))["convserve.temperature"]
    assert metadata(report.path)["convserve.temperature"] == kept
    # Another seed gives other splits: refused rather than calibrated on images the run trained on.
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["config"]["seed"] = 1
    (run / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match="does not give this run's test split"):
        export_run(run, tmp_path / "models", "digits", explain=False, dataset="digits")


def model_repo_path(digits_run: Path, tmp_path: Path) -> Path:
    return export_run(digits_run, tmp_path / "kept", "digits", explain=False).path


def test_ood_flags_with_the_score_export_serves(digits_run: Path) -> None:
    """`convserve ood`: the AUROCs of both scores, and `flagged` under the served score's threshold,
    as export would set it (auto: energy for this run; --abstain-score msp: the top probability)."""
    from training.calibration import keep_threshold
    from training.ood import measure, ood_sets

    auto = {f.ood_set: f for f in measure(digits_run, {})}
    by_msp = {f.ood_set: f for f in measure(digits_run, {}, abstain_score="msp")}
    assert {f.served for f in auto.values()} == {"energy"} and {f.served for f in by_msp.values()} == {"msp"}
    _, net = load_run(digits_run)
    val, test = np.load(digits_run / VAL_SPLIT), np.load(digits_run / "test_split.npz")
    t = fit_temperature(logits_of(net, val["images"]), val["labels"])
    noise = ood_sets(test["images"], "L", {})["uniform noise"]
    for kind, figures, score in (("msp", by_msp, msp), ("energy", auto, energy_score)):
        threshold = np.float32(keep_threshold(score(logits_of(net, val["images"]), t)))
        flagged = (score(logits_of(net, noise), t).astype(np.float32) < threshold).mean()
        assert figures["uniform noise"].flagged == pytest.approx(flagged), kind
        assert figures["uniform noise"].auroc_msp == auto["uniform noise"].auroc_msp
