"""Train / evaluate loop: forward pass, cross-entropy loss, backpropagation, AdamW updates.

The best epoch by validation accuracy is kept; the test split is touched once, after training, by the
best checkpoint. A run folder holds `checkpoint.pt` (the best weights, a plain state dict loaded with
`weights_only=True`), `last.pt` (everything `--resume` needs), `run.json` (what is needed to rebuild
the network), `metrics.json` and plots.

One process or several under `torchrun`: each process trains on its shard of every global batch
(DistributedSampler) and DistributedDataParallel averages the gradients, so the optimiser sees the
same global batch as a single process would. Rank 0 alone evaluates and writes the run folder.
Randomness (shuffle, augmentation, dropout) is seeded per epoch from (seed, epoch, rank), so a run
resumed from `last.pt` draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from training.augment import Augmentation, augment
from training.datasets import Dataset, Split
from training.distributed import Context, broadcast_from_main
from training.model import ConvNet

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LAST = "last.pt"
RUN_INFO = "run.json"
METRICS = "metrics.json"
TEST_SPLIT = "test_split.npz"  # kept so export verifies on the very images the run was tested on
VAL_SPLIT = "val_split.npz"  # kept so export fits its temperature and abstain threshold on validation
CALIBRATION = "calibration.npz"  # training images for int8 calibration at export time
CALIBRATION_IMAGES = 512
SINGLE_CPU = Context(rank=0, world_size=1, device=torch.device("cpu"), backend=None)


class ResumeError(ValueError):
    """`--resume` was asked with settings other than those the run was started with."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64  # the global batch; under torchrun each process takes batch_size / processes
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    crop_padding: int = 0
    flip: bool = False
    patience: int = 0  # stop after this many epochs without a better validation accuracy; 0: never
    label_smoothing: float = 0.0
    block_convs: int = 1  # convolutions in each pooling block after the first (see ConvNet)
    bf16: bool = False  # forward and backward passes under bfloat16 autocast; weights stay float32

    @property
    def augmentation(self) -> Augmentation:
        return Augmentation(self.crop_padding, self.flip)


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
    block_convs: int = 1  # absent from the run.json of earlier runs, which all had one

    def build_model(self) -> ConvNet:
        return ConvNet(
            self.channels,
            self.height,
            self.width,
            len(self.class_names),
            self.mean,
            self.std,
            self.block_convs,
        )


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
def evaluate(
    model: nn.Module,
    split: Split,
    num_classes: int,
    batch_size: int = 512,
    device: torch.device | None = None,
) -> Evaluation:
    model.eval()
    device = device or torch.device("cpu")
    loss_sum, confusion = 0.0, np.zeros((num_classes, num_classes), dtype=np.int64)
    for start in range(0, len(split), batch_size):
        x = to_tensor(split.images[start : start + batch_size]).to(device, memory_format=torch.channels_last)
        y = torch.from_numpy(split.labels[start : start + batch_size]).to(device)
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        np.add.at(confusion, (y.cpu().numpy(), logits.argmax(1).cpu().numpy()), 1)
    accuracy = float(np.trace(confusion) / max(len(split), 1))
    return Evaluation(loss_sum / max(len(split), 1), accuracy, confusion)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    scaled = images.astype(np.float64) / 255.0
    mean = scaled.mean(axis=(0, 2, 3))
    std = scaled.std(axis=(0, 2, 3))
    return [float(m) for m in mean], [float(max(s, 1e-6)) for s in std]


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Independent streams per (seed, epoch, process): resuming at any epoch reproduces its draws."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


@dataclass
class TrainingState:
    """Everything `last.pt` holds besides the weights and optimiser: where the run stands."""

    epoch: int = 0
    history: list[dict] | None = None
    best_accuracy: float = -1.0
    best_loss: float = float("inf")  # validation loss of the best epoch: breaks accuracy ties
    best_epoch: int = 0
    stale_epochs: int = 0  # epochs since the validation accuracy last improved
    stopped_early: bool = False


def save_atomically(obj: object, path: Path) -> None:
    """A kill while writing leaves the previous file, never half of one."""
    partial = path.with_name(path.name + ".partial")
    torch.save(obj, partial)
    os.replace(partial, path)


def load_last(out_dir: Path, config: TrainConfig, context: Context) -> dict | None:
    """The saved training state, identical on every process (rank 0 reads it and sends it)."""
    state = None
    if context.is_main and (out_dir / LAST).exists():
        state = torch.load(out_dir / LAST, weights_only=True, map_location="cpu")
    if context.distributed:
        box = [state]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    if state is None:
        return None
    # Settings added since a run was saved take their defaults: what that run trained with.
    saved = {**asdict(TrainConfig()), **state["config"]}
    if saved != asdict(config):
        changed = ", ".join(
            f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in asdict(config).items() if saved.get(k) != v
        )
        raise ResumeError(
            f"{out_dir / LAST} was trained with other settings ({changed}); rerun the same command"
        )
    return state


def train(
    dataset: Dataset,
    config: TrainConfig,
    out_dir: Path,
    *,
    context: Context = SINGLE_CPU,
    resume: bool = False,
    threads: int = 0,
    epoch_hook: Callable[[dict], None] | None = None,
) -> dict:
    """Trains, keeps the best validation epoch, evaluates it on the test split, writes the run folder.

    Returns the metrics on rank 0 and an empty dict on the other processes. `threads`: CPU threads
    while training (0: see `training_threads`). `epoch_hook` is called after each epoch (once its
    checkpoint is saved) with that epoch's record.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(training_threads(threads, dataset.height, dataset.width, previous))
    try:
        return train_with(dataset, config, out_dir, context, resume, epoch_hook)
    finally:
        torch.set_num_threads(previous)


SMALL_INPUT_SIDE = 16  # inputs no larger (the 8x8 digits) make layers too small to share or to cast


def is_small_input(height: int, width: int) -> bool:
    return max(height, width) <= SMALL_INPUT_SIDE


def default_bf16(device: torch.device, height: int, width: int) -> bool:
    """bfloat16 autocast where the device computes it natively and the input is not small."""
    return native_bfloat16(device) and not is_small_input(height, width)


def native_bfloat16(device: torch.device) -> bool:
    """Whether the device computes bfloat16 in hardware. There autocast makes a step faster (1.7x on
    AMX cores for the Fashion-MNIST model); elsewhere bfloat16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    # torch.cpu's probes are private but stable since 2.1; they read CPUID as oneDNN does.
    if device.type != "cpu":
        return False
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def training_threads(requested: int, height: int, width: int, default: int) -> int:
    """`requested` if given; else 1 for inputs of 16x16 or less: a tiny model's layers are too small to
    share, the second thread only waits, and on a busy machine it made 8x8 digits five times slower."""
    if requested > 0:
        return requested
    return 1 if is_small_input(height, width) else default


def train_with(
    dataset: Dataset,
    config: TrainConfig,
    out_dir: Path,
    context: Context,
    resume: bool,
    epoch_hook: Callable[[dict], None] | None,
) -> dict:
    torch.manual_seed(config.seed)  # the same initial weights on every process
    if context.device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.use_deterministic_algorithms(True)
    # Deterministic mode also fills every new tensor with NaN to expose reads of uninitialised memory;
    # nothing here reads any, and the filling cost 12 % of a Fashion-MNIST step.
    torch.utils.deterministic.fill_uninitialized_memory = False
    if config.batch_size % context.world_size:
        raise ValueError(f"batch size {config.batch_size} does not split over {context.world_size} processes")
    if context.is_main:
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
        config.block_convs,
    )
    num_classes = len(dataset.class_names)
    # Channels-last: the CPU's convolution and pooling kernels run about twice as fast on it.
    model = info.build_model().to(context.device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    # Each process takes every world_size-th image of the seeded permutation, so the shards of the
    # k-th local batches together are exactly the k-th global batch of a single-process run.
    sampler = DistributedSampler(
        range(len(dataset.train)),  # type: ignore[arg-type]
        num_replicas=context.world_size,
        rank=context.rank,
        shuffle=True,
        seed=config.seed,
    )
    local_batch = config.batch_size // context.world_size
    steps_per_epoch = -(-len(sampler) // local_batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.epochs * steps_per_epoch
    )

    state = TrainingState(history=[])
    saved = load_last(out_dir, config, context) if resume else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        state = TrainingState(**saved["state"])
        if context.is_main:
            log.info("resuming %s after epoch %d of %d", out_dir, state.epoch, config.epochs)
    elif resume and context.is_main:
        log.info("no %s in %s: starting from the first epoch", LAST, out_dir)
    resumed_from = state.epoch
    history: list[dict] = state.history or []
    net: nn.Module = model
    if context.distributed:
        net = DistributedDataParallel(
            model, device_ids=[context.device] if context.device.type == "cuda" else None
        )

    x_train = to_tensor(dataset.train.images)
    y_train = torch.from_numpy(dataset.train.labels)
    augmentation = config.augmentation
    for epoch in range(state.epoch + 1, config.epochs + 1):
        if state.stopped_early:
            break
        epoch_started = time.perf_counter()
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        seed = epoch_seed(config.seed, epoch, context.rank)
        torch.manual_seed(seed)  # dropout
        augment_rng = torch.Generator().manual_seed(seed)
        net.train()
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, images
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch}/{config.epochs}",
            unit="batch",
            leave=False,
            disable=None if context.is_main else True,
        )
        for step in bar:
            index = order[step * local_batch : (step + 1) * local_batch]
            x, y = x_train[index], y_train[index]
            if augmentation.active:
                x = augment(x, augmentation, augment_rng)
            x = x.to(context.device, memory_format=torch.channels_last, non_blocking=True)
            y = y.to(context.device, non_blocking=True)
            with torch.autocast(context.device.type, dtype=torch.bfloat16, enabled=config.bf16):
                logits = net(x)  # forward pass
                loss = nn.functional.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # backpropagation (DDP averages the gradients over processes here)
            optimizer.step()  # weight update
            schedule.step()
            totals += torch.tensor([loss.item() * len(y), float((logits.argmax(1) == y).sum()), len(y)])
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if context.distributed:  # the whole epoch's training figures, over every shard
            totals = totals.to(context.device)  # NCCL reduces only tensors on the GPU
            dist.all_reduce(totals)
            totals = totals.cpu()
        if context.is_main:
            val = evaluate(model, dataset.val, num_classes, device=context.device)
            val_loss, val_accuracy = val.loss, val.accuracy
        else:
            val_loss = val_accuracy = 0.0
        val_loss, val_accuracy = broadcast_from_main(context, [val_loss, val_accuracy])
        # Better: higher validation accuracy, or the same with lower loss. A small validation split
        # ties often, and the later, lower-learning-rate epoch of a tie is the steadier model.
        improved = (val_accuracy, -val_loss) > (state.best_accuracy, -state.best_loss)
        state.epoch = epoch
        if improved:
            state.best_accuracy, state.best_loss = val_accuracy, val_loss
            state.best_epoch, state.stale_epochs = epoch, 0
        else:
            state.stale_epochs += 1
        state.stopped_early = bool(config.patience) and state.stale_epochs >= config.patience
        record = {
            "epoch": epoch,
            "train_loss": float(totals[0] / totals[2]),
            "train_accuracy": float(totals[1] / totals[2]),
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "learning_rate": schedule.get_last_lr()[0],
            "seconds": time.perf_counter() - epoch_started,
        }
        history.append(record)
        if context.is_main:
            log.info(
                "epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1fs",
                epoch,
                record["train_loss"],
                record["train_accuracy"],
                val_loss,
                val_accuracy,
                record["seconds"],
            )
            if improved:
                save_atomically(model.state_dict(), out_dir / CHECKPOINT)
            state.history = history
            save_atomically(
                {
                    "config": asdict(config),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "state": asdict(state),
                },
                out_dir / LAST,
            )
            if state.stopped_early:
                log.info("early stop: no better validation accuracy for %d epochs", config.patience)
        if epoch_hook is not None:
            epoch_hook(record)

    if not context.is_main:
        return {}
    model.load_state_dict(torch.load(out_dir / CHECKPOINT, weights_only=True, map_location=context.device))
    test = evaluate(model, dataset.test, num_classes, device=context.device)
    metrics = {
        "dataset": dataset.name,
        "class_names": list(dataset.class_names),
        "sizes": {"train": len(dataset.train), "val": len(dataset.val), "test": len(dataset.test)},
        "skipped_files": dataset.skipped_files,
        "config": asdict(config),
        "device": str(context.device),
        "processes": {
            "world_size": context.world_size,
            "backend": context.backend,
            "train_images_per_process": len(sampler),
            "batch_per_process": local_batch,
        },
        "history": history,
        "epochs_run": len(history),
        "stopped_early": state.stopped_early,
        "resumed_after_epoch": resumed_from,
        "best_epoch": state.best_epoch,
        "best_val_accuracy": state.best_accuracy,
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "per_class_test_accuracy": dict(zip(dataset.class_names, test.per_class_accuracy, strict=True)),
        "confusion_matrix": test.confusion.tolist(),
        "train_time_s": sum(r["seconds"] for r in history),
        "wall_time_s": time.perf_counter() - started,
    }
    (out_dir / RUN_INFO).write_text(json.dumps(asdict(info), indent=2))
    np.savez_compressed(out_dir / TEST_SPLIT, images=dataset.test.images, labels=dataset.test.labels)
    np.savez_compressed(out_dir / VAL_SPLIT, images=dataset.val.images, labels=dataset.val.labels)
    pick = np.random.default_rng(config.seed).permutation(len(dataset.train))[:CALIBRATION_IMAGES]
    np.savez_compressed(out_dir / CALIBRATION, images=dataset.train.images[np.sort(pick)])
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
    model.load_state_dict(torch.load(run_dir / CHECKPOINT, weights_only=True, map_location="cpu"))
    model.eval()
    return info, model
