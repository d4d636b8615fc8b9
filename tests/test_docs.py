"""The docs: the generated reference pages are current, the README is short and its links resolve, the
site builds in strict mode, and what the reference pages say matches a real server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.convserve.v1 import convserve_pb2 as pb
from protos.convserve.v1 import convserve_pb2_grpc as pb_grpc
from tests.conftest import ROOT, encode

REFERENCE = ROOT / "docs" / "reference"
REFRESH = "make docs (or: python -m scripts.docs_reference)"
README_MAX_LINES = 150
LINK = re.compile(r"\]\(([^)\s]+)\)")


def generate(out: Path, **env: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "scripts.docs_reference", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        check=True,
        capture_output=True,
        timeout=120,
    )


def test_generated_reference_pages_are_current(tmp_path: Path) -> None:
    # The page must not depend on the machine: a client default from the environment and a narrow
    # terminal would otherwise change the CLI's --help.
    generate(tmp_path, CONVSERVE_SERVER="elsewhere:1", COLUMNS="40")
    fresh = {path.name: path.read_text() for path in tmp_path.glob("*.md")}
    committed = {path.name: path.read_text() for path in REFERENCE.glob("*.md")}
    assert set(fresh) >= {"config.md", "metrics.md", "model-json.md", "errors.md", "cli.md"}
    missing = sorted(set(fresh) - set(committed))
    assert not missing, f"docs/reference/ lacks {missing}: run {REFRESH}"
    extra = sorted(set(committed) - set(fresh))
    assert not extra, f"docs/reference/ holds pages no code generates, {extra}: delete them or run {REFRESH}"
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"stale generated pages docs/reference/{stale}: run {REFRESH}"


def test_a_changed_field_shows_up_as_a_stale_page(tmp_path: Path) -> None:
    """The comparison above can fail: a page generated from a config with one more flag differs."""
    from scripts import docs_reference
    from serving.config import ServerConfig

    before = docs_reference.config_page()
    fields = ServerConfig.model_fields
    name, field = "poll_s", fields["poll_s"]
    original = field.description
    try:
        field.description = "a description the committed page does not have"
        after = docs_reference.config_page()
    finally:
        field.description = original
    assert before == (REFERENCE / "config.md").read_text()
    assert after != before and "a description the committed page does not have" in after, name


def test_every_config_field_is_a_row_with_its_flag_and_variable() -> None:
    from serving.config import ServerConfig, env_name, flag

    page = (REFERENCE / "config.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| `--")]
    assert len(rows) == len(ServerConfig.model_fields)
    for row, name in zip(rows, ServerConfig.model_fields, strict=True):
        assert row.startswith(f"| `{flag(name)}`") and f"`{env_name(name)}`" in row


def test_every_contract_field_has_a_meaning() -> None:
    from serving.core.contract import FIELD_MEANINGS, FIELDS

    assert set(FIELD_MEANINGS) == set(FIELDS)
    assert all(text.strip() for text in FIELD_MEANINGS.values())


def test_the_error_page_has_every_domain_error_its_code_and_http_status() -> None:
    from scripts.docs_reference import http_status
    from serving.protocols.status import STATUS_OF

    page = (REFERENCE / "errors.md").read_text()
    for error, (code, http) in STATUS_OF.items():
        row = rf"^\| `{error.__name__}` \| `{code.name}` \| {re.escape(http_status(http))} \|"
        assert re.search(row, page, re.MULTILINE), error
    assert "| anything else | `INTERNAL` | 500 Internal Server Error |" in page


def test_the_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def relative_links(markdown: str) -> list[str]:
    targets = []
    for target in LINK.findall(markdown):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        targets.append(target.split("#", 1)[0])
    return targets


def test_every_relative_link_in_the_readme_resolves() -> None:
    readme = (ROOT / "README.md").read_text()
    links = relative_links(readme)
    assert len(links) >= 10  # the README links into the docs
    broken = sorted({link for link in links if not (ROOT / link).exists()})
    assert not broken, f"README.md links to paths that do not exist: {broken}"


def test_every_figure_in_the_readme_links_to_the_benchmark_file_holding_it() -> None:
    readme = (ROOT / "README.md").read_text()
    for paragraph in readme.split("\n\n"):
        figures = re.findall(r"\*\*(\d[\d,.]*)×\*\*|(\d[\d,]{3,}) images/s", paragraph)
        if not figures:
            continue
        sources = [link for link in relative_links(paragraph) if link.startswith("benchmarks/")]
        assert sources, f"figures without a benchmark file: {paragraph[:80]}…"
        held = "".join((ROOT / source).read_text() for source in sources)
        for ratio, rate in figures:
            assert (ratio and f"{ratio}×" in held) or (rate and rate.replace(",", "") in held), ratio or rate


def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    """What `make lint` runs: a broken link, a missing anchor or a nav entry without a page fails it."""
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()


def test_the_strict_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# x\n\n[gone](nowhere.md)\n")
    (tmp_path / "mkdocs.yml").write_text((ROOT / "mkdocs.yml").read_text().split("\nnav:")[0] + "\n")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict"],
        cwd=tmp_path,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode != 0 and "nowhere.md" in build.stderr


@pytest.mark.slow
def test_the_metrics_page_lists_what_a_real_server_serves(
    server_factory, model_repo: Path, digit_samples
) -> None:
    server = server_factory(model_repo, metrics=True)
    with grpc.insecure_channel(server.address) as channel:
        request = pb.ClassifyRequest(images=[pb.Image(encoded=encode(digit_samples[0][0]))])
        pb_grpc.ClassifierStub(channel).Classify(request, timeout=30)
    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=10) as response:
        served = [
            family
            for family in text_string_to_metric_families(response.read().decode())
            if family.name.startswith("convserve_")
        ]
    page = (REFERENCE / "metrics.md").read_text()
    rows = {
        match.group(1): (match.group(2), match.group(3))
        for match in re.finditer(r"^\| `(\w+)` \| (\w+) \| ([^|]*) \|", page, re.MULTILINE)
    }
    assert len(served) == len(rows)
    for family in served:
        name = family.name + ("_total" if family.type == "counter" else "")
        assert name in rows, f"{name} is served but not on docs/reference/metrics.md"
        kind, labels = rows[name]
        assert kind == family.type, name
        served_labels = {
            label for sample in family.samples for label in sample.labels if label not in ("le", "quantile")
        }
        assert served_labels == ({label.strip() for label in labels.split(",")} - {"—"}), name
