"""The stronger trainer: augmentation, early stopping, resuming, and two processes training as one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from training.augment import Augmentation, augment, default_augmentation
from training.datasets import FASHION_MNIST_CLASSES, Dataset, Split, load_digits
from training.train import LAST, ResumeError, TrainConfig, train


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image() -> None:
    x = torch.rand(64, 2, 6, 5)
    out = augment(x, Augmentation(crop_padding=2), torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    shifts = set()
    for i in range(len(x)):
        windows = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[i], padded[i, :, dy : dy + 6, dx : dx + 5])
        ]
        assert windows, f"image {i} is not a window of its padded original"
        shifts.add(windows[0])
    assert len(shifts) > 10  # images get different shifts
    again = augment(x, Augmentation(crop_padding=2), torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # the generator alone decides


def test_flip_mirrors_about_half_the_images_left_right() -> None:
    x = torch.rand(200, 1, 4, 4)
    out = augment(x, Augmentation(flip=True), torch.Generator().manual_seed(1))
    mirrored = [torch.equal(o, i.flip(2)) for o, i in zip(out, x, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert 70 < sum(mirrored) < 130


def tiny(name: str, classes: tuple[str, ...], side: int = 28) -> Dataset:
    split = Split(np.zeros((len(classes), 1, side, side), np.uint8), np.arange(len(classes)))
    return Dataset(name, classes, "L", split, split, split)


def test_augmentation_follows_what_the_dataset_allows() -> None:
    assert default_augmentation(load_digits(seed=0)) == Augmentation(0, False)
    assert default_augmentation(tiny("idx:fashion-mnist", FASHION_MNIST_CLASSES)) == Augmentation(2, True)
    digits_like = tuple(str(i) for i in range(10))
    assert default_augmentation(tiny("idx:mnist", digits_like)) == Augmentation(
        2, False
    )  # no mirrored digits
    assert default_augmentation(tiny("folder:pets", ("cat", "dog"), side=64)) == Augmentation(4, True)


def without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_resume_continues_exactly_where_the_run_stopped(tmp_path: Path) -> None:
    data = load_digits(seed=0)
    config = TrainConfig(epochs=4, seed=0, crop_padding=1, flip=True, label_smoothing=0.1)
    straight = train(data, config, tmp_path / "straight")

    def interrupt_after_epoch_2(record: dict) -> None:
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(data, config, tmp_path / "resumed", epoch_hook=interrupt_after_epoch_2)
    assert torch.load(tmp_path / "resumed" / LAST, weights_only=True)["state"]["epoch"] == 2
    assert not (tmp_path / "resumed" / "metrics.json").exists()

    resumed = train(data, config, tmp_path / "resumed", resume=True)
    assert resumed["resumed_after_epoch"] == 2 and resumed["epochs_run"] == 4
    assert without_times(resumed["history"]) == without_times(straight["history"])
    weights = [
        torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("straight", "resumed")
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert resumed["test_accuracy"] == straight["test_accuracy"]

    with pytest.raises(ResumeError, match=r"learning_rate: 0.002 -> 0.001"):
        train(data, TrainConfig(epochs=4, seed=0, learning_rate=1e-3), tmp_path / "resumed", resume=True)


def test_a_run_saved_before_newer_settings_resumes_with_their_defaults(tmp_path: Path) -> None:
    data = load_digits(seed=0)
    config = TrainConfig(epochs=2, seed=0)

    def interrupt_after_epoch_1(record: dict) -> None:
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(data, config, tmp_path, epoch_hook=interrupt_after_epoch_1)
    saved = torch.load(tmp_path / LAST, weights_only=True)
    for newer in ("block_convs", "bf16"):  # a last.pt written before these settings existed
        del saved["config"][newer]
    torch.save(saved, tmp_path / LAST)
    assert train(data, config, tmp_path, resume=True)["resumed_after_epoch"] == 1
    with pytest.raises(ResumeError, match=r"block_convs: 1 -> 2"):
        train(data, TrainConfig(epochs=2, seed=0, block_convs=2), tmp_path, resume=True)


def test_bf16_trains_under_autocast_and_keeps_float32_weights(tmp_path: Path, digits_run: Path) -> None:
    """bfloat16 autocast runs the convolutions in bfloat16 while training; the weights, the checkpoint
    and the evaluation stay float32, and the model learns as well as the float32 run of the same
    settings (the session's digits run, 12 epochs)."""
    data = load_digits(seed=0)
    seen: set[torch.dtype] = set()
    original = torch.nn.Conv2d.forward

    def record_dtype(self: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        out = original(self, x)
        seen.add(out.dtype)
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.Conv2d, "forward", record_dtype)
        metrics = train(data, TrainConfig(epochs=12, seed=0, bf16=True), tmp_path)
    assert seen == {torch.bfloat16, torch.float32}  # bfloat16 in training, float32 in evaluation
    weights = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {w.dtype for k, w in weights.items() if "num_batches" not in k} == {torch.float32}
    float32 = json.loads((digits_run / "metrics.json").read_text())["test_accuracy"]
    assert metrics["config"]["bf16"] and metrics["test_accuracy"] >= min(0.97, float32 - 0.02)


def test_early_stopping_waits_patience_epochs_without_improvement(tmp_path: Path) -> None:
    metrics = train(load_digits(seed=0), TrainConfig(epochs=40, seed=0, patience=3), tmp_path)
    accuracies = [r["val_accuracy"] for r in metrics["history"]]
    assert metrics["stopped_early"] and len(accuracies) < 40
    best = metrics["best_epoch"]
    assert len(accuracies) == best + 3  # stopped exactly `patience` epochs after the best
    assert accuracies[best - 1] == max(accuracies) > max(accuracies[: best - 1])
    assert metrics["best_val_accuracy"] == accuracies[best - 1]


def run_training(*launcher: str, out: Path, seed: int = 0) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", *launcher, "training", "train", "--dataset", "digits"]
    command += ["--device", "cpu", "--out", str(out), "--seed", str(seed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280, env=env)


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (gloo): each trains on its shard, rank 0 alone writes the run.
    Both use the default digits settings, as docs/guides/train.md's do. One test image is 0.28 points
    of digits' 359, and a change in the last bit of the input moves a run by one or two images, so
    the accuracies are compared as the mean over two seeds."""
    torchrun = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    accuracy: dict[str, list[float]] = {"single": [], "ddp": []}
    for seed in (0, 1):
        single = run_training(out=tmp_path / f"single{seed}", seed=seed)
        assert single.returncode == 0, single.stderr[-3000:]
        ddp = run_training(*torchrun, out=tmp_path / f"ddp{seed}", seed=seed)
        assert ddp.returncode == 0, ddp.stderr[-3000:]
        one = json.loads((tmp_path / f"single{seed}" / "metrics.json").read_text())
        two = json.loads((tmp_path / f"ddp{seed}" / "metrics.json").read_text())
        accuracy["single"].append(one["test_accuracy"])
        accuracy["ddp"].append(two["test_accuracy"])
    assert two["config"] == one["config"]
    assert one["processes"]["world_size"] == 1
    assert two["processes"] == {
        "world_size": 2,
        "backend": "gloo",
        "train_images_per_process": 647,  # half of the 1294 training images
        "batch_per_process": 32,  # half of the global batch of 64
    }
    assert min(accuracy["single"]) >= 0.98, accuracy
    mean = {kind: sum(values) / len(values) for kind, values in accuracy.items()}
    assert abs(mean["ddp"] - mean["single"]) <= 0.005, accuracy
    assert ddp.stdout.count("run report:") == 1  # only rank 0 wrote and reported
    assert (tmp_path / "ddp1" / "report.html").exists() and not list((tmp_path / "ddp1").glob("*.partial"))
