"""The run report: what the network learned, shown for the user's own model.

Written into the run folder (or `out_dir`):
  filters.png        every first-layer filter, each scaled to its own range (pictures.scale_filters)
  activations/       per chosen image: input.png and blockN.png, the maps after each block's last ReLU,
                     each map scaled to its own maximum (pictures.scale_maps)
  mistakes.png       misclassified test images, the most confident mistakes first
  report.html        one self-contained page: settings, test accuracy, layer table, curves,
                     confusion matrix, per-class accuracy, filters, activations and mistakes
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import serving.core.pictures as pictures
from training.calibration import Calibration
from training.datasets import image_file_pixels
from training.inspect_model import (
    LayerRow,
    block_activations,
    block_descriptions,
    first_layer_filters,
    layer_table,
)
from training.model import ConvNet
from training.train import METRICS, TEST_SPLIT, VAL_SPLIT, RunInfo, load_run, to_tensor

REPORT = "report.html"
FILTERS = "filters.png"
MISTAKES = "mistakes.png"
RELIABILITY = "reliability.png"
ACTIVATIONS = "activations"
MAX_MISTAKES = 40
MAX_EXAMPLES = 10  # "one per class" stops here for datasets with many classes


@dataclass(frozen=True)
class Mistake:
    index: int  # row in the run's test split
    true_label: int
    predicted: int
    probability: float  # the model's probability for its (wrong) prediction


@dataclass(frozen=True)
class Example:
    """One image shown with its activation maps."""

    name: str
    pixels: np.ndarray  # uint8 (C, H, W)
    true_label: int | None  # None for a user's own file
    predicted: int
    probability: float
    input_png: Path
    block_pngs: list[Path]
    block_shapes: list[tuple[int, ...]]


@dataclass(frozen=True)
class Honesty:
    """What export will calibrate and abstain with, measured on this run: the temperature and ECE, the
    reliability diagram, and how well the abstain score flags images unlike the training data."""

    calibration: Calibration
    reliability_png: Path
    ood: list[tuple[str, int, float, float, float]]  # set, images, AUROC msp, AUROC energy, share flagged
    test_flagged: float  # the run's own test images flagged (false alarms)


@dataclass
class Report:
    path: Path
    filters_png: Path
    mistakes_png: Path
    layers: list[LayerRow]
    examples: list[Example]
    mistakes: list[Mistake]
    images: list[Path] = field(default_factory=list)  # every picture the page shows
    honesty: Honesty | None = None  # runs that keep their validation split


def predict(model: ConvNet, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Class probabilities for uint8 (N, C, H, W) images."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out.append(torch.softmax(model(to_tensor(images[start : start + batch_size])), dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def find_mistakes(probabilities: np.ndarray, labels: np.ndarray, limit: int = MAX_MISTAKES) -> list[Mistake]:
    """Wrong predictions, worst (most confident) first; ties keep test-split order."""
    predicted = probabilities.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    order = wrong[np.argsort(-confidence, kind="stable")][:limit]
    return [
        Mistake(int(i), int(labels[i]), int(predicted[i]), float(probabilities[i, predicted[i]]))
        for i in order
    ]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "image"


def input_tile(pixels: np.ndarray) -> np.ndarray:
    """uint8 (C, H, W) -> [0, 1] (H, W) grey or (H, W, 3) colour."""
    scaled = pixels.astype(np.float64) / 255.0
    return scaled[0] if scaled.shape[0] == 1 else scaled.transpose(1, 2, 0)


def shape_text(shape: Sequence[int]) -> str:
    return "×".join(str(s) for s in shape)


def write_filters(model: ConvNet, path: Path) -> Path:
    weights = first_layer_filters(model)
    count, channels, kh, kw = weights.shape
    if channels == 3:
        what = f"{count} colour filters of {channels}×{kh}×{kw}"
    else:
        what = f"{count} filters of {channels}×{kh}×{kw}" + (
            ", one grey tile per channel" if channels > 1 else ""
        )
    caption = (
        f"First layer: {what}; each scaled to its own range (black = most negative, white = most positive)"
    )
    columns = channels if channels not in (1, 3) else None
    return pictures.save(pictures.grid_image(pictures.filter_tiles(weights), caption, columns=columns), path)


def write_example(
    model: ConvNet,
    name: str,
    pixels: np.ndarray,
    true_label: int | None,
    class_names: Sequence[str],
    folder: Path,
) -> Example:
    probabilities = predict(model, pixels[None])[0]
    predicted = int(probabilities.argmax())
    descriptions = block_descriptions(model)
    input_png = pictures.save(
        pictures.grid_image(
            [input_tile(pixels)],
            f"input {shape_text(pixels.shape)}",
            zoom=pictures.zoom_for(*pixels.shape[1:]) * 2,
        ),
        folder / "input.png",
    )
    block_pngs, shapes = [], []
    for activation in block_activations(model, to_tensor(pixels)):
        shape = activation.maps.shape
        caption = f"block {activation.block}: {descriptions[activation.block - 1]} → {shape_text(shape)}"
        tiles = pictures.scale_maps(activation.maps)
        block_pngs.append(
            pictures.save(pictures.grid_image(list(tiles), caption), folder / f"block{activation.block}.png")
        )
        shapes.append(tuple(shape))
    return Example(
        name, pixels, true_label, predicted, float(probabilities[predicted]), input_png, block_pngs, shapes
    )


def choose_examples(images: np.ndarray, labels: np.ndarray, num_classes: int) -> list[int]:
    """The first test image of each class (at most MAX_EXAMPLES classes)."""
    chosen = []
    for cls in range(min(num_classes, MAX_EXAMPLES)):
        rows = np.flatnonzero(labels == cls)
        if len(rows):
            chosen.append(int(rows[0]))
    return chosen


def write_mistakes(
    mistakes: list[Mistake], images: np.ndarray, class_names: Sequence[str], total: int, path: Path
) -> Path:
    if not mistakes:
        tile = np.ones(images.shape[2:], dtype=np.float64)
        return pictures.save(pictures.grid_image([tile], f"No mistakes on {total} test images"), path)
    tiles = [input_tile(images[m.index]) for m in mistakes]
    labels = [
        [f"true: {class_names[m.true_label]}", f"pred: {class_names[m.predicted]} {m.probability:.2f}"]
        for m in mistakes
    ]
    caption = f"{len(mistakes)} most confident mistakes (of {total} test images), worst first"
    return pictures.save(pictures.grid_image(tiles, caption, labels=labels), path)


def write_report(run_dir: Path, out_dir: Path | None = None, images: Sequence[Path] = ()) -> Report:
    """Writes the pictures and report.html for a finished run; `images`: the user's own files to show
    (default: one test image per class)."""
    out_dir = out_dir or run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    info, model = load_run(run_dir)
    metrics = json.loads((run_dir / METRICS).read_text())
    test = np.load(run_dir / TEST_SPLIT)
    test_images, test_labels = test["images"], test["labels"]
    names = list(info.class_names)

    layers = layer_table(model, to_tensor(test_images[:1]))
    filters_png = write_filters(model, out_dir / FILTERS)

    activations_dir = out_dir / ACTIVATIONS
    examples: list[Example] = []
    if images:
        for k, path in enumerate(images):
            pixels = image_file_pixels(Path(path), info.color_mode, info.height, info.width)  # type: ignore[arg-type]
            folder = activations_dir / f"{k:02d}_{slug(Path(path).stem)}"
            examples.append(write_example(model, Path(path).name, pixels, None, names, folder))
    else:
        for k, row in enumerate(choose_examples(test_images, test_labels, len(names))):
            label = int(test_labels[row])
            folder = activations_dir / f"{k:02d}_{slug(names[label])}"
            examples.append(write_example(model, f"test image {row}", test_images[row], label, names, folder))

    probabilities = predict(model, test_images)
    mistakes = find_mistakes(probabilities, test_labels)
    mistakes_png = write_mistakes(mistakes, test_images, names, len(test_labels), out_dir / MISTAKES)

    curves, confusion = run_dir / "curves.png", run_dir / "confusion.png"
    if not curves.exists() or not confusion.exists():
        from training.plots import plot_confusion, plot_curves

        plot_curves(metrics["history"], curves)
        plot_confusion(np.asarray(metrics["confusion_matrix"]), names, confusion)

    report = Report(out_dir / REPORT, filters_png, mistakes_png, layers, examples, mistakes)
    if (run_dir / VAL_SPLIT).exists():
        report.honesty = measure_honesty(run_dir, model, info.color_mode, test_images, test_labels, out_dir)
    page = render_html(info, metrics, report, curves, confusion)
    report.path.write_text(page, encoding="utf-8")
    return report


def measure_honesty(
    run_dir: Path, model: ConvNet, color_mode: str, images: np.ndarray, labels: np.ndarray, out_dir: Path
) -> Honesty:
    """Calibration exactly as export fits it (validation split), the reliability diagram of the test
    split, and the abstain score against noise and the inverted test images (python -m training ood
    adds other datasets)."""
    from training.calibration import abstain_scores, auroc, energy_score, msp
    from training.export import fit_calibration, logits_of
    from training.ood import ood_sets
    from training.plots import plot_reliability

    val = np.load(run_dir / VAL_SPLIT)
    test_logits = logits_of(model, images)
    fitted = fit_calibration(model, val["images"], val["labels"], images, labels)
    t, served = fitted.temperature, fitted.score.kind
    reliability_png = out_dir / RELIABILITY
    plot_reliability(fitted.reliability_before, fitted.reliability_after, t, reliability_png)
    in_msp, in_energy = msp(test_logits, t), energy_score(test_logits, t)
    threshold = np.float32(fitted.threshold)

    def flagged(logits: np.ndarray) -> float:
        return float((abstain_scores(logits, t, served).astype(np.float32) < threshold).mean())

    rows = []
    for name, ood_images in ood_sets(images, color_mode, {}).items():
        logits = logits_of(model, ood_images)
        rows.append(
            (
                name,
                len(ood_images),
                auroc(in_msp, msp(logits, t)),
                auroc(in_energy, energy_score(logits, t)),
                flagged(logits),
            )
        )
    return Honesty(fitted, reliability_png, rows, flagged(test_logits))


def honesty_html(honesty: Honesty, report: Report) -> list[str]:
    c = honesty.calibration
    return [
        "<h2>Calibration and abstaining</h2><p>What <code>training export</code> will do with this run: "
        f"divide the logits by a temperature T = {c.temperature:.4f} fitted on the validation split, so "
        "that a probability of 0.8 is right about 80 % of the time; the expected calibration error (15 "
        f"bins, test split) goes from {c.ece_before:.4f} to {c.ece_after:.4f}. The server marks an answer "
        f"<i>abstain</i> when its {c.score_name} is below {c.threshold:.4f} (which keeps "
        f"{c.kept * 100:.1f} % of validation images); of the two scores, the {c.score_name} separated the "
        "validation images better from uniform noise and inverted validation images (AUROC: max probability "
        f"{c.score.auroc_msp:.3f}, energy {c.score.auroc_energy:.3f}).</p>",
        figure(
            honesty.reliability_png,
            "Reliability diagrams of the test split: per confidence bin, the accuracy of its images; a "
            "calibrated model follows the diagonal",
            report,
        ),
        "<table><tr><th>images unlike the training data</th><th class='num'>images</th>"
        "<th class='num'>AUROC, max probability</th><th class='num'>AUROC, energy</th>"
        "<th class='num'>flagged</th></tr>",
        *(
            f"<tr><td>{html.escape(name)}</td><td class='num'>{count}</td>"
            f"<td class='num'>{msp_auroc:.3f}</td><td class='num'>{energy_auroc:.3f}</td>"
            f"<td class='num'>{flagged * 100:.1f} %</td></tr>"
            for name, count, msp_auroc, energy_auroc, flagged in honesty.ood
        ),
        f"<tr><td>this run's own test images (false alarms)</td><td></td><td></td><td></td>"
        f"<td class='num'>{honesty.test_flagged * 100:.1f} %</td></tr></table>",
    ]


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def figure(path: Path, caption: str, report: Report) -> str:
    report.images.append(path)
    return (
        f'<figure><img src="{data_uri(path)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1200px; color: #222;
       padding: 0 16px; }
h1 { font-size: 24px; margin-bottom: 4px; }
h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; }
td, th { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 8px 12px 8px 0; vertical-align: top; }
figcaption { font-size: 12px; color: #555; max-width: 900px; }
img { image-rendering: pixelated; max-width: 100%; }
.accuracy { font-size: 32px; font-weight: 600; color: #0b6e2f; }
.bar { background: #3a7bd5; height: 10px; display: inline-block; }
.example { border: 1px solid #e3e3e3; border-radius: 6px; padding: 8px; margin: 12px 0; }
"""


def render_html(info: RunInfo, metrics: dict, report: Report, curves: Path, confusion: Path) -> str:
    names = list(info.class_names)
    esc = html.escape
    total_parameters = sum(r.parameters for r in report.layers)
    config = metrics.get("config", {})
    processes = metrics.get("processes", {"world_size": 1})
    settings = {
        "dataset": f"{metrics['dataset']} ({metrics['sizes']['train']} train / {metrics['sizes']['val']} "
        f"validation / {metrics['sizes']['test']} test images, {info.channels}×{info.height}×{info.width} "
        f"{info.color_mode}, {len(names)} classes)",
        **{key: str(value) for key, value in config.items()},
        "epochs run": f"{metrics.get('epochs_run', len(metrics['history']))}"
        + (" (stopped early)" if metrics.get("stopped_early") else ""),
        "best epoch": f"{metrics['best_epoch']} (validation accuracy {metrics['best_val_accuracy']:.4f})",
        "processes": f"{processes.get('world_size', 1)} ({processes.get('backend') or 'single process'})",
        "device": metrics.get("device", "cpu"),
        "training time": f"{metrics.get('train_time_s', metrics['wall_time_s']):.1f} s",
    }
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>convserve run report: {esc(metrics['dataset'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>Run report: {esc(metrics['dataset'])}</h1>",
        f"<p>Test accuracy <span class='accuracy'>{metrics['test_accuracy'] * 100:.2f} %</span> on "
        f"{metrics['sizes']['test']} images the network never saw during training.</p>",
        "<h2>Settings</h2><table>",
        *(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in settings.items()),
        "</table>",
        "<h2>Layers</h2><p>Each layer's output for one image, measured on a real test image "
        "(channels × height × width), and its trainable parameters.</p>",
        "<table><tr><th>layer</th><th>what it does</th><th>output</th><th class='num'>parameters</th></tr>",
        "<tr><td>input</td><td>pixels scaled to [0, 1]</td>"
        f"<td>{shape_text((info.channels, info.height, info.width))}</td><td class='num'>0</td></tr>",
        *(
            f"<tr><td>{esc(r.name)}</td><td>{esc(r.kind)}</td><td>{shape_text(r.output_shape)}</td>"
            f"<td class='num'>{r.parameters:,}</td></tr>"
            for r in report.layers
        ),
        f"<tr><th>total</th><td></td><td></td><th class='num'>{total_parameters:,}</th></tr>",
        "</table>",
        "<h2>Training curves</h2>",
        figure(curves, "Loss and accuracy per epoch on the training and validation splits", report),
        "<h2>Test confusion matrix and per-class accuracy</h2>",
        figure(confusion, "Rows: true class; columns: predicted class", report),
        "<table><tr><th>class</th><th class='num'>accuracy</th><th></th></tr>",
        *(
            f"<tr><td>{esc(name)}</td><td class='num'>{acc * 100:.1f} %</td>"
            f"<td><span class='bar' style='width:{acc * 200:.0f}px'></span></td></tr>"
            for name, acc in metrics["per_class_test_accuracy"].items()
        ),
        "</table>",
        "<h2>First-layer filters</h2><p>The weights the first convolution learned. Each filter slides over "
        "the image; where the image looks like the filter, its activation map is bright.</p>",
        figure(
            report.filters_png, f"{report.filters_png.name}: each filter scaled to its own min…max", report
        ),
        "<h2>Activation maps</h2><p>Each convolution block's output after its last ReLU (what its pooling "
        "reads), one tile per channel, each tile scaled to its own maximum (black: no response).</p>",
    ]
    for example in report.examples:
        truth = f"true class {esc(names[example.true_label])}, " if example.true_label is not None else ""
        parts.append(
            f"<div class='example'><p><b>{esc(example.name)}</b>: {truth}predicted "
            f"{esc(names[example.predicted])} ({example.probability:.3f})</p>"
        )
        parts.append(figure(example.input_png, f"input {shape_text(example.pixels.shape)}", report))
        for block, (png, shape) in enumerate(zip(example.block_pngs, example.block_shapes, strict=True), 1):
            parts.append(figure(png, f"block {block}: {shape_text(shape)}", report))
        parts.append("</div>")
    if report.honesty is not None:
        parts += honesty_html(report.honesty, report)
    parts += [
        "<h2>Mistakes</h2>",
        figure(
            report.mistakes_png,
            f"{len(report.mistakes)} test images the model got wrong (true label, predicted label and its "
            "probability), the most confident mistakes first",
            report,
        ),
        "</body></html>",
    ]
    return "\n".join(parts)
