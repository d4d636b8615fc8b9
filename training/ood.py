"""How well the abstain score separates a run's own test images from images unlike its training data.

For each out-of-distribution set: AUROC of the max softmax probability and of the energy score, both on
the calibrated logits, and the share of images the export's threshold flags on the score it serves
(`served`: the one export chooses, training/calibration.py), and of the run's own test images (the
false alarms). Sets come from the run's size and colour mode: uniform noise, the inverted test images,
and another dataset stretched to the run's size with the server's own resize (`image_pixels`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from serving.core.contract import image_pixels
from training.calibration import abstain_scores, auroc, energy_score, msp
from training.datasets import load_dataset
from training.export import fit_calibration, logits_of, validation_split
from training.train import TEST_SPLIT, load_run

NOISE_IMAGES = 1000


@dataclass(frozen=True)
class OodFigure:
    run: str
    ood_set: str
    images: int
    auroc_msp: float
    auroc_energy: float
    served: str  # the abstain score export serves for this run: msp or energy
    flagged: float  # share of the OOD images below the threshold
    test_flagged: float  # share of the run's own test images below it (false alarms)


def resized(images: np.ndarray, color_mode: str, height: int, width: int) -> np.ndarray:
    """(N, C, h, w) uint8 to the run's (N, C', H, W), as the server would turn such files into input."""
    out = []
    for image in images:
        picture = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
        pixels = image_pixels(picture, color_mode, height, width)  # type: ignore[arg-type]
        out.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
    return np.stack(out)


def ood_sets(
    test_images: np.ndarray, color_mode: str, others: dict[str, np.ndarray], seed: int = 0
) -> dict[str, np.ndarray]:
    shape = test_images.shape[1:]
    noise = np.random.default_rng(seed).integers(0, 256, size=(NOISE_IMAGES, *shape), dtype=np.uint8)
    sets = {"uniform noise": noise, "inverted test images": 255 - test_images}
    for name, images in others.items():
        sets[f"{name} scaled to {shape[1]}x{shape[2]}"] = resized(images, color_mode, shape[1], shape[2])
    return sets


def measure(
    run_dir: Path, others: dict[str, str], dataset: str | None = None, abstain_score: str = "auto"
) -> list[OodFigure]:
    """`others`: name -> dataset spec whose test images are out of distribution for this run."""
    info, net = load_run(run_dir)
    test = np.load(run_dir / TEST_SPLIT)
    val_images, val_labels = validation_split(run_dir, dataset, test["labels"])
    test_logits = logits_of(net, test["images"])
    fitted = fit_calibration(
        net, val_images, val_labels, test["images"], test["labels"], abstain_score=abstain_score
    )
    t, served, threshold = fitted.temperature, fitted.score.kind, np.float32(fitted.threshold)
    in_msp, in_energy = msp(test_logits, t), energy_score(test_logits, t)
    test_flagged = float((abstain_scores(test_logits, t, served).astype(np.float32) < threshold).mean())
    foreign = {name: load_dataset(spec).test.images for name, spec in others.items()}
    figures = []
    for name, images in ood_sets(test["images"], info.color_mode, foreign).items():
        logits = logits_of(net, images)
        figures.append(
            OodFigure(
                run_dir.name,
                name,
                len(images),
                auroc(in_msp, msp(logits, t)),
                auroc(in_energy, energy_score(logits, t)),
                served,
                float((abstain_scores(logits, t, served).astype(np.float32) < threshold).mean()),
                test_flagged,
            )
        )
    return figures


def markdown(figures: list[OodFigure], command: str) -> str:
    lines = [
        "# Abstain: in-distribution test images against images unlike the training data",
        "",
        f"Made by `{command}` (training/ood.py). AUROC: the chance that a test image scores higher than an "
        "out-of-distribution one (1 = perfectly separated, 0.5 = chance), for the max softmax probability "
        "(MSP) and the energy score, both after temperature scaling. Served: the score whose threshold "
        "`flagged` applies, export's (with `--abstain-score auto`, the default: the better of the two on "
        "validation images against noise and inverted validation images; else the one the command names). "
        "Flagged: the share marked `abstain` by the served score's threshold (keeping 99 % of validation "
        "images); the last column is the share of the run's own test images flagged.",
        "",
        "| run | out-of-distribution set | images | AUROC (MSP) | AUROC (energy) | served | flagged "
        "| test flagged |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for f in figures:
        lines.append(
            f"| {f.run} | {f.ood_set} | {f.images} | {f.auroc_msp:.4f} | {f.auroc_energy:.4f} | {f.served} | "
            f"{f.flagged:.1%} | {f.test_flagged:.1%} |"
        )
    return "\n".join(lines) + "\n"


def as_json(figures: list[OodFigure]) -> list[dict]:
    return [asdict(f) for f in figures]
