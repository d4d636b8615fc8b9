"""Raw tensors for a model, built from pixels and the input spec the server publishes (`GetModel`)."""

from __future__ import annotations

import numpy as np

from protos.convserve.v1 import convserve_pb2 as pb


def pixels_to_tensor(pixels: np.ndarray, spec: pb.InputSpec) -> np.ndarray:
    """uint8 pixels, (H, W) or (H, W, C), as the model's input: scaled, normalised, in its layout."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if spec.channel_order == "BGR" and pixels.shape[2] == 3:  # the model reads blue first
        pixels = pixels[:, :, ::-1]
    values = pixels.astype(np.float32) * np.float32(spec.scale)
    if spec.mean:
        values -= np.asarray(spec.mean, dtype=np.float32)
    if spec.std:
        values /= np.asarray(spec.std, dtype=np.float32)
    if spec.layout == "NCHW":
        values = values.transpose(2, 0, 1)
    return np.ascontiguousarray(values, dtype=np.dtype(spec.dtype or "float32"))


def tensor_to_array(tensor: pb.Tensor) -> np.ndarray:
    """A `Tensor` message (heat maps, the model's input, block maps in an ExplainResponse) as an array."""
    return np.frombuffer(tensor.data, dtype=np.dtype(tensor.dtype).newbyteorder("<")).reshape(
        tuple(tensor.shape)
    )
