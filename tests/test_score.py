"""The scoring job end to end: real files, real servers, kills halfway, failover between servers."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, encode

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def image_folder(digit_samples, tmp_path_factory) -> Path:
    """1,200 real digit PNGs and JPEGs in nested folders, plus two broken files."""
    root = tmp_path_factory.mktemp("images")
    images, labels = digit_samples
    rng = np.random.default_rng(0)
    for i in range(1200):
        pixels = images[i % len(images)]
        if i >= len(images):  # more distinct images: the same digits with a little noise
            pixels = np.clip(pixels.astype(int) + rng.integers(-20, 20, pixels.shape), 0, 255).astype(
                np.uint8
            )
        folder = root / f"class_{labels[i % len(labels)]}" / ("jpeg" if i % 5 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        fmt = "JPEG" if i % 5 == 0 else "PNG"
        (folder / f"{i:05d}.{fmt.lower()}").write_bytes(encode(pixels, fmt))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "class_1" / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image: not picked up from a folder")
    return root


def run_score(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "serving", "score", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def start_score(*args: str) -> subprocess.Popen:
    """A scoring job left running, to be killed or waited for by the test."""
    command = [sys.executable, "-m", "serving", "score", *args]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_jsonl(path: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    by_path = {line["path"]: line for line in lines}
    assert len(by_path) == len(lines), "an image was scored twice"
    return by_path


def assert_same_results(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert a.keys() == b.keys()
    for path in a:
        assert a[path]["error"] == b[path]["error"], path
        assert [t["index"] for t in a[path]["top_k"]] == [t["index"] for t in b[path]["top_k"]], path
        got = [t["probability"] for t in a[path]["top_k"]]
        np.testing.assert_allclose(got, [t["probability"] for t in b[path]["top_k"]], rtol=1e-5, atol=1e-7)


def test_scoring_through_the_server_matches_local(image_folder, model_repo, digits_server, tmp_path) -> None:
    served = run_score(
        str(image_folder), "--out", str(tmp_path / "served.jsonl"), "--server", digits_server.address
    )
    local = run_score(str(image_folder), "--out", str(tmp_path / "local.jsonl"), "--local", str(model_repo))
    assert served.returncode == 0, served.stderr
    assert local.returncode == 0, local.stderr
    assert "scored 1200, failed 2, skipped 0" in served.stdout
    results = read_jsonl(tmp_path / "served.jsonl")
    assert_same_results(results, read_jsonl(tmp_path / "local.jsonl"))
    assert len(results) == 1202 and not any(p.endswith(".txt") for p in results)
    assert "cannot read image header" in results[str(image_folder / "broken.png")]["error"]
    assert results[str(image_folder / "class_1" / "empty.jpg")]["error"] == "empty image data"
    correct = [
        r["top_k"][0]["label"] == Path(p).parent.name.removeprefix("class_")
        for p, r in results.items()
        if "jpeg" not in p and r["top_k"]
    ]
    assert np.mean(correct) > 0.9


def test_csv_output_and_list_file_input(image_folder, digits_server, tmp_path) -> None:
    paths = sorted(str(p) for p in image_folder.glob("class_*/*.png"))[:50]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([*paths, str(tmp_path / "missing.png")]) + "\n")
    out = tmp_path / "out.csv"
    done = run_score(
        str(listing), "--out", str(out), "--server", digits_server.address, "--top-k", "3", "--fail-on-error"
    )
    assert done.returncode == 1, "--fail-on-error: one file is missing"
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 51
    assert list(rows[0])[:5] == ["path", "error", "index_1", "label_1", "probability_1"]
    by_path = {r["path"]: r for r in rows}
    assert "cannot read file" in by_path[str(tmp_path / "missing.png")]["error"]
    ok = by_path[paths[0]]
    assert ok["error"] == "" and 0 < float(ok["probability_1"]) <= 1 and ok["label_3"] != ""


def wait_for_lines(out: Path, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (not out.exists() or out.read_text().count("\n") < count) and time.monotonic() < deadline:
        time.sleep(0.02)


def test_resume_after_kill_loses_and_repeats_nothing(
    image_folder, model_repo, server_factory, tmp_path
) -> None:
    server = server_factory(model_repo, "--max-batch-size", "1")
    out = tmp_path / "out.jsonl"
    job = start_score(
        str(image_folder),
        "--out",
        str(out),
        "--server",
        server.address,
        "--batch",
        "2",
        "--inflight",
        "4",
        "--streams",
        "1",
    )
    wait_for_lines(out, 100)
    job.send_signal(signal.SIGKILL)
    job.wait()
    written = out.read_text().count("\n")
    assert 100 <= written < 1202, "the job must be killed halfway"
    with out.open("a") as f:
        f.write('{"path": "/half/written')  # a line cut off by the kill
    again = run_score(str(image_folder), "--out", str(out), "--server", server.address)
    assert again.returncode == 0, again.stderr
    assert f"skipped {written}" in again.stdout
    assert len(read_jsonl(out)) == 1202


def test_two_servers_one_killed_mid_job(image_folder, model_repo, server_factory, tmp_path) -> None:
    first = server_factory(model_repo, "--max-batch-size", "1")
    second = server_factory(model_repo, "--max-batch-size", "1")
    out = tmp_path / "out.jsonl"
    servers = ["--server", first.address, "--server", second.address]
    job = start_score(str(image_folder), "--out", str(out), *servers, "--batch", "4", "--inflight", "32")
    wait_for_lines(out, 200)
    first.process.send_signal(signal.SIGKILL)
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 0, stderr
    assert "scored 1200, failed 2" in stdout
    assert len(read_jsonl(out)) == 1202  # every image once
    assert "re-sending" in stderr or "failed (UNAVAILABLE" in stderr


def test_no_server_is_a_failed_job(image_folder, tmp_path) -> None:
    done = run_score(str(image_folder), "--out", str(tmp_path / "o.jsonl"), "--server", "127.0.0.1:1")
    assert done.returncode == 1
    assert "no server could score" in done.stderr


def test_bad_input_is_exit_2(tmp_path) -> None:
    done = run_score(str(tmp_path / "nothing-here"), "--out", str(tmp_path / "o.jsonl"))
    assert done.returncode == 2 and "is not a folder, a glob, a list file" in done.stderr


@pytest.mark.parametrize("depth", ["model", "version"])
def test_local_takes_a_model_or_version_folder(image_folder, model_repo, tmp_path, depth) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in sorted(image_folder.glob("class_*/*.png"))[:20]))
    folder = model_repo / "digits" if depth == "model" else model_repo / "digits" / "1"
    done = run_score(str(listing), "--out", str(tmp_path / "o.jsonl"), "--local", str(folder))
    assert done.returncode == 0, done.stderr
    assert "scored 20, failed 0" in done.stdout


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_file_names_that_are_not_utf8_are_written_and_resumed(
    digit_samples, model_repo, tmp_path, fmt
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    names = [b"caf\xe9.png", b"\xff\xfe.png", "ünïcode.png".encode(), b"plain.png"]
    for i, name in enumerate(names):
        (folder / os.fsdecode(name)).write_bytes(encode(digit_samples[0][i]))
    out = tmp_path / f"out.{fmt}"
    first = run_score(str(folder), "--out", str(out), "--local", str(model_repo))
    assert first.returncode == 0, first.stderr
    assert "scored 4, failed 0" in first.stdout
    again = run_score(str(folder), "--out", str(out), "--local", str(model_repo))
    assert again.returncode == 0, again.stderr
    assert "scored 0, failed 0, skipped 4" in again.stdout
    text = out.read_bytes()
    if fmt == "csv":  # the path column holds each file's real name, byte for byte
        assert all(name in text for name in names)
    else:  # valid UTF-8 JSON; undecodable bytes escaped, read back to the same name
        written = {json.loads(line)["path"] for line in text.decode("utf-8").splitlines()}
        assert written == {str(folder / os.fsdecode(name)) for name in names}


def noise_png(side: int, seed: int) -> bytes:
    """An RGB PNG of random noise: it does not compress, so its size is about 3 * side * side bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(pixels)


@pytest.fixture
def large_files(tmp_path) -> tuple[Path, Path]:
    """20 noise PNGs of about 300 KiB (16 of them, the default --batch, make a 4.7 MiB message) and one
    of about 1.4 MiB: against a server started with --max-message-mb 1."""
    folder = tmp_path / "large"
    folder.mkdir()
    for i in range(20):
        (folder / f"photo_{i:02d}.png").write_bytes(noise_png(320, i))
    big = folder / "huge.png"
    big.write_bytes(noise_png(700, 99))
    assert big.stat().st_size > 1024 * 1024
    return folder, big


@pytest.mark.parametrize("told", [True, False], ids=["flag", "learned-from-the-server"])
def test_messages_are_packed_under_the_servers_limit(
    large_files, model_repo, server_factory, tmp_path, told
) -> None:
    folder, big = large_files
    server = server_factory(model_repo, "--max-message-mb", "1")
    out = tmp_path / "out.jsonl"
    flag = ["--max-message-mb", "1"] if told else []  # untold: the job follows the server's refusal
    done = run_score(str(folder), "--out", str(out), "--server", server.address, *flag)
    assert done.returncode == 0, done.stderr
    assert "scored 20, failed 1, skipped 0" in done.stdout
    results = read_jsonl(out)
    assert len(results) == 21
    assert "message limit of 1 MiB" in results[str(big)]["error"]
    assert all(r["top_k"] and r["error"] is None for p, r in results.items() if p != str(big))
    assert "failed (RESOURCE_EXHAUSTED" not in done.stderr, "a refusal for size is not an outage"
    if not told:
        assert "packing messages under 1048576 bytes" in done.stderr
    again = run_score(str(folder), "--out", str(out), "--server", server.address, *flag)
    assert again.returncode == 0, again.stderr
    assert "scored 0, failed 0, skipped 21" in again.stdout


def test_non_regular_files_are_skipped_with_a_line(digit_samples, model_repo, tmp_path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    good = folder / "good.png"
    good.write_bytes(encode(digit_samples[0][0]))
    fifo = folder / "pipe.png"
    os.mkfifo(fifo)
    dangling = folder / "dangling.png"
    dangling.symlink_to(folder / "gone.png")
    loop = folder / "loop.png"
    loop.symlink_to(loop)
    expected = {
        str(good): None,
        str(fifo): "skipped: not a regular file (a FIFO)",
        str(dangling): "skipped: dangling symbolic link",
        str(loop): "skipped: symbolic link loop",
    }
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(expected) + "\n")
    for source in (str(listing), str(folder)):  # a list file names them; a folder walk finds them
        out = tmp_path / f"out-{len(source)}.jsonl"
        done = run_score(source, "--out", str(out), "--local", str(model_repo), timeout=60)
        assert done.returncode == 0, done.stderr
        assert "scored 1, failed 3" in done.stdout
        assert {p: r["error"] for p, r in read_jsonl(out).items()} == expected
