"""Dataset loaders: the bundled digits, IDX pairs written here, and folders of real image files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.datasets import DatasetError, load_dataset, load_digits, read_idx


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_digits_splits_are_disjoint_stratified_and_seeded() -> None:
    first, again = load_digits(seed=0), load_digits(seed=0)
    assert first.train.images.shape[1:] == (1, 8, 8) and first.train.images.dtype == np.uint8
    assert len(first.train) + len(first.val) + len(first.test) == 1797
    assert first.test.images.max() == 255 and first.test.images.min() == 0
    assert np.array_equal(first.test.labels, again.test.labels)
    assert set(np.unique(first.test.labels)) == set(range(10))
    train_rows = {r.tobytes() for r in first.train.images}
    shared = sum(r.tobytes() in train_rows for r in first.test.images)
    assert shared < 5  # digits holds a few duplicate images; the split itself never shares an index
    assert not np.array_equal(load_digits(seed=1).test.labels, first.test.labels)


def test_idx_pairs_use_the_datasets_own_test_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (200, 12, 10)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(200) % 4)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (40, 12, 10)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(40) % 4)
    (tmp_path / "classes.txt").write_text("a\nb\nc\nd\n")
    data = load_dataset(f"idx:{tmp_path}")
    assert data.class_names == ("a", "b", "c", "d")
    assert len(data.test) == 40 and len(data.train) + len(data.val) == 200
    assert data.train.images.shape[1:] == (1, 12, 10)
    assert np.array_equal(data.test.images[:, 0], read_idx(tmp_path / "t10k-images-idx3-ubyte"))


def test_mismatched_idx_pair_is_refused(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((10, 4, 4)))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(9))
    with pytest.raises(DatasetError, match=r"holds 10 images but .* holds 9 labels"):
        load_dataset(f"idx:{tmp_path}")


def test_truncated_idx_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((10, 4, 4)))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DatasetError, match="header says"):
        read_idx(path)


def make_folder(root: Path, per_class: int = 6) -> None:
    """Real PNG / JPEG / GIF files of mixed sizes and modes."""
    rng = np.random.default_rng(1)
    for name, value in (("cats", 40), ("dogs", 200)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = (int(rng.integers(10, 60)), int(rng.integers(10, 60)))
            pixels = np.clip(rng.normal(value, 10, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels, "RGB")
            fmt, mode = [("PNG", "RGBA"), ("JPEG", "RGB"), ("PNG", "L"), ("GIF", "P"), ("PNG", "I;16")][i % 5]
            image.convert(mode).save(root / name / f"{i}.{fmt.lower()}", format=fmt)


def test_folder_of_mixed_images_is_resized_and_converted(tmp_path: Path) -> None:
    make_folder(tmp_path)
    (tmp_path / "dogs" / "broken.png").write_bytes(b"\x89PNG not really")
    data = load_dataset(f"folder:{tmp_path}", size=16, color_mode="RGB")
    assert data.class_names == ("cats", "dogs")
    assert data.skipped_files == 1
    assert data.train.images.shape[1:] == (3, 16, 16)
    assert len(data.train) + len(data.val) + len(data.test) == 12
    # The classes differ in brightness; the loader must keep that signal.
    for split in (data.train, data.test):
        means = split.images.reshape(len(split), -1).mean(axis=1)
        assert (means[split.labels == 0] < 120).all() and (means[split.labels == 1] > 120).all()
    grey = load_dataset(f"folder:{tmp_path}", size=8, color_mode="L")
    assert grey.train.images.shape[1:] == (1, 8, 8)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "no class sub-folders"),
        ("empty-class", "holds no readable images"),
    ],
)
def test_bad_folders_are_named(tmp_path: Path, layout: str, message: str) -> None:
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "empty-class":
        make_folder(root)
        (root / "birds").mkdir()
        (root / "birds" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=message):
        load_dataset(f"folder:{root}")


def test_unknown_spec_is_refused() -> None:
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet")
