"""The run report shows what the network learned: its filters, activation maps, mistakes and layer
table, checked against the model itself; and the page loads in a real browser (headless Chromium)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import serving.core.pictures as pictures
from tests.conftest import ROOT
from training.report import Report, write_report
from training.train import load_run, to_tensor

pytestmark = pytest.mark.slow


def require(tool: str) -> str:
    """The tool's path; on CI a missing tool is a failure (scripts/system-deps.sh installs it)."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing: scripts/system-deps.sh should have installed it")
        pytest.skip(f"{tool} is not installed (run scripts/system-deps.sh)")
    return path


@pytest.fixture(scope="module")
def report(digits_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Report:
    return write_report(digits_run, tmp_path_factory.mktemp("report"))


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def tile_at(
    png: np.ndarray, index: int, columns: int, cell: tuple[int, int], tile: tuple[int, int]
) -> np.ndarray:
    """Tile `index` cut out of a grid PNG by the documented layout (caption strip, margin, gaps)."""
    row, column = divmod(index, columns)
    y = pictures.CAPTION_HEIGHT + pictures.MARGIN + row * (cell[0] + pictures.GAP)
    x = pictures.MARGIN + column * (cell[1] + pictures.GAP)
    return png[y : y + tile[0], x : x + tile[1]]


def shrink(block: np.ndarray, zoom: int) -> np.ndarray:
    """A zoomed grey tile back to its values; every zoom x zoom block must be one flat grey."""
    assert (block == block[:, :, :1]).all(), "a grey tile has equal R, G and B"
    grey = block[:, :, 0].astype(int)
    h, w = grey.shape[0] // zoom, grey.shape[1] // zoom
    blocks = grey.reshape(h, zoom, w, zoom)
    assert (blocks == blocks[:, :1, :, :1]).all(), "each value fills its zoom x zoom block"
    return blocks[:, 0, :, 0]


def test_filter_grid_holds_exactly_the_first_layer_weights(report: Report, digits_run: Path) -> None:
    _, model = load_run(digits_run)
    weights = model.features[0].weight.detach().numpy().astype(np.float64)  # (32, 1, 3, 3)
    png = read_png(report.filters_png)
    zoom = math.ceil(pictures.TILE_TARGET_PX / 3)
    columns = 8  # 32 filters
    for k, w in enumerate(weights):
        expected = np.rint((w[0] - w.min()) / (w.max() - w.min()) * 255).astype(int)
        got = shrink(tile_at(png, k, columns, (3 * zoom, 3 * zoom), (3 * zoom, 3 * zoom)), zoom)
        np.testing.assert_array_equal(got, expected, err_msg=f"filter {k}")
        assert got.min() == 0 and got.max() == 255  # each filter spans black to white
    # nothing beyond the 32nd tile: the row below the grid is background
    assert (png[-pictures.MARGIN :] == pictures.BACKGROUND).all()
    assert png.shape[0] == pictures.CAPTION_HEIGHT + 2 * pictures.MARGIN + 4 * 3 * zoom + 3 * pictures.GAP


def test_activation_grids_equal_each_blocks_output(report: Report, digits_run: Path) -> None:
    _, model = load_run(digits_run)
    test = np.load(digits_run / "test_split.npz")
    assert [e.true_label for e in report.examples] == list(range(10))  # one per class by default
    example = report.examples[3]
    row = int(np.flatnonzero(test["labels"] == 3)[0])
    np.testing.assert_array_equal(example.pixels, test["images"][row])
    # The block outputs, computed here layer by layer without the report's hooks.
    x = model.normalize(to_tensor(test["images"][row : row + 1]))
    outputs = []
    with torch.no_grad():
        for layer in model.features:
            if isinstance(layer, torch.nn.MaxPool2d):  # a block's maps are what its pooling reads
                outputs.append(x[0].clone().numpy().astype(np.float64))
            x = layer(x)
    assert [o.shape for o in outputs] == [(32, 8, 8), (64, 4, 4)] == example.block_shapes
    for png_path, maps in zip(example.block_pngs, outputs, strict=True):
        png = read_png(png_path)
        side = maps.shape[1]
        zoom = math.ceil(pictures.TILE_TARGET_PX / side)
        columns = max(8, math.ceil(math.sqrt(2 * len(maps))))  # 8 for 32 maps, 12 for 64
        for channel, fmap in enumerate(maps):
            top = fmap.max()
            expected = np.rint(fmap / top * 255) if top > 0 else np.zeros_like(fmap)
            cell = (side * zoom, side * zoom)
            got = shrink(tile_at(png, channel, columns, cell, cell), zoom)
            assert np.abs(got - expected).max() <= 1, f"{png_path.name} channel {channel}"
        assert sum(m.max() > 0 for m in maps) > len(maps) // 4  # the maps are not all dark
    input_png = read_png(example.input_png)
    zoom = 2 * math.ceil(pictures.TILE_TARGET_PX / 8)
    got = shrink(tile_at(input_png, 0, 1, (8 * zoom, 8 * zoom), (8 * zoom, 8 * zoom)), zoom)
    np.testing.assert_array_equal(got, test["images"][row][0])


def test_mistakes_are_the_wrong_predictions_worst_first(report: Report, digits_run: Path) -> None:
    _, model = load_run(digits_run)
    test = np.load(digits_run / "test_split.npz")
    images, labels = test["images"], test["labels"]
    with torch.no_grad():
        probabilities = torch.softmax(model(to_tensor(images)), 1).numpy()
    predicted = probabilities.argmax(1)
    wrong = set(np.flatnonzero(predicted != labels).tolist())
    assert {m.index for m in report.mistakes} == wrong and wrong  # the 12-epoch model makes a few
    confidences = [m.probability for m in report.mistakes]
    assert confidences == sorted(confidences, reverse=True)
    for m in report.mistakes:
        assert (m.true_label, m.predicted) == (labels[m.index], predicted[m.index])
        assert m.probability == pytest.approx(probabilities[m.index].max(), abs=1e-6)
    png = read_png(report.mistakes_png)
    zoom = math.ceil(pictures.TILE_TARGET_PX / 8)
    cell = (8 * zoom + 2 * pictures.LINE_HEIGHT, max(8 * zoom, pictures.LABEL_CELL_WIDTH))
    assert len(report.mistakes) <= 32
    columns = min(len(report.mistakes), 8)
    for k, m in enumerate(report.mistakes):
        got = shrink(tile_at(png, k, columns, cell, (8 * zoom, 8 * zoom)), zoom)
        np.testing.assert_array_equal(got, images[m.index][0])


def test_layer_table_walks_the_shapes_through_the_model(report: Report, digits_run: Path) -> None:
    _, model = load_run(digits_run)
    rows = {r.name: r for r in report.layers}
    # By hand for 1x8x8 digits: two blocks of 3x3 conv (padding 1) -> BN -> ReLU -> 2x2 pooling.
    expected = {
        "features.0": ((32, 8, 8), 32 * 1 * 9),
        "features.1": ((32, 8, 8), 2 * 32),
        "features.3": ((32, 4, 4), 0),
        "features.4": ((64, 4, 4), 64 * 32 * 9),
        "features.7": ((64, 2, 2), 0),
        "classifier.0": ((256,), 0),
        "classifier.2": ((128,), 256 * 128 + 128),
        "classifier.5": ((10,), 128 * 10 + 10),
    }
    for name, (shape, params) in expected.items():
        assert (rows[name].output_shape, rows[name].parameters) == (shape, params), name
    assert sum(r.parameters for r in report.layers) == sum(p.numel() for p in model.parameters())
    page = report.path.read_text()
    assert "<td>features.4</td><td>Conv2d 32→64, 3×3, padding 1</td><td>64×4×4</td>" in page


def test_page_is_self_contained_and_complete(report: Report, digits_run: Path) -> None:
    page = report.path.read_text()
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # nothing fetched from elsewhere
    sources = re.findall(r'<img src="(data:image/png;base64,[^"]+)"', page)
    # curves, confusion, filters, 10 x (input + 2 blocks), the reliability diagram, mistakes
    assert len(sources) == len(report.images) == 5 + 10 * 3
    assert f"{metrics['test_accuracy'] * 100:.2f} %" in page
    for name in ("learning_rate", "batch_size", "crop_padding", "patience"):
        assert f"<th>{name}</th>" in page
    assert page.count("class='bar'") == 10  # per-class accuracy
    assert "block 2: 64×4×4" in page


def test_report_command_shows_the_users_own_images(digits_run: Path, tmp_path: Path) -> None:
    test = np.load(digits_run / "test_split.npz")
    Image.fromarray(test["images"][0][0]).save(tmp_path / "mine.png")
    big = np.kron(test["images"][1][0], np.ones((4, 4), dtype=np.uint8))  # 32x32, resized back to 8x8
    Image.fromarray(big).convert("RGB").save(tmp_path / "photo.jpg", quality=95)
    files = [str(tmp_path / "mine.png"), str(tmp_path / "photo.jpg")]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "report",
            str(digits_run),
            "--out",
            str(tmp_path / "out"),
            "--images",
            *files,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"run report: {(tmp_path / 'out' / 'report.html').resolve()}" in done.stdout
    folders = sorted(p.name for p in (tmp_path / "out" / "activations").iterdir())
    assert folders == ["00_mine", "01_photo"]
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<b>mine.png</b>" in page and "<b>photo.jpg</b>" in page
    missing = subprocess.run(
        [sys.executable, "-m", "training", "report", str(tmp_path / "nothing")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "not a finished training run" in missing.stderr


PROBE = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  document.body.setAttribute('data-images', images.length);
  document.body.setAttribute('data-loaded', images.filter(i => i.complete && i.naturalWidth > 0).length);
});
</script></body>"""


def chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [require("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    command += [f"--user-data-dir={cwd / 'profile'}", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def images_loaded(page: Path, tmp_path: Path) -> tuple[int, int]:
    """(images on the page, images the browser decoded), read back from the DOM after `load`."""
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("</body>", PROBE))
    done = chromium("--virtual-time-budget=10000", "--dump-dom", probed.as_uri(), cwd=tmp_path)
    match = re.search(r'<body data-images="(\d+)" data-loaded="(\d+)"', done.stdout)
    assert match, f"no probe result in the DOM: {done.stdout[:300]} {done.stderr[-500:]}"
    return int(match[1]), int(match[2])


def test_report_loads_in_a_real_browser(report: Report, tmp_path: Path) -> None:
    assert images_loaded(report.path, tmp_path) == (len(report.images), len(report.images))
    # The probe can tell: the same page with one image's data spoiled has one image fewer loaded.
    broken = tmp_path / "broken.html"
    broken.write_text(
        re.sub(
            r'src="data:image/png;base64,[^"]+"',
            'src="data:image/png;base64,AAAA"',
            report.path.read_text(),
            count=1,
        )
    )
    assert images_loaded(broken, tmp_path) == (len(report.images), len(report.images) - 1)

    shot = tmp_path / "report.png"
    done = chromium("--window-size=1280,2400", f"--screenshot={shot}", report.path.as_uri(), cwd=tmp_path)
    assert shot.exists(), done.stderr[-500:]
    pixels = read_png(shot).astype(int)
    assert pixels.shape == (2400, 1280, 3)
    not_white = (pixels < 240).any(axis=2)
    assert not_white.mean() > 0.03  # text, tables and pictures, not an empty page
    rows_with_content = not_white.any(axis=1).mean()
    assert rows_with_content > 0.5  # spread down the page
    green = (pixels[:, :, 1] > pixels[:, :, 0] + 60) & (pixels[:, :, 1] > pixels[:, :, 2] + 30)
    assert green.sum() > 200  # the test accuracy figure is drawn in green


def test_rgb_filters_are_colour_tiles_scaled_per_filter() -> None:
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(5, 3, 3, 3))
    weights[2] = 0.7  # a constant filter has no structure to stretch: mid-grey
    tiles = pictures.filter_tiles(weights)
    assert len(tiles) == 5 and all(t.shape == (3, 3, 3) for t in tiles)  # (h, w, RGB)
    for w, tile in zip(weights, tiles, strict=True):
        if np.ptp(w) == 0:
            assert (tile == 0.5).all()
            continue
        np.testing.assert_allclose(tile, ((w - w.min()) / np.ptp(w)).transpose(1, 2, 0))
    image = np.asarray(pictures.grid_image(tiles, "rgb"))
    zoom = math.ceil(pictures.TILE_TARGET_PX / 3)
    corner = tile_at(image, 0, 5, (3 * zoom, 3 * zoom), (3 * zoom, 3 * zoom))[0, 0]
    np.testing.assert_array_equal(corner, np.rint(tiles[0][0, 0] * 255))  # the colour of weight (0, 0)


def test_calibration_section_shows_what_export_will_do(report: Report, digits_run: Path) -> None:
    """The reliability diagram and the figures are export's own calibration of this run, and the
    abstain score separates noise from the test digits better than chance."""
    from training.calibration import calibrate, outliers
    from training.export import logits_of
    from training.train import VAL_SPLIT, load_run

    assert report.honesty is not None
    _, net = load_run(digits_run)
    val, test = np.load(digits_run / VAL_SPLIT), np.load(digits_run / "test_split.npz")
    expected = calibrate(
        logits_of(net, val["images"]),
        val["labels"],
        logits_of(net, test["images"]),
        test["labels"],
        outlier_logits=logits_of(net, outliers(val["images"])),
    )
    got = report.honesty.calibration
    assert got.temperature == pytest.approx(expected.temperature)
    assert (got.ece_before, got.ece_after) == pytest.approx((expected.ece_before, expected.ece_after))
    assert got.score == expected.score  # the abstain score export will serve, and why
    page = report.path.read_text()
    assert f"goes from {expected.ece_before:.4f} to {expected.ece_after:.4f}" in page
    assert f"when its {expected.score_name} is below {expected.threshold:.4f}" in page
    assert report.honesty.reliability_png.exists() and report.honesty.reliability_png in report.images
    figures = {name: (msp_auroc, flagged) for name, _, msp_auroc, _, flagged in report.honesty.ood}
    assert set(figures) == {"uniform noise", "inverted test images"}
    assert figures["uniform noise"][0] > 0.8 and figures["uniform noise"][1] > report.honesty.test_flagged
