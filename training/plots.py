"""PNG plots of a training run: loss / accuracy curves and the test confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from training.calibration import Reliability


def plot_curves(history: Sequence[dict], path: Path) -> None:
    epochs = [r["epoch"] for r in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        loss_ax.plot(epochs, [r[f"{split}_loss"] for r in history], label=split)
        acc_ax.plot(epochs, [r[f"{split}_accuracy"] for r in history], label=split)
    loss_ax.set(title="loss", xlabel="epoch")
    acc_ax.set(title="accuracy", xlabel="epoch")
    for ax in (loss_ax, acc_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    size = max(4.0, 0.5 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=90)
    ax.set_yticks(ticks, class_names)
    ax.set(xlabel="predicted", ylabel="true", title="test confusion matrix")
    limit = confusion.max() / 2 if confusion.size else 0
    for (row, col), count in np.ndenumerate(confusion):
        ax.text(
            col,
            row,
            str(count),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if count > limit else "black",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(before: Reliability, after: Reliability, temperature: float, path: Path) -> None:
    """Reliability diagrams of the test split before and after the temperature: per confidence bin, the
    accuracy of its images against the diagonal a calibrated model follows."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, diagram, title in (
        (axes[0], before, f"before (T = 1): ECE {before.ece:.4f}"),
        (axes[1], after, f"after (T = {temperature:.3f}): ECE {after.ece:.4f}"),
    ):
        centres = (diagram.edges[:-1] + diagram.edges[1:]) / 2
        width = diagram.edges[1] - diagram.edges[0]
        filled = diagram.counts > 0
        ax.bar(
            centres[filled], diagram.accuracy[filled], width=width * 0.9, color="#4a7bd0", label="accuracy"
        )
        accuracy, confidence = diagram.accuracy[filled], diagram.confidence[filled]
        ax.bar(
            centres[filled],
            np.abs(confidence - accuracy),
            bottom=np.minimum(accuracy, confidence),
            width=width * 0.9,
            fill=False,
            edgecolor="#c0392b",
            hatch="///",
            label="gap to mean confidence",
        )
        ax.plot([0, 1], [0, 1], color="black", linewidth=1, linestyle="--", label="calibrated")
        ax.set(title=title, xlabel="confidence (top probability)", xlim=(0, 1), ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy of the bin's test images")
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
