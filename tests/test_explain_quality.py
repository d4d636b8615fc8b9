"""Whether the explanations point at the evidence, and whether they depend on what the model learned.

A model is trained on synthetic images where the only evidence for the class is one small object at a
random place among clutter (tests/explain_data.py), then exported with `export_run`; its maps are the
served ones: `DataPlane.explain` over the exported version (Grad-CAM from explain.onnx, occlusion
copies through the model's batcher at the default 4 px patch and stride 2). Both maps are of the TRUE
class.

- Pointing game (Zhang et al. 2016): the map's maximum must lie in the object's box.
- Sanity check (Adebayo et al. 2018, "Sanity Checks for Saliency Maps"): every learned parameter
  re-initialised at once (their full randomisation, the end point of the cascade); the maps of that
  network must rank the pixels differently from the trained network's.
- Controls: maps that ignore the model fail the pointing game on this data, and a map ranks like itself.

`pytest -s` prints the measured figures as JSON lines starting with "explain-quality".
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.explain_data import CLASS_NAMES, SIDE, make_shapes, peak_offsets, pointing_hits, spearman

MIN_HITS = 0.9  # pointing game: fraction of held-out images whose map peaks on the object
# The box grown by one pixel on each side: an occlusion map is the mean over every patch covering a pixel
# and a CAM is the 7 x 7 grid bilinearly upsampled by 4, so either may peak just beside a thin shape.
PAD = 1
MIN_ACCURACY = 0.95
MAX_RANK_CORRELATION = 0.5  # median over images, trained vs randomised maps


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Training and export on one thread: on this 2-core machine, shared with other work, two threads
    made training 5x slower (their workers spin waiting for each other), one kept it at about 12 s."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def report(**figures: object) -> None:
    print("explain-quality", json.dumps(figures, sort_keys=True))


@dataclass(frozen=True)
class Maps:
    probabilities: np.ndarray  # (N, K) from model.onnx
    cam: np.ndarray  # (N, H, W) explain.onnx's Grad-CAM of each image's true class
    occlusion: np.ndarray  # (N, H, W) occlusion map of each image's true class


def served_maps(model_dir: Path, images: np.ndarray, labels: np.ndarray) -> Maps:
    """Both maps as the server makes them: `DataPlane.explain` over the exported version, in process
    (explain.onnx through its batcher, occlusion copies through the model's), one request per class
    naming that class. The probabilities come from model.onnx in ONNX Runtime, for the accuracy."""
    import asyncio

    import onnxruntime as ort

    from serving.core.dataplane import DataPlane, Limits
    from serving.core.runtime import RuntimeOptions
    from serving.core.types import ExplainRequest, RawTensor
    from serving.models.local import open_local
    from training.train import to_tensor

    x = to_tensor(images).numpy()
    assert (model_dir / "explain.onnx").exists(), "export_run wrote no explain.onnx beside model.onnx"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as for torch (one_torch_thread): faster on a shared 2-core machine
    model = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    probabilities = model.run(None, {model.get_inputs()[0].name: x})[0]
    cam, occlusion = np.zeros((2, len(labels), SIDE, SIDE), dtype=np.float32)
    local = open_local(model_dir, RuntimeOptions(device="cpu", intra_op_threads=1))
    dataplane = DataPlane(local.registry, local.pool, Limits(max_explain_copies=len(labels) * 169))

    async def explain_all() -> None:
        for label in np.unique(labels):
            indices = np.flatnonzero(labels == label)
            tensors = [RawTensor(row.shape, "float32", row.tobytes()) for row in x[indices]]
            request = ExplainRequest(tensors, methods=("cam", "occlusion"), target=int(label))
            result = await dataplane.explain(request)
            assert not result.errors and result.occlusion is not None and result.occlusion.copies == 169
            for index, explanation in zip(indices, result.explanations, strict=True):
                cam[index], occlusion[index] = explanation.maps["cam"], explanation.maps["occlusion"]

    try:
        asyncio.run(explain_all())
    finally:
        asyncio.run(local.close())
    return Maps(probabilities, cam, occlusion)


@dataclass(frozen=True)
class Trained:
    run_dir: Path
    test_accuracy: float  # the trainer's, on its test split (the images explained here)
    maps: Maps


@pytest.fixture(scope="module")
def shapes_test():
    return make_shapes(50, seed=3)  # 200 held-out images, 50 per class


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, shapes_test) -> Trained:
    from training.datasets import Dataset, Split
    from training.export import export_run
    from training.train import TrainConfig, train

    train_set, val_set = make_shapes(600, seed=1), make_shapes(75, seed=2)
    dataset = Dataset(
        "shapes",
        CLASS_NAMES,
        "L",
        Split(train_set.images, train_set.labels),
        Split(val_set.images, val_set.labels),
        Split(shapes_test.images, shapes_test.labels),
    )
    run_dir = tmp_path_factory.mktemp("shapes-run")
    repo = tmp_path_factory.mktemp("shapes-models")
    with one_torch_thread():  # 3 pooling blocks at 28 x 28; one convolution each is plenty for 4 shapes
        metrics = train(dataset, TrainConfig(epochs=6, seed=0, block_convs=1), run_dir, threads=1)
        export = export_run(run_dir, repo, "shapes")
    maps = served_maps(export.path.parent, shapes_test.images, shapes_test.labels)
    return Trained(run_dir, metrics["test_accuracy"], maps)


@pytest.fixture(scope="module")
def randomised(tmp_path_factory: pytest.TempPathFactory, trained: Trained, shapes_test) -> Maps:
    """The trained run with every learned parameter re-initialised (conv, batch norm incl. its running
    statistics, linear layers: their PyTorch defaults, seeded), exported by the same `export_run`. The
    input normalisation's mean and std are the data's, not learned, and stay."""
    import torch

    from training.export import export_run
    from training.train import CHECKPOINT, load_run

    _, net = load_run(trained.run_dir)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        for module in net.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()  # BatchNorm2d's also resets its running statistics
    run_dir = tmp_path_factory.mktemp("shapes-random-run")
    shutil.copytree(trained.run_dir, run_dir, dirs_exist_ok=True)
    torch.save(net.state_dict(), run_dir / CHECKPOINT)
    repo = tmp_path_factory.mktemp("shapes-random-models")
    with one_torch_thread():
        export = export_run(run_dir, repo, "shapes")
    return served_maps(export.path.parent, shapes_test.images, shapes_test.labels)


@pytest.mark.slow
def test_the_model_recognises_the_shapes(trained: Trained, shapes_test) -> None:
    onnx_accuracy = float((trained.maps.probabilities.argmax(1) == shapes_test.labels).mean())
    report(test_accuracy=trained.test_accuracy, onnx_test_accuracy=onnx_accuracy, images=len(shapes_test))
    assert trained.test_accuracy >= MIN_ACCURACY, "the pointing game means little if the model guesses"
    assert onnx_accuracy == pytest.approx(trained.test_accuracy)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cam", "occlusion"])
def test_pointing_game(trained: Trained, shapes_test, method: str) -> None:
    maps = getattr(trained.maps, method)
    hits = pointing_hits(maps, shapes_test.boxes, pad=PAD)
    exact = pointing_hits(maps, shapes_test.boxes, pad=0)
    missed = sorted({CLASS_NAMES[label] for label in shapes_test.labels[~hits]})
    report(
        method=method,
        pointing_game=float(hits.mean()),
        unpadded=float(exact.mean()),
        missed=missed,
        median_peak_offset_px=float(np.median(peak_offsets(maps, shapes_test.boxes))),
    )
    assert hits.mean() >= MIN_HITS, (
        f"{method}: the map peaks on the object in {hits.mean():.1%} of {len(hits)} images "
        f"({exact.mean():.1%} without the 1 px margin), fewer than {MIN_HITS:.0%}; missed classes {missed}"
    )


def rank_correlations(trained: np.ndarray, randomised: np.ndarray) -> np.ndarray:
    """Per image; NaN where either map is flat (all zero: a CAM's ReLU can clip the whole map), which
    ranks nothing and so is left out rather than counted as uncorrelated."""
    flat = (np.ptp(trained, axis=(1, 2)) == 0) | (np.ptp(randomised, axis=(1, 2)) == 0)
    return np.where(flat, np.nan, [spearman(a, b) for a, b in zip(trained, randomised, strict=True)])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cam", "occlusion"])
def test_maps_depend_on_the_learned_weights(
    trained: Trained, randomised: Maps, shapes_test, method: str
) -> None:
    ours, theirs = getattr(trained.maps, method), getattr(randomised, method)
    correlations = rank_correlations(ours, theirs)
    ranked = int(np.isfinite(correlations).sum())
    median = float(np.nanmedian(correlations))
    random_hits = float(pointing_hits(theirs, shapes_test.boxes, pad=PAD).mean())
    random_accuracy = float((randomised.probabilities.argmax(1) == shapes_test.labels).mean())
    report(
        method=method,
        median_rank_correlation_trained_vs_random=median,
        ranked_images=ranked,
        random_model_pointing_game=random_hits,
        random_model_accuracy=random_accuracy,
    )
    assert ranked >= 0.8 * len(correlations), f"{method}: only {ranked} images have two non-flat maps"
    assert median < MAX_RANK_CORRELATION, (
        f"{method}: the randomised network's maps rank the pixels like the trained one's (median Spearman "
        f"{median:.3f} over {ranked} images): the map shows the image, not what the model learned"
    )
    # The other side of the same check: a network that learned nothing does not find the object.
    assert random_hits < MIN_HITS, (
        f"{method}: the randomised network's map finds the object ({random_hits:.1%})"
    )


def test_controls_fail_the_checks(shapes_test) -> None:
    """Maps that ignore the model fail the pointing game on this data; a map ranks perfectly like itself
    and (for contrast) not like its mirror image."""
    brightness = shapes_test.images[:, 0].astype(np.float64)  # the clutter is as bright as the object
    yy, xx = np.mgrid[:SIDE, :SIDE]
    centre = np.exp(-((yy - (SIDE - 1) / 2) ** 2 + (xx - (SIDE - 1) / 2) ** 2) / 18.0)
    centre_maps = np.broadcast_to(centre, brightness.shape)
    brightness_hits = float(pointing_hits(brightness, shapes_test.boxes, pad=PAD).mean())
    centre_hits = float(pointing_hits(centre_maps, shapes_test.boxes, pad=PAD).mean())
    self_correlation = [spearman(m, m) for m in brightness]
    mirrored = float(np.median([spearman(m, m[:, ::-1]) for m in brightness]))
    report(
        control_brightness_pointing_game=brightness_hits,
        control_centre_pointing_game=centre_hits,
        control_mirror_rank_correlation=mirrored,
    )
    assert brightness_hits < 0.5 and centre_hits < 0.5, (brightness_hits, centre_hits)
    np.testing.assert_allclose(self_correlation, 1.0, rtol=0, atol=1e-12)
    assert abs(mirrored) < MAX_RANK_CORRELATION
