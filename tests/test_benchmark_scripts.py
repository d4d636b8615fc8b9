"""The scripts in benchmarks/ and scripts/ are run by hand, not by the tests: every name they import
from the project must still exist, or a module split breaks them unseen."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPTS = sorted([*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "scripts").glob("*.py")])
PROJECT = ("serving", "training", "protos")


def project_imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) for every `from serving... import name` and `import serving...`, at any depth."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in PROJECT:
                found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] in PROJECT]
    return found


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_project_name_a_script_imports_exists(path: Path) -> None:
    for module_name, name in project_imports(path):
        if module_name.startswith("training"):
            pytest.importorskip("torch")
        module = importlib.import_module(module_name)
        if name is not None and not hasattr(module, name):
            importlib.import_module(f"{module_name}.{name}")  # a submodule is a name too


def test_the_scripts_import_the_project_at_all() -> None:
    assert sum(bool(project_imports(p)) for p in SCRIPTS) >= 4
