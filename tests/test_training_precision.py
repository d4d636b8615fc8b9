"""fp16 and int8 exports: what the graphs hold, their verification against float32, and a real server
serving them as they are."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from protos.inference import grpc_service_pb2_grpc as kserve_grpc
from serving.client import ClassifierClient
from serving.core.contract import from_metadata
from serving.tools.loadgen import kserve_requests_of
from tests.conftest import encode
from training.export import ExportReport, ReducedPrecisionCheck, VerificationError, check_reduced, export_run
from training.train import to_tensor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converged_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits run `convserve train --dataset digits` makes (40 epochs; the same split as the
    session's 12-epoch `digits_run`, whose test images the tests use). int8 costs a model that has
    not converged more: on one CPU, whose float32 kernels round differently, the 12-epoch model lost
    1.39 points under int8 (the export refuses more than 1.0); the 40-epoch run lost 0.28 there."""
    from training.datasets import load_digits
    from training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("converged")
    train(load_digits(seed=0), TrainConfig(epochs=40, seed=0), out)
    return out


@pytest.fixture(scope="module")
def reduced(converged_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExportReport]:
    repo = tmp_path_factory.mktemp("reduced")
    return {
        "fp32": export_run(converged_run, repo, "digits", 1),
        "fp16": export_run(converged_run, repo, "digits", 2, precision="fp16"),
        "int8": export_run(converged_run, repo, "digits", 3, precision="int8"),
    }


def probabilities(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
    return session.run(None, {spec.name: to_tensor(images).numpy().astype(dtype)})[0].astype(np.float32)


def initializer_types(model: onnx.ModelProto) -> Counter:
    return Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer)


def test_int8_graph_is_quantized_and_close_to_float32(reduced, digit_samples) -> None:
    report = reduced["int8"]
    model = onnx.load(str(report.path))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert ops["Softmax"] == 1  # probabilities stay float
    weights = {t.name: t for t in model.graph.initializer}
    conv_weights = [
        weights[n.input[0]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in weights
    ]
    assert any(t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4 for t in conv_weights)
    # What stays float is small (scales, normalisation); the smallest weight tensor has 288 values.
    floats = [int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert max(floats) <= 128
    assert report.path.stat().st_size < 0.5 * reduced["fp32"].path.stat().st_size
    metadata = {p.key: p.value for p in model.metadata_props}
    assert from_metadata(metadata).extra["precision"] == "int8"

    images, labels = digit_samples
    float_p, int8_p = probabilities(reduced["fp32"].path, images), probabilities(report.path, images)
    agreement = (float_p.argmax(1) == int8_p.argmax(1)).mean()
    accuracy, float_accuracy = (int8_p.argmax(1) == labels).mean(), (float_p.argmax(1) == labels).mean()
    check = report.reduced
    assert check is not None and check.images == len(labels)
    assert (check.agreement, check.accuracy, check.float_accuracy) == pytest.approx(
        (agreement, accuracy, float_accuracy)
    )
    assert float_accuracy - accuracy <= 0.01  # the bound: within 1.0 percentage point
    assert 0 < np.abs(int8_p - float_p).max() == pytest.approx(check.max_abs_diff)  # not the float graph


def test_fp16_graph_is_float16_throughout(reduced, digit_samples) -> None:
    report = reduced["fp16"]
    model = onnx.load(str(report.path))
    assert initializer_types(model)["FLOAT"] == 0 and initializer_types(model)["FLOAT16"] > 0
    fp16 = onnx.TensorProto.FLOAT16
    assert model.graph.input[0].type.tensor_type.elem_type == fp16
    assert model.graph.output[0].type.tensor_type.elem_type == fp16
    assert {p.key: p.value for p in model.metadata_props}["convserve.precision"] == "fp16"
    images, _ = digit_samples
    got = probabilities(report.path, images)
    assert (got.argmax(1) == probabilities(reduced["fp32"].path, images).argmax(1)).mean() >= 0.995
    assert report.reduced is not None and report.reduced.accuracy_drop_pp <= 0.2
    assert {p.key: p.value for p in onnx.load(str(reduced["fp32"].path)).metadata_props}[
        "convserve.precision"
    ] == "fp32"


def test_a_reduced_model_too_far_from_float32_is_refused() -> None:
    far = ReducedPrecisionCheck("int8", 1000, 0.96, 0.90, 0.915, 0.4, (1, 7, 64))
    with pytest.raises(VerificationError, match=r"agreement 0.9600 < 0.98; .*1.50 points lost \(limit 1.0\)"):
        check_reduced(far)
    check_reduced(
        ReducedPrecisionCheck("int8", 1000, 0.99, 0.906, 0.915, 0.1, (1, 7, 64))
    )  # 0.9 points: fine


def test_server_serves_fp16_and_int8_as_they_are(reduced, digit_samples, server_factory) -> None:
    repo = reduced["fp32"].path.parent.parent.parent
    server = server_factory(repo)
    images, _ = digit_samples
    pngs = [encode(image) for image in images[:16]]
    with ClassifierClient(server.address) as client:
        for version, precision in ((2, "fp16"), (3, "int8")):
            info = client.get_model("digits", version)
            assert info.input.dtype == ("float16" if precision == "fp16" else "float32")
            served = [r.top.index for r in client.classify(pngs, model="digits", version=version, top_k=1)]
            direct = probabilities(reduced[precision].path, images[:16]).argmax(1).tolist()
            assert served == direct
        # The bench's Open Inference Protocol load sends raw tensors in the model's own input type.
        with grpc.insecure_channel(server.address) as channel:
            infer = kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            for version in (2, 3):
                info = client.get_model("digits", version)
                request = kserve_requests_of(info, "tensor", per_request=4)[0]
                expected_type = "FP16" if info.input.dtype == "float16" else "FP32"
                assert request.inputs[0].datatype == expected_type
                assert infer(request, timeout=30).outputs[0].shape == [4, 10]


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_reduced_graph_sets_its_threshold_on_its_own_scores(
    reduced, converged_run: Path, precision: str
) -> None:
    """The export serves the energy score (a second output); a smaller graph's energy drifts from
    float32's, so its threshold keeps 99 % of the validation images under its own scores."""
    from training.calibration import keep_threshold
    from training.train import VAL_SPLIT

    val = np.load(converged_run / VAL_SPLIT)["images"]

    def served(path: Path) -> tuple[float, np.ndarray]:
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        spec = session.get_inputs()[0]
        dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
        _, scores = session.run(None, {spec.name: to_tensor(val).numpy().astype(dtype)})
        return float(meta["convserve.abstain_threshold"]), scores.astype(np.float32).reshape(-1)

    threshold, scores = served(reduced[precision].path)
    float_threshold, float_scores = served(reduced["fp32"].path)
    drift = float(np.abs(scores - float_scores).max())
    print(
        f"{precision}: energy differs from float32 by up to {drift:.4f}; "
        f"threshold {threshold:.4f} vs {float_threshold:.4f}"
    )
    assert threshold == keep_threshold(scores)
    assert 0.985 <= (scores >= np.float32(threshold)).mean() <= 1.0
    calibration = reduced[precision].calibration
    assert calibration is not None and calibration.threshold == threshold
