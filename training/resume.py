"""`last.pt`: where a run stands after each epoch, saved atomically and read back by `--resume`; and the
per-epoch seeds that make a resumed run draw exactly what the uninterrupted run would have."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from training.distributed import Context

if TYPE_CHECKING:
    from training.train import TrainConfig

LAST = "last.pt"


class ResumeError(ValueError):
    """`--resume` was asked with settings other than those the run was started with."""


@dataclass
class TrainingState:
    """Everything `last.pt` holds besides the weights and optimiser: where the run stands."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)  # one record per epoch run, resumed ones included
    best_accuracy: float = -1.0
    best_loss: float = float("inf")  # validation loss of the best epoch: breaks accuracy ties
    best_epoch: int = 0
    stale_epochs: int = 0  # epochs since the validation accuracy last improved
    stopped_early: bool = False

    def record_validation(self, epoch: int, val_loss: float, val_accuracy: float, patience: int) -> bool:
        """Moves to `epoch` and keeps it if it is the best so far; stops after `patience` epochs without a
        better one (0: never). True when the epoch is the new best."""
        # Better: higher validation accuracy, or the same with lower loss. A small validation split
        # ties often, and the later, lower-learning-rate epoch of a tie is the steadier model.
        improved = (val_accuracy, -val_loss) > (self.best_accuracy, -self.best_loss)
        self.epoch = epoch
        if improved:
            self.best_accuracy, self.best_loss = val_accuracy, val_loss
            self.best_epoch, self.stale_epochs = epoch, 0
        else:
            self.stale_epochs += 1
        self.stopped_early = bool(patience) and self.stale_epochs >= patience
        return improved


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Independent streams per (seed, epoch, process): resuming at any epoch reproduces its draws."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


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
    saved = {**asdict(type(config)()), **state["config"]}
    if saved != asdict(config):
        changed = ", ".join(
            f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in asdict(config).items() if saved.get(k) != v
        )
        raise ResumeError(
            f"{out_dir / LAST} was trained with other settings ({changed}); rerun the same command"
        )
    return state
