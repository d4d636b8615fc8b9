"""Which files a job scores: paths from a folder, a glob, a list file or stdin, and whether each is a
regular file that can be read (a FIFO would block the job for ever)."""

from __future__ import annotations

import errno
import glob
import os
import stat
import sys
from pathlib import Path

from serving.tools.score.errors import ScoreError

FILE_KINDS = {  # what a path that is not a regular file is, for its line
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a directory",
}


def image_suffixes() -> set[str]:
    from PIL import Image

    return {suffix.lower() for suffix in Image.registered_extensions()}


def find_inputs(spec: str) -> list[str]:
    """Paths from a folder (recursive, image suffixes only), a glob, a list file, or '-' (stdin)."""
    if spec == "-":
        text = sys.stdin.buffer.read().decode("utf-8", "surrogateescape")
        return [line.strip() for line in text.splitlines() if line.strip()]
    path = Path(spec)
    if path.is_dir():
        suffixes = image_suffixes()
        # Anything but a folder: a FIFO or a dangling link named like an image gets a line saying so.
        return sorted(str(p) for p in path.rglob("*") if not p.is_dir() and p.suffix.lower() in suffixes)
    if any(ch in spec for ch in "*?["):
        return sorted(p for p in glob.glob(spec, recursive=True) if not Path(p).is_dir())
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        return [line.strip() for line in text.splitlines() if line.strip()]
    raise ScoreError(f"input {spec!r} is not a folder, a glob, a list file or -", exit_code=2)


def inspect_file(path: str) -> tuple[int, str | None]:
    """The file's size, or why it is not read: only regular files are (a FIFO would block for ever)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return 0, "skipped: symbolic link loop"
        if exc.errno == errno.ENOENT and os.path.islink(path):
            return 0, "skipped: dangling symbolic link"
        return 0, f"cannot read file: {exc.strerror or exc}"
    if not stat.S_ISREG(info.st_mode):
        kind = FILE_KINDS.get(stat.S_IFMT(info.st_mode), "a special file")
        return 0, f"skipped: not a regular file ({kind})"
    return info.st_size, None
