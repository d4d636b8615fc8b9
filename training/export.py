"""ONNX export into the model repository, with the model contract and an enforced verification.

`MODELS/<name>/<version>/model.onnx`: dynamic batch axis, normalisation and softmax inside the graph,
`metadata_props` carrying the contract (labels, colour mode, size, scale, output kind, precision). The
export is refused (and its folder removed) unless the checker passes and ONNX Runtime matches PyTorch.
For fp16 and int8 the float32 graph is verified first, then the smaller one against it on the test
split: top-1 agreement and the accuracy lost, both bounded (REDUCED_LIMITS).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
import torch

from serving.core.contract import Fit, ModelContract
from training.calibration import Calibration, calibrate, keep_threshold, outliers
from training.fixtures import write_fixtures
from training.model import ConvNet, EnergyScoredModel, ProbabilitiesModel
from training.quantize import PRECISIONS, Precision, convert
from training.train import CALIBRATION, METRICS, TEST_SPLIT, VAL_SPLIT, load_run, to_tensor

if TYPE_CHECKING:  # training.explain_graph imports this module
    from training.explain_graph import ExplainCheck

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
EXPLAIN_FILE = "explain.onnx"  # probabilities, Grad-CAM of every class, block maps: training/explain_graph.py
SCORE_OUTPUT = "score"  # model.onnx's second output when the abstain score is the energy score
PARITY_BATCH_SIZES = (1, 7, 64)
MAX_ABS_DIFF = 1e-5
OPSET = 18
# precision: (least top-1 agreement with float32, most accuracy lost in percentage points)
REDUCED_LIMITS: dict[str, tuple[float, float]] = {"fp16": (0.995, 0.2), "int8": (0.98, 1.0)}


class VerificationError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


@dataclass(frozen=True)
class ParityCheck:
    batch_size: int
    max_abs_diff: float
    top1_identical: bool
    score_rel_diff: float = 0.0  # the score output's largest |diff| / max(1, |score|), where there is one


@dataclass(frozen=True)
class ReducedPrecisionCheck:
    """A fp16 / int8 graph against the verified float32 graph, on the whole test split."""

    precision: str
    images: int
    agreement: float  # fraction of images with the same top-1 class
    accuracy: float
    float_accuracy: float
    max_abs_diff: float  # largest difference of any probability
    batch_sizes: tuple[int, ...]  # batch sizes the smaller graph ran at

    @property
    def min_agreement(self) -> float:
        return REDUCED_LIMITS[self.precision][0]

    @property
    def max_drop_pp(self) -> float:
        return REDUCED_LIMITS[self.precision][1]

    @property
    def accuracy_drop_pp(self) -> float:
        """Positive: accuracy lost against float32, in percentage points."""
        return (self.float_accuracy - self.accuracy) * 100


@dataclass(frozen=True)
class ExportReport:
    path: Path
    version: int
    parity: list[ParityCheck]
    torch_test_accuracy: float
    onnx_test_accuracy: float
    precision: str = "fp32"
    reduced: ReducedPrecisionCheck | None = None
    explain: ExplainCheck | None = None  # None: exported with explain=False
    calibration: Calibration | None = None
    fixtures: tuple[str, ...] = ()  # the preprocessing certificate's files (fixtures/)


def next_version(model_dir: Path) -> int:
    versions = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Writes the graph with a dynamic batch axis named `batch`; an EnergyScoredModel's energy is a
    second output, `score`."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    scored = isinstance(model, EnergyScoredModel)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=["image"],
        output_names=["probabilities", SCORE_OUTPUT] if scored else ["probabilities"],
        dynamic_shapes={"x": {0: batch}},
        opset_version=OPSET,
        external_data=False,
    )
    assert program is not None  # dynamo=True always returns the ONNXProgram
    program.save(str(path), external_data=False)


def write_metadata(path: Path, metadata: dict[str, str]) -> None:
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in sorted(metadata.items()):
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def verify(
    path: Path, model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, version: int
) -> tuple[ExportReport, np.ndarray]:
    """Checker, then ONNX Runtime vs PyTorch at several batch sizes, then test accuracy on both.
    Also returns the ONNX graph's probabilities for the test images (a smaller precision's reference)."""
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run_all(batch: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Every output (probabilities, then the score where there is one) of PyTorch and ONNX Runtime."""
        x = to_tensor(batch)
        with torch.no_grad():
            expected = model(x)
        outputs = expected if isinstance(expected, tuple) else (expected,)
        return [o.numpy() for o in outputs], session.run(None, {input_name: x.numpy()})

    parity = []
    for size in PARITY_BATCH_SIZES:
        batch = np.resize(images, (size, *images.shape[1:]))  # repeats test images when there are fewer
        (expected, *expected_score), (got, *got_score) = run_all(batch)
        score_diff = 0.0
        if expected_score:  # the energy is some tens: its float32 rounding is relative
            want = expected_score[0]
            have = got_score[0].reshape(want.shape)
            score_diff = float((np.abs(want - have) / np.maximum(1.0, np.abs(want))).max())
        parity.append(
            ParityCheck(
                size,
                float(np.abs(expected - got).max()),
                bool((expected.argmax(1) == got.argmax(1)).all()),
                score_diff,
            )
        )
    torch_correct = onnx_correct = 0
    probabilities = []
    for start in range(0, len(images), 256):
        (expected, *_), (got, *_) = run_all(images[start : start + 256])
        truth = labels[start : start + 256]
        torch_correct += int((expected.argmax(1) == truth).sum())
        onnx_correct += int((got.argmax(1) == truth).sum())
        probabilities.append(got)
    report = ExportReport(path, version, parity, torch_correct / len(labels), onnx_correct / len(labels))
    return report, np.concatenate(probabilities)


def check_report(report: ExportReport) -> None:
    failures = [
        f"batch {p.batch_size}: max |diff| {p.max_abs_diff:.2e} (limit {MAX_ABS_DIFF:.0e}), top-1 identical "
        f"{p.top1_identical}, score relative diff {p.score_rel_diff:.2e}"
        for p in report.parity
        if p.max_abs_diff > MAX_ABS_DIFF or not p.top1_identical or p.score_rel_diff > MAX_ABS_DIFF
    ]
    if report.onnx_test_accuracy != report.torch_test_accuracy:
        failures.append(
            f"test accuracy {report.onnx_test_accuracy} (ONNX) != {report.torch_test_accuracy} (PyTorch)"
        )
    if failures:
        raise VerificationError("ONNX export does not match PyTorch: " + "; ".join(failures))


def run_session(
    session: ort.InferenceSession, images: np.ndarray, batch_size: int = 256, output: int = 0
) -> np.ndarray:
    """One output (the probabilities by default) as float32 for uint8 images, scaled as the server
    scales them and fed in the graph's own input type (float16 or float)."""
    spec = session.get_inputs()[0]
    dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
    outputs = []
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start : start + batch_size]).numpy().astype(dtype)
        outputs.append(session.run(None, {spec.name: x})[output].astype(np.float32))
    return np.concatenate(outputs)


def served_threshold(path: Path, images: np.ndarray) -> tuple[float, float]:
    """The abstain threshold keeping KEEP of `images` under the scores this very graph serves (its
    `score` output, else its top probability), and the share it keeps. A fp16 or int8 graph's scores
    drift from float32's (int8's energy by up to 0.11 on the digits validation images), so its threshold
    is set on its own."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scored = len(session.get_outputs()) > 1
    scores = (
        run_session(session, images, output=1).reshape(-1) if scored else run_session(session, images).max(1)
    )
    threshold = keep_threshold(scores)
    return threshold, float((scores >= np.float32(threshold)).mean())


def verify_reduced(
    reference: np.ndarray, path: Path, precision: str, images: np.ndarray, labels: np.ndarray
) -> ReducedPrecisionCheck:
    """The smaller graph against the float32 graph's probabilities (`reference`) on the same images."""
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = run_session(session, images)
    for size in PARITY_BATCH_SIZES:  # the batch axis stays dynamic after conversion
        batch = np.resize(images, (size, *images.shape[1:]))
        if run_session(session, batch, batch_size=size).shape != (size, reference.shape[1]):
            raise VerificationError(f"{precision} graph gives a wrong output shape at batch {size}")
    return ReducedPrecisionCheck(
        precision,
        len(labels),
        float((got.argmax(1) == reference.argmax(1)).mean()),
        float((got.argmax(1) == labels).mean()),
        float((reference.argmax(1) == labels).mean()),
        float(np.abs(got - reference).max()),
        PARITY_BATCH_SIZES,
    )


def check_reduced(check: ReducedPrecisionCheck) -> None:
    failures = []
    if check.agreement < check.min_agreement:
        failures.append(f"top-1 agreement {check.agreement:.4f} < {check.min_agreement}")
    if check.accuracy_drop_pp > check.max_drop_pp:
        failures.append(
            f"accuracy {check.accuracy:.4f} vs {check.float_accuracy:.4f} float32: "
            f"{check.accuracy_drop_pp:.2f} points lost (limit {check.max_drop_pp})"
        )
    if failures:
        raise VerificationError(
            f"{check.precision} export is not close enough to float32: " + "; ".join(failures)
        )


def export_run(
    run_dir: Path,
    repository: Path,
    name: str,
    version: int | None = None,
    precision: Precision = "fp32",
    explain: bool = True,
    calibrate_temperature: bool = True,
    dataset: str | None = None,
    abstain_score: str = "auto",
) -> ExportReport:
    """Exports a finished run into `repository/name/version/model.onnx` and verifies it; with `explain`,
    also `explain.onnx` beside it (training/explain_graph.py), verified too before the version appears.
    With `calibrate_temperature`, the softmax divides by a temperature fitted on the validation split
    (training/calibration.py); either way the abstain threshold and ECE are measured and written, and
    `fixtures/` (the preprocessing certificate, training/fixtures.py) is written beside the model.
    `dataset`: the run's dataset spec, to recompute the validation split of runs that did not keep it.
    `abstain_score`: auto (the better separating of msp and energy, training/calibration.py), msp or
    energy; with energy the graph has a second output, `score`, which the contract names."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    info, net = load_run(run_dir)
    version = version if version is not None else next_version(repository / name)
    target_dir = repository / name / str(version)
    if target_dir.exists():
        raise FileExistsError(f"{target_dir} already exists: choose another --version or none for the next")
    test = np.load(run_dir / TEST_SPLIT)
    images, labels = test["images"], test["labels"]
    val_images, val_labels = validation_split(run_dir, dataset, labels)
    fitted = fit_calibration(
        net, val_images, val_labels, images, labels, calibrate_temperature, abstain_score
    )
    energy = fitted.score.kind == "energy"
    graph = EnergyScoredModel if energy else ProbabilitiesModel
    model: torch.nn.Module = graph(net, fitted.temperature).eval()
    contract = ModelContract(
        labels=tuple(info.class_names),
        fit=Fit(info.color_mode, info.height, info.width),  # type: ignore[arg-type]
        layout="NCHW",
        scale=1.0 / 255.0,
        output_kind="probabilities",
        abstain_threshold=fitted.threshold,
        score_output=SCORE_OUTPUT if energy else None,
        extra={"dataset": info.dataset, "precision": precision, **fitted.metadata()},
    )
    # Written under a hidden name and renamed into place once verified, so a server polling the
    # repository never loads a half-written or unverified export (docs/guides/model-lifecycle.md).
    staging = repository / name / f".tmp-{version}-{os.getpid()}"
    staging.mkdir(parents=True)
    path = staging / MODEL_FILE
    try:
        with tempfile.TemporaryDirectory() as tmp:
            float_path = path if precision == "fp32" else Path(tmp) / MODEL_FILE
            export_onnx(model, to_tensor(images[:2]), float_path)
            write_metadata(float_path, contract.to_metadata())
            report, float_probabilities = verify(float_path, model, images, labels, version)
            check_report(report)
            if precision != "fp32":
                convert(float_path, path, precision, calibration_images(run_dir, precision))
                threshold, kept = served_threshold(path, val_images)
                contract = replace(contract, abstain_threshold=threshold)
                fitted = replace(fitted, threshold=threshold, kept=kept)
                write_metadata(path, contract.to_metadata())
                reduced = verify_reduced(float_probabilities, path, precision, images, labels)
                check_reduced(reduced)
                report = replace(report, precision=precision, reduced=reduced)
        if explain:
            from training.explain_graph import export_explain, verify_explain

            # Always float32, from the float network, whatever `precision` made of model.onnx: explanations
            # are for looking at, not the hot path, and only float32 is verified exact against autograd.
            # Its contract is model.onnx's, but for `convserve.precision`, which says what this file is.
            explain_contract = replace(contract, extra={**contract.extra, "precision": "fp32"})
            export_explain(
                net,
                to_tensor(images[:2]),
                staging / EXPLAIN_FILE,
                explain_contract.to_metadata(),
                fitted.temperature,
            )
            check = verify_explain(staging / EXPLAIN_FILE, net, images, fitted.temperature)
            report = replace(report, explain=check)
        fixtures = write_fixtures(staging, path, images, info.color_mode, info.height, info.width)
        report = replace(report, calibration=fitted, fixtures=tuple(fixtures))
        os.rename(staging, target_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return replace(report, path=target_dir / MODEL_FILE)


def fit_calibration(
    net: ConvNet,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    fit: bool = True,
    abstain_score: str = "auto",
) -> Calibration:
    """What export calibrates and abstains with, as the run report and `ood` measure it too: T on
    validation, ECE on test, the abstain score chosen against outliers made from validation images."""
    return calibrate(
        logits_of(net, val_images),
        val_labels,
        logits_of(net, test_images),
        test_labels,
        fit=fit,
        outlier_logits=logits_of(net, outliers(val_images)),
        score=abstain_score,
    )


def logits_of(net: ConvNet, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """The network's logits in float32 (eval mode), what calibration and the abstain score start from."""
    net.eval()
    with torch.no_grad():
        return np.concatenate(
            [net(to_tensor(images[i : i + batch_size])).numpy() for i in range(0, len(images), batch_size)]
        )


def validation_split(
    run_dir: Path, dataset: str | None, test_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The run's validation images and labels: kept in the run folder by runs since calibration came,
    else recomputed from `dataset` with the run's seed (the splits are seeded), checked against the
    kept test labels so another dataset cannot slip in. Never the test split: that one measures."""
    kept = run_dir / VAL_SPLIT
    if kept.exists():
        val = np.load(kept)
        return val["images"], val["labels"]
    if dataset is None:
        raise FileNotFoundError(
            f"{kept} is missing (the run predates calibration): pass --dataset SPEC, the run's dataset, to "
            "recompute its validation split, or --calibrate off"
        )
    from training.datasets import load_dataset

    info, _ = load_run(run_dir)
    config = json.loads((run_dir / METRICS).read_text())["config"]
    data = load_dataset(dataset, seed=config["seed"], size=info.height, color_mode=info.color_mode)  # type: ignore[arg-type]
    if not np.array_equal(data.test.labels, test_labels):
        raise ValueError(
            f"--dataset {dataset} with seed {config['seed']} does not give this run's test split"
        )
    return data.val.images, data.val.labels


def calibration_images(run_dir: Path, precision: str) -> np.ndarray:
    if precision != "int8":
        return np.zeros((0,), dtype=np.uint8)
    path = run_dir / CALIBRATION
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: int8 export needs the training images a run keeps there")
    return np.load(path)["images"]
