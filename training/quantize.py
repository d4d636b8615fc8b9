"""Smaller, faster copies of a verified float32 ONNX model, with ONNX Runtime's own tools.

int8  static quantization in QDQ form (QuantizeLinear / DequantizeLinear around each quantized
      op): int8 weights per output channel, int8 activations whose ranges are calibrated by running
      the float model on training images. Softmax stays in float, so probabilities keep their
      resolution. Runs on any ONNX Runtime build; x86 CPUs with VNNI and GPUs with int8 kernels gain most.
fp16  weights and activations in float16, input and output included (ONNX Runtime's float16
      converter). Made for GPUs; a CPU runs it through casts and gains nothing but size.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

from training.train import to_tensor

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8")
CALIBRATION_BATCH = 32
# The ops whose inputs and weights get int8; the rest (normalisation, softmax) stays float.
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "Relu", "MaxPool", "Flatten", "Reshape"]


class ImageBatches:
    """onnxruntime's CalibrationDataReader protocol over uint8 (N, C, H, W) training images."""

    def __init__(self, input_name: str, images: np.ndarray) -> None:
        self.input_name = input_name
        self.images = images
        self._batches = self._iterate()

    def _iterate(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self.images), CALIBRATION_BATCH):
            yield {self.input_name: to_tensor(self.images[start : start + CALIBRATION_BATCH]).numpy()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = self._iterate()


def to_int8(float_path: Path, out_path: Path, calibration_images: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration_images) == 0:
        raise ValueError("int8 quantization needs calibration images")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Folds batch norm into the convolutions and fixes shapes, so each conv quantizes as one op.
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        input_name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
        quantize_static(
            str(prepared),
            str(out_path),
            ImageBatches(input_name, calibration_images),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=QUANTIZED_OPS,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )


def to_fp16(float_path: Path, out_path: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(float_path)), keep_io_types=False)
    onnx.save(model, str(out_path))


def convert(float_path: Path, out_path: Path, precision: Precision, calibration_images: np.ndarray) -> None:
    if precision == "int8":
        to_int8(float_path, out_path, calibration_images)
    elif precision == "fp16":
        to_fp16(float_path, out_path)
    else:
        raise ValueError(f"no conversion to {precision}")
