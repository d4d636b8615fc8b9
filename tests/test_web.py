"""The web page in a real browser (Debian's Chromium driven by Playwright) against a real server process,
with real PNG and JPEG files: what the page shows is checked against what the server and the CLI say.

Screenshots of the main states are written to the test's output folder (printed with `pytest -s`).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

from serving.core.contract import from_metadata
from serving.core.preprocess import image_to_input, open_image
from tests.conftest import ROOT, encode, start_server

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
TOKEN = "s3cret-page-token"
TOP_COLOUR = (255, 255, 160)  # the heat scale's top: serving.core.pictures.HEAT_STOPS and app.js


@pytest.fixture(scope="module")
def repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits (with its explain graph), plain (the same model without one) and broken (cannot load)."""
    repo = tmp_path_factory.mktemp("web-models")
    shutil.copytree(model_repo / "digits", repo / "digits")
    (repo / "plain" / "1").mkdir(parents=True)
    shutil.copy(model_repo / "digits" / "1" / "model.onnx", repo / "plain" / "1" / "model.onnx")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"this is not an ONNX file")
    return repo


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    launched = start_server(repo, tmp_path_factory.mktemp("web-server"), http=True)
    yield launched
    launched.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/system-deps.sh installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    # wait_for_function would evaluate strings, which the page's Content-Security-Policy forbids (as it
    # should): the tests wait with locators' expectations instead.
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


class Page:
    """A browser tab on the server's page that records console errors and uncaught exceptions."""

    def __init__(self, browser, url: str, shots: Path) -> None:
        self.tab = browser.new_page(viewport={"width": 1100, "height": 1300})
        self.errors: list[str] = []
        self.tab.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.tab.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.shots = shots
        self.tab.goto(url)

    def shot(self, name: str) -> Path:
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        self.tab.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    def models_loaded(self) -> None:
        self.tab.wait_for_selector("#models:not([hidden])")

    def choose(self, model: str, version: int = 1) -> None:
        self.tab.select_option("#model-select", f"{model}\n{version}")

    def upload(self, path: Path) -> None:
        self.tab.set_input_files("#file", str(path))

    def wait_answer(self, label: str | None = None) -> None:
        self.tab.wait_for_selector("#why:not([hidden])")
        if label is not None:
            expect(self.tab.locator("#explained")).to_contain_text(label)

    def canvas(self, element: str) -> np.ndarray:
        """A canvas's pixels as the page holds them: (height, width, 4) uint8."""
        data = self.tab.evaluate(
            """id => { const c = document.getElementById(id);
                     const d = c.getContext('2d').getImageData(0, 0, c.width, c.height);
                     return {w: c.width, h: c.height, data: Array.from(d.data)}; }""",
            element,
        )
        return np.array(data["data"], dtype=np.uint8).reshape(data["h"], data["w"], 4)

    def top_label(self) -> str:
        return self.tab.inner_text("#classes li:first-child button")

    def close(self) -> None:
        self.tab.close()


@pytest.fixture
def page(browser, server, tmp_path: Path) -> Iterator[Page]:
    tab = Page(browser, f"{server.http_url}/", tmp_path / "screenshots")
    yield tab
    tab.close()


@pytest.fixture(scope="module")
def files(digit_samples, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    images, _ = digit_samples
    folder = tmp_path_factory.mktemp("web-files")
    out = {}
    out["png"] = folder / "digit.png"
    out["png"].write_bytes(encode(images[0, 0]))
    # A JPEG of another size and in colour: the server resizes and converts it to the model's 8x8 grey.
    big = np.kron(images[1, 0], np.ones((5, 4), dtype=np.uint8))
    out["jpeg"] = folder / "digit.jpg"
    out["jpeg"].write_bytes(encode(np.stack([big, big // 2, big], axis=-1), "JPEG"))
    out["broken"] = folder / "broken.png"
    out["broken"].write_bytes(b"\x89PNG\r\n\x1a\n this file is cut short")
    return out


def cli_top_label(server, path: Path) -> str:
    command = [sys.executable, "-m", "serving", "classify", str(path), "--json"]
    command += ["--server", server.address, "--model", "digits"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)[0]["top_k"][0]["label"]


def rest_explain(server, path: Path, method: str, **params: str) -> tuple[dict, np.ndarray]:
    reply = httpx.post(
        f"{server.http_url}/v1/models/digits/versions/1:explain",
        params={"method": method, **params},
        content=path.read_bytes(),
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    image = reply.json()["images"][0]
    (heat,) = image["maps"]
    values = np.frombuffer(base64.b64decode(heat["map"]["data"]), "<f4").reshape(heat["map"]["shape"])
    return image, values


def test_an_uploaded_image_gets_the_same_top_class_as_the_cli(page: Page, server, files) -> None:
    page.models_loaded()
    page.choose("digits")
    for kind in ("png", "jpeg"):
        page.upload(files[kind])
        expected = cli_top_label(server, files[kind])
        page.wait_answer(f"“{expected}”")
        assert page.top_label() == expected, kind
        assert page.tab.get_attribute("#classes li:first-child button", "aria-pressed") == "true"
        page.shot(f"classified-{kind}")
    assert "Server:" in page.tab.inner_text("#timings") and " ms" in page.tab.inner_text("#timings")
    assert "compute" in page.tab.inner_text("#timings")  # the answer's receipt, drawn from its body
    assert not page.errors, page.errors


def test_the_model_input_canvas_holds_the_servers_own_pixels(page: Page, server, files, repo) -> None:
    """The JPEG is 40 x 32 in colour: the canvas must hold the 8 x 8 grey pixels the data plane made."""
    import onnxruntime as ort

    page.models_loaded()
    page.choose("digits")
    page.upload(files["jpeg"])
    page.wait_answer()
    session = ort.InferenceSession(str(repo / "digits" / "1" / "model.onnx"))
    contract = from_metadata(session.get_modelmeta().custom_metadata_map)
    row = image_to_input(open_image(files["jpeg"].read_bytes()), contract)  # the data plane's tensor
    expected = np.rint(row[0] / np.float32(contract.scale)).astype(np.uint8)
    seen = page.canvas("seen")
    assert seen.shape == (8, 8, 4)
    for channel in range(3):
        np.testing.assert_array_equal(seen[:, :, channel], expected)
    assert not page.errors, page.errors


@pytest.mark.parametrize("method", ["cam", "occlusion"])
def test_the_heat_maps_hottest_pixel_is_the_arrays_maximum(page: Page, server, files, method: str) -> None:
    page.models_loaded()
    page.choose("digits")
    page.upload(files["png"])
    page.wait_answer()
    page.tab.check(f"input[name=method][value={method}]")
    expect(page.tab.locator("#heat")).to_have_attribute("data-method", method)
    explained = page.tab.inner_text("#explained")
    image, values = rest_explain(server, files["png"], method)
    assert f"“{image['label']}”" in explained
    heat = page.canvas("heat")
    hottest_on_page = set(zip(*np.nonzero((heat[:, :, :3] == TOP_COLOUR).all(axis=2)), strict=True))
    hottest_in_array = set(zip(*np.nonzero(values == values.max()), strict=True))
    assert hottest_on_page == hottest_in_array, (hottest_on_page, hottest_in_array)
    assert float(page.tab.get_attribute("#heat", "data-max")) == pytest.approx(float(values.max()), rel=1e-6)
    # The opacity slider changes how strongly the map covers the image.
    page.tab.fill("#opacity", "20")
    assert page.tab.evaluate("getComputedStyle(document.getElementById('heat')).opacity") == "0.2"
    page.shot(f"why-{method}")
    assert not page.errors, page.errors


def test_another_class_is_explained_with_the_keyboard_alone(page: Page, files) -> None:
    page.models_loaded()
    page.choose("digits")
    page.upload(files["png"])
    page.wait_answer()
    second = page.tab.inner_text("#classes li:nth-child(2) button")
    for _ in range(40):  # Tab through the page to the second class's button
        page.tab.keyboard.press("Tab")
        focused = page.tab.evaluate("document.activeElement.textContent")
        if page.tab.evaluate("document.activeElement.classList.contains('class')") and focused == second:
            break
    else:
        pytest.fail("the class buttons cannot be reached with Tab")
    page.tab.keyboard.press("Enter")
    page.wait_answer(f"“{second}”")
    assert page.tab.get_attribute("#classes li:nth-child(2) button", "aria-pressed") == "true"
    assert not page.errors, page.errors


def test_a_broken_file_shows_the_servers_error(page: Page, server, files) -> None:
    page.models_loaded()
    page.choose("digits")
    page.upload(files["broken"])
    page.tab.wait_for_selector("#error:not([hidden])")
    reply = httpx.post(f"{server.http_url}/v1/models/digits:classify", content=files["broken"].read_bytes())
    assert reply.status_code == 400
    shown = page.tab.inner_text("#error")
    assert shown == reply.json()["error"], (shown, reply.text)
    assert page.tab.is_hidden("#result")
    page.shot("broken-file")
    # The failed request is the browser's only console line: the page itself raised nothing.
    assert all("status of 400" in e for e in page.errors), page.errors


def test_models_show_their_states_and_a_failed_model_its_reason(page: Page, server) -> None:
    page.models_loaded()
    listed = httpx.get(f"{server.http_url}/v1/models").json()["models"]
    broken = next(m for m in listed if m["name"] == "broken")
    row = page.tab.locator("#models tr[data-model=broken]")
    assert "UNAVAILABLE" in row.inner_text() and broken["reason"] in row.inner_text()
    digits = page.tab.locator("#models tr[data-model=digits]").inner_text()
    assert "READY" in digits and "8 × 8 greyscale, stretch" in digits and "dataset digits" in digits
    assert "cam, occlusion" in digits
    options = page.tab.locator("#model-select option").all_inner_texts()
    assert options == ["digits version 1", "plain version 1"]  # only what can answer
    page.shot("models")
    assert not page.errors, page.errors


def test_a_model_without_explain_graph_greys_out_cam_and_says_why(page: Page, files) -> None:
    page.models_loaded()
    page.choose("plain")
    assert page.tab.is_disabled("input[name=method][value=cam]")
    assert "no explain graph" in page.tab.inner_text("#methods-why")
    page.upload(files["png"])
    page.wait_answer()
    assert page.tab.get_attribute("#heat", "data-method") == "occlusion"
    assert "no explain graph" in page.tab.inner_text("#blocks")
    assert not page.errors, page.errors


def test_with_tokens_the_page_asks_once_and_works_with_the_right_one(
    browser, repo, files, tmp_path: Path
) -> None:
    token_file = tmp_path / "tokens.txt"
    token_file.write_text(f"{TOKEN}\n")
    guarded = start_server(repo, tmp_path / "guarded", "--auth-token-file", str(token_file), http=True)
    page = Page(browser, f"{guarded.http_url}/", tmp_path / "screenshots")
    try:
        page.tab.wait_for_selector("#token-panel:not([hidden])")
        assert "asks for a bearer token" in page.tab.inner_text("#token-why")
        assert page.tab.is_hidden("#models")
        page.shot("token-asked")
        page.tab.fill("#token-input", "wrong-token")
        page.tab.press("#token-input", "Enter")
        expect(page.tab.locator("#token-why")).to_contain_text("refused")
        page.tab.fill("#token-input", TOKEN)
        page.tab.press("#token-input", "Enter")
        page.models_loaded()
        assert page.tab.is_hidden("#token-panel")
        assert TOKEN not in page.tab.url
        assert page.tab.evaluate("sessionStorage.getItem('convserve-token')") == TOKEN
        page.choose("digits")
        page.upload(files["png"])
        page.wait_answer()
        assert page.top_label()
        # The refusals (401 without a token, 403 for the wrong one) are the browser's only console lines.
        assert all("status of 401" in e or "status of 403" in e for e in page.errors), page.errors
    finally:
        page.close()
        guarded.stop()


def test_the_page_is_served_with_its_files_and_a_strict_policy(server) -> None:
    index = httpx.get(f"{server.http_url}/")
    assert index.status_code == 200 and "text/html" in index.headers["content-type"]
    assert "default-src 'self'" in index.headers["content-security-policy"]
    assert "http://" not in index.text and "https://" not in index.text  # nothing fetched from elsewhere
    for name in ("app.js", "style.css"):
        asset = httpx.get(f"{server.http_url}/web/{name}")
        assert asset.status_code == 200 and "https://" not in asset.text
    assert httpx.get(f"{server.http_url}/web/secret.py").status_code == 404


def test_the_readme_shows_a_screenshot_of_the_page() -> None:
    picture = ROOT / "docs" / "images" / "web-page.png"
    assert f"]({picture.relative_to(ROOT)})" in (ROOT / "README.md").read_text()
    with Image.open(io.BytesIO(picture.read_bytes())) as image:
        assert image.format == "PNG" and image.width >= 600
    assert picture.stat().st_size < 300_000


def test_the_demo_ends_with_the_pages_address(model_repo: Path, digits_run: Path, tmp_path: Path) -> None:
    command = [sys.executable, "scripts/demo.py", "--models", str(model_repo), "--run", str(digits_run)]
    command += ["--images", str(tmp_path / "digits")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-2]  # then "server stopped with exit code 0"
    assert last.startswith("the web page was at http://127.0.0.1:") and "make demo-web" in last, last
