"""Giving freed memory back to the OS, so a burst of load does not leave the server at its peak size.

glibc keeps freed memory for reuse: blocks under its mmap threshold stay in the heap, and the heap
shrinks only from its top. Requests arrive as many small gRPC slices and leave the heap full of
holes, so after an overload the process would keep its peak size. `malloc_trim(0)` releases the free
pages wherever they lie; the server calls it once the load has settled. Elsewhere than glibc this
does nothing.

Python's cycle collector is the other cost of memory: see `freeze_imports`.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def load_glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - present in glibc only
    except (OSError, AttributeError):
        return None
    return libc


def configure_malloc() -> None:
    """A fixed mmap threshold (glibc otherwise raises it after each large free, keeping multi-MB request
    buffers in the heap) and few arenas (one per thread multiplies what is held). Call it early."""
    libc = load_glibc()
    if libc is not None:
        m_mmap_threshold, m_arena_max = -3, -8
        libc.mallopt(m_mmap_threshold, 128 * 1024)
        libc.mallopt(m_arena_max, 2)


def freeze_imports() -> int:
    """Leaves what the imports made (modules, classes, functions: some 65,000 objects, none of them ever
    garbage) out of the cycle collector's full passes. Each pass walked them all, 40-50 ms with the
    event loop held, and objects that outlive a few collections (queued requests, spans waiting for
    export) start one every few thousand. Called before any model is loaded: a model's objects stay
    collectable, so unloading one frees them. Returns how many objects it left out."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def trim_when_quiet(busy: Callable[[], bool], interval_s: float = 1.0) -> None:
    """Every `interval_s`, when the server was idle since the last check but not before, trims once."""
    libc = load_glibc()
    if libc is None:
        return
    was_busy = False
    while True:
        await asyncio.sleep(interval_s)
        if busy():
            was_busy = True
        elif was_busy:
            was_busy = False
            gc.collect()  # cycles left by finished calls, before their pages are given back
            await asyncio.to_thread(libc.malloc_trim, 0)
