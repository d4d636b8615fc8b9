"""`--shard INDEX/COUNT`: the shards of a scoring job are disjoint, cover every input and are stable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serving.tools.shard import parse_shard, select_shard, shard_of
from tests.conftest import ROOT, encode

path_lists = st.lists(st.text(min_size=1, max_size=40), max_size=200, unique=True)


@given(paths=path_lists, count=st.integers(min_value=1, max_value=17))
def test_shards_are_disjoint_and_cover_every_path(paths: list[str], count: int) -> None:
    shards = [select_shard(paths, index, count) for index in range(count)]
    assert sorted(p for shard in shards for p in shard) == sorted(paths)  # each path exactly once
    for shard in shards:
        assert shard == [p for p in paths if p in set(shard)]  # the listing's order is kept


@given(paths=path_lists, extra=path_lists, count=st.integers(min_value=1, max_value=9))
def test_a_path_keeps_its_shard_when_the_input_grows(paths: list[str], extra: list[str], count: int) -> None:
    grown = paths + [p for p in extra if p not in set(paths)]
    for index in range(count):
        assert set(select_shard(paths, index, count)) <= set(select_shard(grown, index, count))


def test_the_assignment_is_fixed_across_runs_and_machines() -> None:
    # A pod restarted elsewhere must pick the same files: the hash is SHA-256, never Python's hash().
    assert [shard_of(f"/data/in/{i}.png", 4) for i in range(8)] == [0, 0, 3, 0, 2, 3, 1, 2]
    code = "from serving.tools.shard import shard_of; print(shard_of('/data/in/0.png', 4))"
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONHASHSEED": "123"},
        check=True,
    )
    assert other.stdout.strip() == "0"


def test_shards_are_balanced_on_a_real_listing() -> None:
    paths = [f"/data/in/{label}/{i:05d}.png" for i in range(4000) for label in range(3)]
    sizes = [len(select_shard(paths, index, 8)) for index in range(8)]
    assert sum(sizes) == len(paths)
    assert max(sizes) < 1.15 * len(paths) / 8, sizes


@pytest.mark.parametrize(
    "spec", ["", "3", "1/", "/4", "a/4", "4/4", "5/4", "0/0", "-1/4", "1/-4", "1/2/3", "1.0/2"]
)
def test_a_bad_shard_is_refused_with_the_reason(spec: str) -> None:
    with pytest.raises(ValueError, match="--shard"):
        parse_shard(spec)


def test_good_shards_parse() -> None:
    assert parse_shard("0/1") == (0, 1)
    assert parse_shard("3/4") == (3, 4)
    with pytest.raises(ValueError):
        select_shard(["a"], 2, 2)


def score_job(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "serving", "score", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.slow
def test_score_jobs_with_every_shard_score_each_image_exactly_once(
    model_repo: Path, tmp_path: Path, digit_samples
) -> None:
    images = tmp_path / "images"
    for i, pixels in enumerate(digit_samples[0][:60]):
        folder = images / str(i % 3)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:03d}.png").write_bytes(encode(pixels))
    count = 3
    scored: list[list[str]] = []
    for index in range(count):
        out = tmp_path / f"shard-{index}.jsonl"
        job = score_job(
            str(images), "--out", str(out), "--local", str(model_repo), "--shard", f"{index}/{count}"
        )
        assert job.returncode == 0, job.stderr
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert all(line["error"] is None for line in lines)
        scored.append([line["path"] for line in lines])
        assert f"scored {len(lines)}, failed 0" in job.stdout
    every = sorted(str(p) for p in images.rglob("*.png"))
    assert sorted(p for shard in scored for p in shard) == every  # disjoint and covering
    assert all(scored), "with 60 images every one of 3 shards has work"
    bad = score_job(
        str(images), "--out", str(tmp_path / "x.jsonl"), "--local", str(model_repo), "--shard", "3/3"
    )
    assert bad.returncode == 2 and "--shard" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_score_refuses_an_input_with_no_images(model_repo: Path, tmp_path: Path, kind: str) -> None:
    source = tmp_path / "in"
    if kind == "empty":
        source.mkdir()
        (source / "notes.txt").write_text("no images here")
    job = score_job(str(source), "--out", str(tmp_path / "out.jsonl"), "--local", str(model_repo))
    assert job.returncode == 2, job.stdout + job.stderr
    assert str(source) in job.stderr
    assert ("no images" if kind == "empty" else "is not a folder") in job.stderr
    assert not (tmp_path / "out.jsonl").exists()
