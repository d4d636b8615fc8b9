"""The model repository on disk: `MODELS/<name>/<version>/model.onnx`.

Only folders named by a positive integer are versions, and names starting with `.` are skipped, so
a version copied in as `.tmp-3` or `3.partial` is invisible until it is renamed to `3`. `scan` also
gives each version a signature (size, modification time and inode of its files and of the model's
config.json): the poll loop loads a version only once its signature holds still across two scans,
and reloads it when the signature changes.

A version folder the server cannot read (permissions) is still a version: `scan` lists it with the
reason, the lifecycle makes that version UNAVAILABLE, and the model's other versions keep serving.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from serving.core.contract import SIDECAR_NAME
from serving.core.model import MODEL_FILE
from serving.models.settings import SETTINGS_FILE

# (size, mtime in ns, inode), None when the file is absent. The inode tells a file renamed into place
# even when its copy kept the old one's size and modification time (cp -p, rsync -a).
FileStamp = tuple[int, int, int] | None


@dataclass(frozen=True)
class VersionFiles:
    path: Path  # the version's model.onnx
    signature: tuple[FileStamp, ...]  # model.onnx, model.json, ../config.json
    problem: str = ""  # why the version's folder cannot be used (unreadable), relative to the repository


def is_version_name(name: str) -> bool:
    """A positive int64 in ASCII digits: `str.isdigit` also takes "²" (which `int` refuses) and "١"."""
    return len(name) <= 18 and name.isascii() and name.isdigit() and int(name) > 0


def stamp(path: Path) -> FileStamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def model_dirs(root: Path, only: str | None = None) -> list[Path]:
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (only is None or p.name == only)
    )


def version_dirs(model_dir: Path) -> dict[int, tuple[Path, str]]:
    """{version: (folder, problem)}: folders holding a model file, and those that cannot be looked into
    (with why, so that one unreadable folder costs that version only, not the whole model)."""
    found: dict[int, tuple[Path, str]] = {}
    for folder in model_dir.iterdir():
        if not is_version_name(folder.name):
            continue
        try:
            if folder.is_dir() and (folder / MODEL_FILE).is_file():
                found[int(folder.name)] = (folder, "")
        except OSError as error:  # e.g. PermissionError: a folder without read or search permission
            shown = folder.relative_to(model_dir.parent)
            found[int(folder.name)] = (folder, f"cannot read version folder {shown}: {describe(error)}")
    return found


def describe(error: OSError) -> str:
    """The system's words for `error` ('permission denied'), without the absolute path it names."""
    text = error.strerror or type(error).__name__
    return text[:1].lower() + text[1:]


def scan(root: Path, only: str | None = None) -> dict[str, dict[int, VersionFiles]]:
    """{name: {version: files}} for every published version under `root` (or of model `only`)."""
    found: dict[str, dict[int, VersionFiles]] = {}
    for model_dir in model_dirs(root, only):
        try:
            versions = version_dirs(model_dir)
        except OSError:  # the folder went away while we looked
            continue
        settings = stamp(model_dir / SETTINGS_FILE)
        found[model_dir.name] = {
            version: VersionFiles(
                folder / MODEL_FILE,
                (stamp(folder / MODEL_FILE), stamp(folder / SIDECAR_NAME), settings),
                problem,
            )
            for version, (folder, problem) in sorted(versions.items())
        }
    return {name: versions for name, versions in found.items() if versions}
