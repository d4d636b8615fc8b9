"""Datasets as uint8 image arrays with fixed, seeded train / validation / test splits.

Three sources, named by a spec string:
  digits        scikit-learn's bundled 8x8 handwritten digits (the default; nothing is downloaded)
  idx:PATH      a folder of MNIST-format IDX pairs (`*-images-idx3-ubyte[.gz]`, `*-labels-idx1-ubyte[.gz]`)
  folder:PATH   a user's own images, one sub-folder per class (the ImageFolder layout)
"""

from __future__ import annotations

import gzip
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from serving.core.contract import ColorMode, image_pixels

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1


class DatasetError(ValueError):
    """The dataset cannot be loaded; the message says what is wrong and where."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, (N, C, H, W)
    labels: np.ndarray  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    name: str
    class_names: tuple[str, ...]
    color_mode: ColorMode
    train: Split
    val: Split
    test: Split
    skipped_files: int = 0

    @property
    def height(self) -> int:
        return self.train.images.shape[2]

    @property
    def width(self) -> int:
        return self.train.images.shape[3]


def load_dataset(spec: str, seed: int = 0, size: int = 32, color_mode: ColorMode = "RGB") -> Dataset:
    """Loads a dataset from its spec; `size` and `color_mode` apply to `folder:` datasets only."""
    kind, _, path = spec.partition(":")
    if kind == "digits" and not path:
        return load_digits(seed)
    if kind == "idx" and path:
        return load_idx(Path(path), seed)
    if kind == "folder" and path:
        return load_folder(Path(path), seed, size, color_mode)
    raise DatasetError(f"unknown dataset {spec!r}: use digits, idx:PATH or folder:PATH")


def held_out_count(labels: np.ndarray, fraction: float) -> int:
    """Rows to hold out: the fraction, but at least one per class so the split can be stratified."""
    return max(len(np.unique(labels)), round(fraction * len(labels)))


def split_three_ways(images: np.ndarray, labels: np.ndarray, seed: int) -> tuple[Split, Split, Split]:
    """Stratified, seeded train / validation / test split."""
    rest_x, test_x, rest_y, test_y = train_test_split(
        images, labels, test_size=held_out_count(labels, TEST_FRACTION), random_state=seed, stratify=labels
    )
    train_x, val_x, train_y, val_y = split_validation(rest_x, rest_y, seed)
    return Split(train_x, train_y), Split(val_x, val_y), Split(test_x, test_y)


def split_validation(images: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    count = held_out_count(labels, VAL_FRACTION)
    return train_test_split(images, labels, test_size=count, random_state=seed, stratify=labels)


def load_digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    # Pixel values are 0..16 ink intensity; stretch them to the 0..255 an 8-bit image file holds.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    train, val, test = split_three_ways(images, labels, seed)
    names = tuple(str(n) for n in bunch.target_names)
    return Dataset("digits", names, "L", train, val, test)


def read_idx(path: Path) -> np.ndarray:
    """Reads one IDX file (optionally gzipped) of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0:2] != b"\x00\x00":
        raise DatasetError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise DatasetError(f"{path}: only unsigned-byte IDX data is supported (type code {dtype_code:#x})")
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DatasetError(
            f"{path}: header says {dims} ({expected} bytes) but holds {len(data) - header} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_pair(images_path: Path, labels_path: Path) -> Split:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise DatasetError(f"{images_path}: expected 3 dimensions (count, rows, cols), got {images.ndim}")
    if labels.ndim != 1:
        raise DatasetError(f"{labels_path}: expected 1 dimension (count), got {labels.ndim}")
    if len(images) != len(labels):
        raise DatasetError(
            f"mismatched IDX pair: {images_path.name} holds {len(images)} images "
            f"but {labels_path.name} holds {len(labels)} labels"
        )
    return Split(images[:, None, :, :].copy(), labels.astype(np.int64))


def find_idx_pairs(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Maps each prefix (`train`, `t10k`, ...) to its (images, labels) files."""
    pairs: dict[str, tuple[Path, Path]] = {}
    for images_path in sorted(folder.glob("*-images-idx3-ubyte*")):
        prefix = images_path.name.split("-images-idx3-ubyte")[0]
        matches = sorted(folder.glob(f"{prefix}-labels-idx1-ubyte*"))
        if not matches:
            raise DatasetError(f"{images_path} has no labels file {prefix}-labels-idx1-ubyte[.gz] beside it")
        pairs[prefix] = (images_path, matches[0])
    return pairs


def idx_class_names(folder: Path, num_classes: int) -> tuple[str, ...]:
    """Class names from a `classes.txt` beside the files, else those of a known dataset, else indices."""
    classes_file = folder / "classes.txt"
    if classes_file.exists():
        names = tuple(line.strip() for line in classes_file.read_text().splitlines() if line.strip())
        if len(names) != num_classes:
            raise DatasetError(f"{classes_file} names {len(names)} classes, the labels hold {num_classes}")
        return names
    if "fashion" in str(folder).lower() and num_classes == len(FASHION_MNIST_CLASSES):
        return FASHION_MNIST_CLASSES
    return tuple(str(i) for i in range(num_classes))


def load_idx(folder: Path, seed: int) -> Dataset:
    if not folder.is_dir():
        raise DatasetError(f"IDX folder {folder} does not exist")
    pairs = find_idx_pairs(folder)
    if not pairs:
        raise DatasetError(f"no *-images-idx3-ubyte[.gz] files in {folder}")
    test_prefix = next((p for p in pairs if p in ("t10k", "test")), None)
    train_prefixes = [p for p in pairs if p != test_prefix]
    if not train_prefixes:
        raise DatasetError(f"{folder} holds only a test split ({test_prefix})")
    parts = [read_idx_pair(*pairs[p]) for p in train_prefixes]
    images = np.concatenate([p.images for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    if test_prefix is None:
        train, val, test = split_three_ways(images, labels, seed)
    else:
        # The dataset's own test split stays the test split; validation is carved from training.
        test = read_idx_pair(*pairs[test_prefix])
        train_x, val_x, train_y, val_y = split_validation(images, labels, seed)
        train, val = Split(train_x, train_y), Split(val_x, val_y)
    if test.images.shape[1:] != train.images.shape[1:]:
        raise DatasetError(
            f"test images are {test.images.shape[2:]}, training images {train.images.shape[2:]}"
        )
    num_classes = int(max(labels.max(), test.labels.max())) + 1
    return Dataset(f"idx:{folder.name}", idx_class_names(folder, num_classes), "L", train, val, test)


def read_image(path: Path, color_mode: ColorMode, size: int) -> np.ndarray:
    """One image file as uint8 (C, H, W) pixels, through the very function the server decodes with."""
    from PIL import Image

    with Image.open(path) as image:
        pixels = image_pixels(image, color_mode, size, size)
    return np.array(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))


def load_folder(root: Path, seed: int, size: int, color_mode: ColorMode) -> Dataset:
    """Loads the ImageFolder layout; unreadable files are skipped with a warning and counted."""
    from PIL import UnidentifiedImageError

    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DatasetError(f"image folder {root} has no class sub-folders (expected {root}/<class>/<image>)")
    images: list[np.ndarray] = []
    labels: list[int] = []
    skipped = 0
    for index, class_dir in enumerate(class_dirs):
        found = 0
        for path in sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
            try:
                images.append(read_image(path, color_mode, size))
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                log.warning("skipping unreadable image %s: %s", path, exc)
                skipped += 1
                continue
            labels.append(index)
            found += 1
        if found == 0:
            raise DatasetError(f"class folder {class_dir} holds no readable images")
    if skipped:
        log.warning("skipped %d unreadable file(s) under %s", skipped, root)
    names = tuple(d.name for d in class_dirs)
    stacked, label_array = np.stack(images), np.asarray(labels, dtype=np.int64)
    if np.bincount(label_array).min() < 3:
        raise DatasetError(f"every class under {root} needs at least 3 images (train, validation, test)")
    train, val, test = split_three_ways(stacked, label_array, seed)
    return Dataset(f"folder:{root.name}", names, color_mode, train, val, test, skipped)


def image_file_pixels(path: Path, color_mode: ColorMode, height: int, width: int) -> np.ndarray:
    """One image file as model input pixels, uint8 (C, H, W), converted as the server converts it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = image_pixels(image, color_mode, height, width)  # read inside `with`: still lazy
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc
    return np.array(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
