"""Explanations served: the data plane's explain in process, then the Explain RPC, the REST route and
`python -m serving explain` against a real server process with real PNG files.

The maps' quality (pointing game, sanity check) is `test_explain_quality.py`; the explain graph's
exactness against PyTorch autograd is `test_explain_graph.py`; occlusion on a model nobody here
trained is in `test_foreign_models.py`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from serving.client import ClassifierClient, tensor_to_array
from serving.core.budget import InputBudget
from serving.core.dataplane import DataPlane, Limits
from serving.core.errors import InvalidInput
from serving.core.runtime import RuntimeOptions
from serving.core.types import ClassifyRequest, ExplainRequest
from serving.models.local import open_local
from tests.conftest import ROOT, encode


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture(scope="module")
def digits(model_repo: Path):
    local = open_local(model_repo / "digits" / "1", RuntimeOptions(device="cpu"))
    yield local
    asyncio.run(local.close())


@pytest.fixture(scope="module")
def plain_repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits model without its explain graph: what a model exported elsewhere looks like."""
    repo = tmp_path_factory.mktemp("plain")
    (repo / "plain" / "1").mkdir(parents=True)
    shutil.copy(model_repo / "digits" / "1" / "model.onnx", repo / "plain" / "1" / "model.onnx")
    return repo


def explain_graph_outputs(model_repo: Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(model_repo / "digits" / "1" / "explain.onnx"))
    names = [o.name for o in session.get_outputs()]
    values = session.run(None, {"image": pixels.astype(np.float32) / np.float32(255)})
    return dict(zip(names, values, strict=True))


def test_served_cam_and_blocks_are_the_explain_graphs_for_the_image_the_model_saw(
    digits, model_repo, digit_samples
) -> None:
    images, _ = digit_samples
    files = [encode(images[i, 0]) for i in range(4)]
    result = run(
        digits.dataplane.explain(
            ExplainRequest(files, methods=("cam", "occlusion"), activations=True, activation_grids=True)
        )
    )
    classified = run(digits.dataplane.classify(ClassifyRequest(files)))
    expected = explain_graph_outputs(model_repo, images[:4])
    assert result.methods == ("cam", "occlusion") and not result.errors
    for i, ((explanation, error), (predictions, _)) in enumerate(
        zip(result.per_image(), classified.per_image(), strict=True)
    ):
        assert error is None
        # The input as the server built it: a PNG of 8x8 pixels is those pixels.
        np.testing.assert_array_equal(explanation.model_input[:, :, 0], images[i, 0])
        assert [p.index for p in explanation.predictions] == [p.index for p in predictions]
        np.testing.assert_allclose(
            [p.probability for p in explanation.predictions], [p.probability for p in predictions], atol=1e-5
        )
        assert explanation.target == predictions[0].index  # the default: each image's own top-1
        np.testing.assert_allclose(explanation.maps["cam"], expected["cam"][i, explanation.target], atol=1e-6)
        assert (
            explanation.maps["occlusion"].shape == (8, 8)
            and explanation.maps["occlusion"].dtype == np.float32
        )
        assert [b.block for b in explanation.blocks] == [1, 2]
        for block in explanation.blocks:
            np.testing.assert_allclose(block.maps, expected[f"block{block.block}"][i], atol=1e-5)
            assert block.caption.startswith(f"block {block.block}: Conv2d")
            with Image.open(io.BytesIO(block.grid_png)) as grid:
                assert grid.format == "PNG" and grid.width > 100


def test_a_named_class_is_explained_in_every_image(digits, model_repo, digit_samples) -> None:
    images, _ = digit_samples
    rows = images[:3]
    result = run(digits.dataplane.explain(ExplainRequest([encode(r[0]) for r in rows], target=7)))
    expected = explain_graph_outputs(model_repo, rows)["cam"][:, 7]
    assert result.methods == ("cam",)  # the default where the version has an explain graph
    for i, explanation in enumerate(result.explanations):
        assert explanation.target == 7 and explanation.target_label == "7"
        np.testing.assert_allclose(explanation.maps["cam"], expected[i], atol=1e-6)
        assert list(explanation.maps) == ["cam"]


def test_occlusion_copies_run_through_the_models_batcher(digits, digit_samples) -> None:
    images, _ = digit_samples
    (model,) = digits.registry.ready()
    before = model.stats.items
    result = run(
        digits.dataplane.explain(
            ExplainRequest([encode(images[0, 0]), encode(images[1, 0])], methods=["occlusion"])
        )
    )
    assert result.occlusion is not None
    assert (result.occlusion.patch, result.occlusion.stride, result.occlusion.copies) == (2, 1, 49)
    # Two images' 49 masked copies each went through the model's own batcher (the top-k rows too:
    # without the explain graph's cam, the model answers them).
    assert model.stats.items - before == 2 * 49 + 2


def test_one_broken_image_gets_its_error_and_the_others_their_maps(digits, digit_samples) -> None:
    images, _ = digit_samples
    files = [encode(images[0, 0]), b"not an image", encode(images[1, 0])]
    result = run(digits.dataplane.explain(ExplainRequest(files, methods=["cam", "occlusion"])))
    per_image = list(result.per_image())
    classified = run(digits.dataplane.classify(ClassifyRequest(files)))
    assert per_image[1] == (None, classified.errors[1])  # the same reason Classify gives
    assert per_image[0][0] is not None and per_image[2][0] is not None
    assert set(per_image[2][0].maps) == {"cam", "occlusion"}


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"methods": ["gradients"]}, "unknown explanation method"),
        ({"target": 10}, "class 10 is not one of the model's 10 classes"),
        ({"methods": ["occlusion"], "patch": 9}, "occlusion patch must be 1 to 8"),
        ({"methods": ["occlusion"], "stride": 0}, "occlusion stride must be 1 to 2 pixels"),
        ({"top_k": 0}, "top_k must be at least 1"),
        ({"methods": ["occlusion"], "patch": 2, "stride": 3}, "occlusion stride must be 1 to 2 pixels"),
    ],
)
def test_a_bad_explain_request_is_refused_with_its_reason(
    digits, digit_samples, request_fields, message
) -> None:
    images, _ = digit_samples
    with pytest.raises(InvalidInput, match=message):
        run(digits.dataplane.explain(ExplainRequest([encode(images[0, 0])], **request_fields)))


def test_a_model_without_explain_graph_offers_occlusion_and_says_why_not_cam(
    plain_repo, digit_samples
) -> None:
    images, _ = digit_samples
    local = open_local(plain_repo / "plain" / "1", RuntimeOptions(device="cpu"))
    try:
        (model,) = local.registry.ready()
        assert model.explain_methods == ("occlusion",)
        result = run(local.dataplane.explain(ExplainRequest([encode(images[0, 0])])))
        assert result.methods == ("occlusion",) and set(result.explanations[0].maps) == {"occlusion"}
        with pytest.raises(
            InvalidInput, match=r"no explain graph \(explain.onnx\), so no cam; it offers occlusion"
        ):
            run(local.dataplane.explain(ExplainRequest([encode(images[0, 0])], methods=["cam"])))
        with pytest.raises(InvalidInput, match="activation maps come from an explain graph"):
            run(local.dataplane.explain(ExplainRequest([encode(images[0, 0])], activations=True)))
    finally:
        run(local.close())


def test_occlusion_copies_are_bounded_per_request_and_count_against_the_input_budget(
    digits, digit_samples
) -> None:
    images, _ = digit_samples
    (model,) = digits.registry.ready()
    one = [encode(images[0, 0])]
    with ThreadPoolExecutor(1) as pool:
        few_copies = DataPlane(digits.registry, pool, Limits(max_explain_copies=48))
        with pytest.raises(InvalidInput, match=r"occlusion needs 49 masked copies per image, 49 for 1 image"):
            run(few_copies.explain(ExplainRequest(one, methods=["occlusion"])))
        assert run(few_copies.explain(ExplainRequest(one, methods=["cam"]))).explanations  # no copies: fine
        # A budget that holds the image but not its 49 copies: the classification passes, the
        # explanation is refused before anything is decoded.
        small = DataPlane(digits.registry, pool, budget=InputBudget(10 * model.row_nbytes))
        assert run(small.classify(ClassifyRequest(one))).count == 1
        with pytest.raises(InvalidInput, match="input budget"):
            run(small.explain(ExplainRequest(one, methods=["occlusion"])))
        assert small.budget.used == 0


# ---- a real server process ----


@pytest.fixture(scope="module")
def server(model_repo: Path, plain_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import start_server

    repo = tmp_path_factory.mktemp("both")
    shutil.copytree(model_repo / "digits", repo / "digits")
    shutil.copytree(plain_repo / "plain", repo / "plain")
    launched = start_server(repo, tmp_path_factory.mktemp("explain-server"), http=True)
    yield launched
    launched.stop()


@pytest.fixture(scope="module")
def png_files(digit_samples, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    images, _ = digit_samples
    folder = tmp_path_factory.mktemp("pngs")
    paths = []
    for i in range(3):
        paths.append(folder / f"digit{i}.png")
        paths[-1].write_bytes(encode(images[i, 0]))
    return paths


def test_explain_over_grpc_and_rest_give_the_same_answer(
    server, png_files, model_repo, digit_samples
) -> None:
    images, _ = digit_samples
    with ClassifierClient(server.address) as client:
        info = client.get_model("digits")
        assert list(info.explain_methods) == ["cam", "occlusion"]
        assert list(client.get_model("plain").explain_methods) == ["occlusion"]
        answer = client.explain(png_files, "digits", methods=["cam", "occlusion"], activations=True)
    expected = explain_graph_outputs(model_repo, images[:3])
    assert answer.model == "digits" and answer.version == 1 and list(answer.methods) == ["cam", "occlusion"]
    assert answer.occlusion.copies == 49
    for i, image in enumerate(answer.images):
        maps = {m.method: tensor_to_array(m.map) for m in image.maps}
        np.testing.assert_allclose(maps["cam"], expected["cam"][i, image.class_index], atol=1e-6)
        np.testing.assert_array_equal(tensor_to_array(image.model_input)[:, :, 0], images[i, 0])
        assert [tensor_to_array(b.maps).shape for b in image.blocks] == [(32, 8, 8), (64, 4, 4)]
        assert image.result.class_index[0] == image.class_index

    # The same request by curl: one image as the raw body, several as a multipart upload.
    url = f"{server.http_url}/v1/models/digits:explain"
    one = httpx.post(
        url, params={"method": ["cam", "occlusion"]}, content=png_files[0].read_bytes(), timeout=30
    )
    assert one.status_code == 200, one.text
    body = one.json()
    rest_maps = {
        m["method"]: np.frombuffer(base64.b64decode(m["map"]["data"]), "<f4").reshape(m["map"]["shape"])
        for m in body["images"][0]["maps"]
    }
    grpc_maps = {m.method: tensor_to_array(m.map) for m in answer.images[0].maps}
    for method in ("cam", "occlusion"):
        np.testing.assert_array_equal(rest_maps[method], grpc_maps[method])
    assert body["images"][0]["label"] == answer.images[0].label
    several = httpx.post(
        f"{server.http_url}/v1/models/digits/versions/1:explain",
        params={"class_index": "4", "activation_grids": "true"},
        files=[("image", (p.name, p.read_bytes(), "image/png")) for p in png_files],
        timeout=30,
    )
    assert several.status_code == 200, several.text
    explained = several.json()["images"]
    assert [e["class_index"] for e in explained] == [4, 4, 4]
    grid = base64.b64decode(explained[0]["blocks"][0]["grid_png"])
    assert grid.startswith(b"\x89PNG")
    zero = httpx.post(url, params={"class_index": "0"}, content=png_files[0].read_bytes(), timeout=30)
    assert zero.json()["images"][0]["class_index"] == 0  # written though it is the default value


@pytest.mark.parametrize(
    ("path", "params", "status", "message"),
    [
        ("/v1/models/digits:explain", {"method": "saliency"}, 400, "unknown explanation method"),
        ("/v1/models/plain:explain", {"method": "cam"}, 400, "no explain graph"),
        ("/v1/models/digits:explain", {"class_index": "x"}, 400, "class_index must be an integer"),
        ("/v1/models/digits:explain", {"activations": "maybe"}, 400, "activations must be true or false"),
        ("/v1/models/missing:explain", {}, 404, "missing"),
    ],
)
def test_rest_explain_errors_are_readable(server, png_files, path, params, status, message) -> None:
    reply = httpx.post(
        f"{server.http_url}{path}", params=params, content=png_files[0].read_bytes(), timeout=30
    )
    assert reply.status_code == status, reply.text
    assert message in reply.json()["error"]


def test_grpc_explain_errors_have_their_status(server, png_files) -> None:
    with ClassifierClient(server.address, retries=0) as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.explain(png_files[:1], "plain", methods=["cam"])
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "it offers occlusion" in refused.value.details()
        answer = client.explain([png_files[0], b"\x89PNG broken"], "digits")
        assert answer.images[1].result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert answer.images[0].maps[0].method == "cam"
    assert "Traceback" not in server.log()


def test_the_cli_writes_the_pictures(server, png_files, tmp_path) -> None:
    out = tmp_path / "why"
    server_flags = ["--server", server.address, "--model", "digits"]
    done = subprocess.run(
        [sys.executable, "-m", "serving", "explain", str(png_files[0]), "--out", str(out), *server_flags],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "explained class" in done.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "block1.png",
        "block2.png",
        "cam.npy",
        "cam.png",
        "explanation.json",
        "input.png",
        "occlusion.npy",
        "occlusion.png",
    ]
    with Image.open(out / "input.png") as picture:
        pixels = np.asarray(picture)
    zoom = pixels.shape[0] // 8
    with Image.open(png_files[0]) as original:
        expected = np.asarray(original)
    np.testing.assert_array_equal(pixels[::zoom, ::zoom], expected)  # the input, enlarged, exactly
    assert np.load(out / "cam.npy").shape == (8, 8)


def test_explanations_under_load_never_stop_classification(server, png_files) -> None:
    """16 clients loop on Classify while 2 loop on occlusion explanations of the same model: every
    call succeeds, classification keeps completing in every quarter second, explanations complete too.
    (That no classification row waits behind more than one batch of explanation rows is the batcher's
    own test; the p99 figures are the bench's.)"""
    stop = threading.Event()
    done: dict[str, list[float]] = {"classify": [], "explain": []}
    failures: list[str] = []
    payload = [png_files[0].read_bytes()]

    def loop(kind: str) -> None:
        with ClassifierClient(server.address, retries=0) as client:
            while not stop.is_set():
                try:
                    if kind == "classify":
                        client.classify(payload, "digits")
                    else:
                        client.explain(payload, "digits", methods=["occlusion"], occlusion_stride=1)
                    done[kind].append(time.monotonic())
                except grpc.RpcError as error:
                    failures.append(f"{kind}: {error.code().name} {error.details()}")

    threads = [threading.Thread(target=loop, args=("classify",)) for _ in range(16)]
    threads += [threading.Thread(target=loop, args=("explain",)) for _ in range(2)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(3.0)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert not failures, failures[:3]
    assert len(done["explain"]) >= 4, len(done["explain"])
    windows = np.histogram(done["classify"], bins=np.arange(started + 0.5, started + 3.0, 0.25))[0]
    assert windows.min() > 0, windows  # no quarter second (after the first half) without a classification


def test_occlusion_drops_survive_a_probability_that_rounds_to_one() -> None:
    """A confident calibrated model gives p = 1.0 in float32 with and without the patch; the drop is
    still there in the other classes' probabilities, and equals base - masked where that is exact."""
    from serving.core.occlusion import probability_drops

    base = np.array([1.0, 2e-9, 3e-9], dtype=np.float32)
    masked = np.array([[1.0, 5e-8, 3e-9], [1.0, 2e-9, 3e-9]], dtype=np.float32)
    assert (base[0] - masked[:, 0] == 0).all()  # what the naive drop sees
    drops = probability_drops(base, masked, 0)
    assert drops[0] == pytest.approx(48e-9, rel=1e-6) and drops[1] == 0
    plain = np.array([0.6, 0.3, 0.1], dtype=np.float32)
    covered = np.array([[0.2, 0.5, 0.3]], dtype=np.float32)
    assert probability_drops(plain, covered, 0)[0] == pytest.approx(0.4, abs=1e-6)


@pytest.mark.parametrize("methods", [["cam"], ["occlusion"], ["cam", "occlusion"]])
def test_explanations_carry_the_abstain_score_classify_gives(digits, digit_samples, methods) -> None:
    """The digits export serves the energy score, a model.onnx output the explain graph lacks: an
    explanation's score and flag are still Classify's, image by image (noise among them, flagged)."""
    images, _ = digit_samples
    noise = np.random.default_rng(3).integers(0, 256, size=(6, 8, 8), dtype=np.uint8)
    files = [encode(image) for image in [*images[:6, 0], *noise]]
    classified = run(digits.dataplane.classify(ClassifyRequest(files)))
    explained = run(digits.dataplane.explain(ExplainRequest(files, methods=methods)))
    scores = [float(s) for s in classified.scores]
    assert [e.score for e in explained.explanations] == pytest.approx(scores, rel=1e-6)
    assert [e.abstain for e in explained.explanations] == classified.abstain.tolist()
    assert max(scores) > 1.0  # the energy, not a probability
    assert any(classified.abstain[6:])
