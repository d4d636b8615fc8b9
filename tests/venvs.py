"""Virtual environments that tests build for tools which cannot share the dev environment.

Each is built once under `.cache/` (ignored by git), keyed by what it installs, and reused. When one
cannot be built the test skips on a developer's machine and fails on CI (CI=true).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

CACHE = ROOT / ".cache"


def missing(reason: str) -> None:
    """A tool a test needs is absent: fail on CI, skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def venv(
    name: str, *requirements: str, key: str = "", must_install: bool = False, timeout: float = 600
) -> Path:
    """The path of a venv holding `requirements` (pip arguments), built on first use.

    With `must_install` a failed install fails the test everywhere: installing is what it checks.
    """
    digest = hashlib.sha256("\n".join((*requirements, key)).encode()).hexdigest()[:12]
    path = CACHE / f"{name}-{digest}"
    if (path / ".ready").exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    done = subprocess.run(
        [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", *requirements],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        if must_install:
            pytest.fail(f"pip could not install {requirements}: {done.stderr[-3000:]}")
        missing(f"cannot build the {name} environment: {done.stderr[-2000:]}")
    (path / ".ready").touch()
    return path
