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

`train_with` composes steps that each run alone: `set_up` (or resume), `run_epoch` (`train_epoch`,
`validate`, the early stop in `TrainingState.record_validation`, `save_checkpoint`), then `finish`.
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
from training.datasets import Dataset
from training.distributed import Context, broadcast_from_main
from training.evaluation import Evaluation, evaluate, to_tensor
from training.model import ConvNet
from training.precision import default_bf16 as default_bf16  # re-exported: the CLI imports it from here
from training.precision import training_threads
from training.resume import LAST, TrainingState, epoch_seed, load_last, save_atomically
from training.resume import ResumeError as ResumeError  # re-exported: the CLI catches it from here

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
RUN_INFO = "run.json"
METRICS = "metrics.json"
TEST_SPLIT = "test_split.npz"  # kept so export verifies on the very images the run was tested on
VAL_SPLIT = "val_split.npz"  # kept so export fits its temperature and abstain threshold on validation
CALIBRATION = "calibration.npz"  # training images for int8 calibration at export time
CALIBRATION_IMAGES = 512
SINGLE_CPU = Context(rank=0, world_size=1, device=torch.device("cpu"), backend=None)


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


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    scaled = images.astype(np.float64) / 255.0
    mean = scaled.mean(axis=(0, 2, 3))
    std = scaled.std(axis=(0, 2, 3))
    return [float(m) for m in mean], [float(max(s, 1e-6)) for s in std]


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


def train_with(
    dataset: Dataset,
    config: TrainConfig,
    out_dir: Path,
    context: Context,
    resume: bool,
    epoch_hook: Callable[[dict], None] | None,
) -> dict:
    """The run as its steps: set up (or resume), epochs until the last or an early stop, finish."""
    training = set_up(dataset, config, out_dir, context, resume)
    for epoch in range(training.state.epoch + 1, config.epochs + 1):
        if training.state.stopped_early:
            break
        record = run_epoch(training, epoch)
        if epoch_hook is not None:
            epoch_hook(record)
    return finish(training) if context.is_main else {}


@dataclass
class Training:
    """One run while it trains: what `set_up` builds and every later step reads or advances."""

    dataset: Dataset
    config: TrainConfig
    out_dir: Path
    context: Context
    info: RunInfo
    model: ConvNet
    net: nn.Module  # the model, or DistributedDataParallel around it
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.OneCycleLR
    sampler: DistributedSampler
    local_batch: int  # this process's share of the global batch
    steps_per_epoch: int
    state: TrainingState
    resumed_from: int  # the epoch `last.pt` stood at (0: a fresh run)
    started: float  # perf_counter() when the run (or this resumption of it) began
    x_train: torch.Tensor
    y_train: torch.Tensor

    @property
    def num_classes(self) -> int:
        return len(self.dataset.class_names)


def make_deterministic(config: TrainConfig, context: Context) -> None:
    """Seeds the initial weights and asks for deterministic kernels, so a run repeats exactly."""
    torch.manual_seed(config.seed)  # the same initial weights on every process
    if context.device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.use_deterministic_algorithms(True)
    # Deterministic mode also fills every new tensor with NaN to expose reads of uninitialised memory;
    # nothing here reads any, and the filling cost 12 % of a Fashion-MNIST step.
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]


def set_up(dataset: Dataset, config: TrainConfig, out_dir: Path, context: Context, resume: bool) -> Training:
    """The network, its optimiser, sampler and schedule, seeded; with `resume`, where `last.pt` left them."""
    make_deterministic(config, context)
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
    # Channels-last: the CPU's convolution and pooling kernels run about twice as fast on it.
    # (torch's type stubs lack Module.to's memory_format, which the function itself takes.)
    model = info.build_model().to(context.device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    # Each process takes every world_size-th image of the seeded permutation, so the shards of the
    # k-th local batches together are exactly the k-th global batch of a single-process run.
    sampler: DistributedSampler[int] = DistributedSampler(
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
    state = restore(model, optimizer, schedule, out_dir, config, context) if resume else TrainingState()
    net: nn.Module = model
    if context.distributed:
        net = DistributedDataParallel(
            model, device_ids=[context.device] if context.device.type == "cuda" else None
        )
    x_train, y_train = to_tensor(dataset.train.images), torch.from_numpy(dataset.train.labels)
    return Training(
        dataset=dataset,
        config=config,
        out_dir=out_dir,
        context=context,
        info=info,
        model=model,
        net=net,
        optimizer=optimizer,
        schedule=schedule,
        sampler=sampler,
        local_batch=local_batch,
        steps_per_epoch=steps_per_epoch,
        state=state,
        resumed_from=state.epoch,
        started=started,
        x_train=x_train,
        y_train=y_train,
    )


def restore(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    out_dir: Path,
    config: TrainConfig,
    context: Context,
) -> TrainingState:
    """Loads `last.pt` into the model, optimiser and schedule; a fresh state when there is none."""
    saved = load_last(out_dir, config, context)
    if saved is None:
        if context.is_main:
            log.info("no %s in %s: starting from the first epoch", LAST, out_dir)
        return TrainingState()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    state = TrainingState(**saved["state"])
    if context.is_main:
        log.info("resuming %s after epoch %d of %d", out_dir, state.epoch, config.epochs)
    return state


def run_epoch(training: Training, epoch: int) -> dict:
    """One epoch: train, validate, keep the best and decide on an early stop, save; returns its record."""
    config, state = training.config, training.state
    epoch_started = time.perf_counter()
    totals = train_epoch(training, epoch)
    val_loss, val_accuracy = validate(training)
    improved = state.record_validation(epoch, val_loss, val_accuracy, config.patience)
    record = {
        "epoch": epoch,
        "train_loss": float(totals[0] / totals[2]),
        "train_accuracy": float(totals[1] / totals[2]),
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "learning_rate": training.schedule.get_last_lr()[0],
        "seconds": time.perf_counter() - epoch_started,
    }
    state.history.append(record)
    if training.context.is_main:
        log.info(
            "epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1fs",
            epoch,
            record["train_loss"],
            record["train_accuracy"],
            val_loss,
            val_accuracy,
            record["seconds"],
        )
        save_checkpoint(training, improved)
        if state.stopped_early:
            log.info("early stop: no better validation accuracy for %d epochs", config.patience)
    return record


def train_epoch(training: Training, epoch: int) -> torch.Tensor:
    """One pass over this process's shard; the epoch's (loss sum, correct, images) over every shard."""
    config, context = training.config, training.context
    training.sampler.set_epoch(epoch)
    order = torch.tensor(list(training.sampler))
    seed = epoch_seed(config.seed, epoch, context.rank)
    torch.manual_seed(seed)  # dropout
    augment_rng = torch.Generator().manual_seed(seed)
    augmentation = config.augmentation
    training.net.train()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, images
    bar = tqdm(
        range(training.steps_per_epoch),
        desc=f"epoch {epoch}/{config.epochs}",
        unit="batch",
        leave=False,
        disable=None if context.is_main else True,
    )
    for step in bar:
        index = order[step * training.local_batch : (step + 1) * training.local_batch]
        x, y = training.x_train[index], training.y_train[index]
        if augmentation.active:
            x = augment(x, augmentation, augment_rng)
        x = x.to(context.device, memory_format=torch.channels_last, non_blocking=True)
        y = y.to(context.device, non_blocking=True)
        with torch.autocast(context.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            logits = training.net(x)  # forward pass
            loss = nn.functional.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
        training.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # backpropagation (DDP averages the gradients over processes here)
        training.optimizer.step()  # weight update
        training.schedule.step()
        totals += torch.tensor([loss.item() * len(y), float((logits.argmax(1) == y).sum()), len(y)])
        bar.set_postfix(loss=f"{loss.item():.4f}")
    if context.distributed:  # the whole epoch's training figures, over every shard
        totals = totals.to(context.device)  # NCCL reduces only tensors on the GPU
        dist.all_reduce(totals)
        totals = totals.cpu()
    return totals


def validate(training: Training) -> tuple[float, float]:
    """(loss, accuracy) on the validation split: rank 0 evaluates, every process gets its figures."""
    context = training.context
    if context.is_main:
        val = evaluate(training.model, training.dataset.val, training.num_classes, device=context.device)
        val_loss, val_accuracy = val.loss, val.accuracy
    else:
        val_loss = val_accuracy = 0.0
    val_loss, val_accuracy = broadcast_from_main(context, [val_loss, val_accuracy])
    return val_loss, val_accuracy


def save_checkpoint(training: Training, improved: bool) -> None:
    """`checkpoint.pt` when the epoch is the best so far; `last.pt`, everything `--resume` needs, always."""
    out_dir, model = training.out_dir, training.model
    if improved:
        save_atomically(model.state_dict(), out_dir / CHECKPOINT)
    save_atomically(
        {
            "config": asdict(training.config),
            "model": model.state_dict(),
            "optimizer": training.optimizer.state_dict(),
            "schedule": training.schedule.state_dict(),
            "state": asdict(training.state),
        },
        out_dir / LAST,
    )


def finish(training: Training) -> dict:
    """Rank 0, after the last epoch: the best checkpoint on the test split, the metrics, the run folder."""
    dataset, config, context, state = training.dataset, training.config, training.context, training.state
    model, history = training.model, state.history
    out_dir = training.out_dir
    model.load_state_dict(torch.load(out_dir / CHECKPOINT, weights_only=True, map_location=context.device))
    test = evaluate(model, dataset.test, training.num_classes, device=context.device)
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
            "train_images_per_process": len(training.sampler),
            "batch_per_process": training.local_batch,
        },
        "history": history,
        "epochs_run": len(history),
        "stopped_early": state.stopped_early,
        "resumed_after_epoch": training.resumed_from,
        "best_epoch": state.best_epoch,
        "best_val_accuracy": state.best_accuracy,
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "per_class_test_accuracy": dict(zip(dataset.class_names, test.per_class_accuracy, strict=True)),
        "confusion_matrix": test.confusion.tolist(),
        "train_time_s": sum(r["seconds"] for r in history),
        "wall_time_s": time.perf_counter() - training.started,
    }
    write_run_folder(training, metrics, test)
    return metrics


def write_run_folder(training: Training, metrics: dict, test: Evaluation) -> None:
    """What export and the report read: run.json, the kept splits, calibration images, metrics, plots."""
    dataset, out_dir = training.dataset, training.out_dir
    (out_dir / RUN_INFO).write_text(json.dumps(asdict(training.info), indent=2))
    np.savez_compressed(out_dir / TEST_SPLIT, images=dataset.test.images, labels=dataset.test.labels)
    np.savez_compressed(out_dir / VAL_SPLIT, images=dataset.val.images, labels=dataset.val.labels)
    pick = np.random.default_rng(training.config.seed).permutation(len(dataset.train))[:CALIBRATION_IMAGES]
    np.savez_compressed(out_dir / CALIBRATION, images=dataset.train.images[np.sort(pick)])
    (out_dir / METRICS).write_text(json.dumps(metrics, indent=2))
    from training.plots import plot_confusion, plot_curves

    plot_curves(training.state.history, out_dir / "curves.png")
    plot_confusion(test.confusion, dataset.class_names, out_dir / "confusion.png")


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
