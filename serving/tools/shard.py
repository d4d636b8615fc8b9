"""Shards of a scoring job's inputs: `--shard INDEX/COUNT` gives each of COUNT workers its own part.

A Kubernetes Indexed Job runs COUNT pods, each with its JOB_COMPLETION_INDEX, over the same input;
every pod keeps the paths of its shard and skips the rest. The assignment is by a hash of the path
(the first 8 bytes of its SHA-256, modulo COUNT), not by position in a listing: a path stays in the
same shard when files are added or removed, so a pod restarted after the input grew does not
re-score another pod's images, and every pod decides alone, with no shared list. Shards are
disjoint and together cover every path, for any COUNT.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def parse_shard(spec: str) -> tuple[int, int]:
    """'INDEX/COUNT' (0 <= INDEX < COUNT) as two ints; ValueError with the reason otherwise."""
    index_text, slash, count_text = spec.partition("/")
    if not slash or not index_text.strip().isdigit() or not count_text.strip().isdigit():
        raise ValueError(f"--shard must be INDEX/COUNT, e.g. 0/4, not {spec!r}")
    index, count = int(index_text), int(count_text)
    if count < 1 or index >= count:
        raise ValueError(f"--shard {spec!r}: need COUNT >= 1 and 0 <= INDEX < COUNT")
    return index, count


def shard_of(path: str, count: int) -> int:
    """The shard a path belongs to: stable across runs, machines and Python versions."""
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count


def select_shard(paths: Iterable[str], index: int, count: int) -> list[str]:
    """The paths of shard `index` of `count`, in their given order."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need COUNT >= 1 and 0 <= INDEX < COUNT")
    return [path for path in paths if shard_of(path, count) == index]
