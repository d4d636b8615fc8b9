"""Same file, same pixels: training's folder loader and the server give bit-identical model input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from serving.core.contract import Fit, ModelContract
from serving.core.preprocess import decode_to_input
from training.datasets import read_image
from training.train import to_tensor

# (format, mode, width, height): every format and mode Pillow writes that a user is likely to send,
# and large JPEGs, which are decoded at a reduced scale.
FILES = [
    ("PNG", "L", 40, 30),
    ("PNG", "LA", 40, 30),
    ("PNG", "RGB", 40, 30),
    ("PNG", "RGBA", 40, 30),
    ("PNG", "P", 40, 30),
    ("PNG", "1", 40, 30),
    ("PNG", "I;16", 40, 30),
    ("JPEG", "L", 40, 30),
    ("JPEG", "RGB", 40, 30),
    ("JPEG", "CMYK", 40, 30),
    ("JPEG", "RGB", 640, 480),
    ("JPEG", "L", 1024, 768),
    ("GIF", "P", 40, 30),
    ("GIF", "L", 40, 30),
    ("BMP", "RGB", 40, 30),
    ("BMP", "P", 40, 30),
    ("TIFF", "RGB", 40, 30),
    ("TIFF", "RGBA", 40, 30),
    ("TIFF", "CMYK", 40, 30),
    ("TIFF", "I;16", 40, 30),
    ("TIFF", "F", 40, 30),
    ("WEBP", "RGB", 40, 30),
    ("WEBP", "RGBA", 40, 30),
    ("PPM", "RGB", 40, 30),
    ("TGA", "RGBA", 40, 30),
]


def picture(width: int, height: int) -> np.ndarray:
    """A smooth colour picture with detail, so resizing and colour conversion both matter."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [
        127 + 120 * np.sin(x / 7.0),
        127 + 120 * np.cos(y / 5.0),
        (x * 255 / width + y * 255 / height) / 2,
    ]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("fmt", "mode", "width", "height"), FILES)
@pytest.mark.parametrize("color_mode", ["L", "RGB"])
def test_training_and_serving_give_the_same_input(tmp_path, fmt, mode, width, height, color_mode) -> None:
    image = Image.fromarray(picture(width, height))
    if mode == "I;16":
        image = Image.fromarray((np.asarray(image.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    elif mode == "F":
        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.float32))
    else:
        image = image.convert(mode)
    path = tmp_path / f"image.{fmt.lower()}"
    image.save(path, format=fmt)
    size = 24
    trained = to_tensor(read_image(path, color_mode, size)[None]).numpy()[0]
    contract = ModelContract(labels=("a", "b"), fit=Fit(color_mode, size, size))
    served = decode_to_input(path.read_bytes(), contract)
    assert served.dtype == trained.dtype == np.float32 and served.shape == trained.shape
    assert np.array_equal(served, trained), f"max difference {np.abs(served - trained).max()}"
    assert served.std() > 0  # a real picture came through, not a blank
