"""The house's rooms import one way: core ← models ← protocols ← server; clients and tools apart."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

SERVING = ROOT / "serving"


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def files(room: str) -> list[Path]:
    return sorted((SERVING / room).rglob("*.py"))  # packages inside a room (tools' bench, score) too


# room -> module prefixes its files must not import
FORBIDDEN = {
    "core": (
        "grpc",
        "google.protobuf",
        "protos",
        "serving.models",
        "serving.protocols",
        "serving.server",
        "serving.config",
        "serving.client",
        "serving.tools",
        "torch",
    ),
    "models": (
        "grpc",
        "protos",
        "serving.protocols",
        "serving.server",
        "serving.config",
        "serving.client",
        "serving.tools",
        "torch",
    ),
    "protocols": ("serving.server", "serving.config", "serving.client", "serving.tools", "torch"),
    "client": (
        "serving.core",
        "serving.models",
        "serving.protocols",
        "serving.server",
        "serving.config",
        "serving.tools",
        "torch",
    ),
    "tools": ("serving.core", "serving.protocols", "serving.server", "serving.config", "torch"),
}
# The in-process tools reach a model through the data plane's public entry, and nothing else of models.
ALLOWED = {
    "tools": {
        "serving.models.local",
        "serving.core.errors",
        "serving.core.types",
        "serving.core.runtime",
        "serving.core.pictures",  # a leaf (numpy, Pillow): the run report's drawing code
    }
}


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_rooms_import_one_way(room: str) -> None:
    assert files(room), f"serving/{room} is empty"
    for path in files(room):
        for module in imports_of(path):
            if module in ALLOWED.get(room, set()):
                continue
            bad = [p for p in FORBIDDEN[room] if module == p or module.startswith(p + ".")]
            assert not bad, f"{path.relative_to(ROOT)} imports {module}"
        if room == "tools":
            models = {m for m in imports_of(path) if m.startswith("serving.models")}
            assert models <= ALLOWED["tools"], f"{path.relative_to(ROOT)} imports {models}"


def test_config_is_a_leaf_and_training_sees_only_the_contract() -> None:
    config = {m for m in imports_of(SERVING / "config.py") if m.startswith("serving")}
    assert config <= {"serving.core", "serving.core.defaults", "serving.tokens"}, config
    # The token file's format is shared by the server, its config and the clients: a leaf.
    assert not {m for m in imports_of(SERVING / "tokens.py") if m.startswith("serving")}
    # Training shares the contract with the server, and the one version (a leaf) for --version.
    for path in sorted((ROOT / "training").glob("*.py")):
        serving = {m for m in imports_of(path) if m.startswith("serving")}
        allowed = {"serving.core.contract", "serving.core.pictures", "serving.core.version"}
        assert serving <= allowed, f"{path.relative_to(ROOT)} imports {serving}"
    assert not {m for m in imports_of(SERVING / "core" / "version.py") if m.startswith("serving")}


MAX_MODULE_LINES = 450


def test_no_hand_written_module_holds_several_jobs_past_450_lines() -> None:
    """One job per module: past this size a module has, so far every time, held two. The generated
    protobuf stubs and the tests (one file per behaviour under test) are not counted."""
    rooms = ("serving", "training", "scripts", "benchmarks", "protos")
    modules = [p for room in rooms for p in (ROOT / room).rglob("*.py") if "_pb2" not in p.name]
    assert len(modules) > 50
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in modules}
    assert {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES} == {}
