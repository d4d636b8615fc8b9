"""Train / evaluate loop: forward pass, cross-entropy loss, backpropagation, AdamW updates.

The best epoch by validation accuracy is kept; the test split is touched once, after training, by the
best checkpoint. A run folder holds `checkpoint.pt` (a plain state dict, loaded with
`weights_only=True`), `run.json` (what is needed to rebuild the network), `metrics.json` and plots.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training.datasets import Dataset, Split
from training.model import ConvNet

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
RUN_INFO = "run.json"
METRICS = "metrics.json"
TEST_SPLIT = "test_split.npz"  # kept so export verifies on the very images the run was tested on


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0


@dataclass(frozen=True)
class RunInfo:
    """What `export` needs to rebuild the trained network."""

    dataset: str
    class_names: list[str]
    color_mode: str
    channels: int
    height: int
    width: int
    mean: list[float]
    std: list[float]

    def build_model(self) -> ConvNet:
        return ConvNet(self.channels, self.height, self.width, len(self.class_names), self.mean, self.std)


# The server multiplies pixels by the contract's float32 scale; the same product here keeps training's
# input bit-identical to what the server feeds (a division by 255 differs in the last bit for half the
# values).
PIXEL_SCALE = float(np.float32(1.0 / 255.0))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 pixels to float in [0, 1]: exactly as the server scales them before the graph."""
    return torch.from_numpy(images).float().mul_(PIXEL_SCALE)


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    confusion: np.ndarray  # (classes, classes): rows are true classes

    @property
    def per_class_accuracy(self) -> list[float]:
        totals = self.confusion.sum(axis=1)
        return [float(c / t) if t else 0.0 for c, t in zip(np.diag(self.confusion), totals, strict=True)]


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, num_classes: int, batch_size: int = 512) -> Evaluation:
    model.eval()
    loss_sum, confusion = 0.0, np.zeros((num_classes, num_classes), dtype=np.int64)
    for start in range(0, len(split), batch_size):
        x = to_tensor(split.images[start : start + batch_size])
        y = torch.from_numpy(split.labels[start : start + batch_size])
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        np.add.at(confusion, (y.numpy(), logits.argmax(1).numpy()), 1)
    accuracy = float(np.trace(confusion) / max(len(split), 1))
    return Evaluation(loss_sum / max(len(split), 1), accuracy, confusion)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    scaled = images.astype(np.float64) / 255.0
    mean = scaled.mean(axis=(0, 2, 3))
    std = scaled.std(axis=(0, 2, 3))
    return [float(m) for m in mean], [float(max(s, 1e-6)) for s in std]


def train(dataset: Dataset, config: TrainConfig, out_dir: Path) -> dict:
    """Trains, keeps the best validation epoch, evaluates it on the test split, writes the run folder."""
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    mean, std = channel_stats(dataset.train.images)
    info = RunInfo(
        dataset.name,
        list(dataset.class_names),
        dataset.color_mode,
        dataset.train.images.shape[1],
        dataset.height,
        dataset.width,
        mean,
        std,
    )
    num_classes = len(dataset.class_names)
    model = info.build_model()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps_per_epoch = -(-len(dataset.train) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.epochs * steps_per_epoch
    )
    x_train = to_tensor(dataset.train.images)
    y_train = torch.from_numpy(dataset.train.labels)
    shuffler = torch.Generator().manual_seed(config.seed)

    history: list[dict] = []
    best_accuracy = -1.0
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(y_train), generator=shuffler)
        loss_sum, correct = 0.0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch}/{config.epochs}",
            unit="batch",
            leave=False,
            disable=None,
        )
        for step in bar:
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            x, y = x_train[index], y_train[index]
            logits = model(x)  # forward pass
            loss = nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # backpropagation
            optimizer.step()  # weight update
            schedule.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{loss.item():.4f}")
        val = evaluate(model, dataset.val, num_classes)
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / len(y_train),
            "train_accuracy": correct / len(y_train),
            "val_loss": val.loss,
            "val_accuracy": val.accuracy,
        }
        history.append(record)
        log.info(
            "epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f",
            epoch,
            record["train_loss"],
            record["train_accuracy"],
            val.loss,
            val.accuracy,
        )
        if val.accuracy > best_accuracy:
            best_accuracy = val.accuracy
            torch.save(model.state_dict(), out_dir / CHECKPOINT)

    model.load_state_dict(torch.load(out_dir / CHECKPOINT, weights_only=True))
    test = evaluate(model, dataset.test, num_classes)
    metrics = {
        "dataset": dataset.name,
        "class_names": list(dataset.class_names),
        "sizes": {"train": len(dataset.train), "val": len(dataset.val), "test": len(dataset.test)},
        "skipped_files": dataset.skipped_files,
        "config": asdict(config),
        "history": history,
        "best_epoch": max(history, key=lambda r: r["val_accuracy"])["epoch"],
        "best_val_accuracy": best_accuracy,
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "per_class_test_accuracy": dict(zip(dataset.class_names, test.per_class_accuracy, strict=True)),
        "confusion_matrix": test.confusion.tolist(),
        "wall_time_s": time.perf_counter() - started,
    }
    (out_dir / RUN_INFO).write_text(json.dumps(asdict(info), indent=2))
    np.savez_compressed(out_dir / TEST_SPLIT, images=dataset.test.images, labels=dataset.test.labels)
    (out_dir / METRICS).write_text(json.dumps(metrics, indent=2))
    from training.plots import plot_confusion, plot_curves

    plot_curves(history, out_dir / "curves.png")
    plot_confusion(test.confusion, dataset.class_names, out_dir / "confusion.png")
    return metrics


def load_run(run_dir: Path) -> tuple[RunInfo, ConvNet]:
    """Rebuilds the trained network from a run folder (no pickle: weights_only=True)."""
    info_path = run_dir / RUN_INFO
    if not info_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a finished training run (no {RUN_INFO})")
    info = RunInfo(**json.loads(info_path.read_text()))
    model = info.build_model()
    model.load_state_dict(torch.load(run_dir / CHECKPOINT, weights_only=True))
    model.eval()
    return info, model
