"""The committed stubs must be exactly what the generator makes from the .proto sources."""

from __future__ import annotations

from pathlib import Path

from protos.generate import ROOT, generate


def test_committed_stubs_match_the_proto_sources(tmp_path: Path) -> None:
    generated = generate(tmp_path)
    assert generated, "the generator produced nothing"
    for path in generated:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is not committed: run `make protos`"
        assert committed.read_text() == path.read_text(), (
            f"{committed} drifted from its .proto: run `make protos`"
        )
