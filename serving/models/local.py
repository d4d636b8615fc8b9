"""Models on disk served in this process, with no server: what `score --local` and `bench` use.

`open_local` takes a repository, one model's folder (`<name>/`) or one version's folder
(`<name>/<version>/`) and returns the same data plane the server runs: decode pool, dynamic
batcher, ONNX Runtime, top-k.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from serving.core.batch_settings import BatchingConfig
from serving.core.dataplane import DataPlane
from serving.core.errors import NotFound
from serving.core.model import MODEL_FILE
from serving.core.runtime import RuntimeOptions
from serving.models.registry import ModelRegistry, VersionState
from serving.models.repository import is_version_name


@dataclass
class LocalModels:
    registry: ModelRegistry
    dataplane: DataPlane
    pool: ThreadPoolExecutor

    async def close(self) -> None:
        await self.registry.close()
        self.pool.shutdown(wait=True)


def open_local(
    path: Path,
    runtime: RuntimeOptions | None = None,
    batching: BatchingConfig | None = None,
    decode_threads: int = 0,
) -> LocalModels:
    """Loads every version found at `path`; raises NotFound when none loads."""
    registry = ModelRegistry()
    if (path / MODEL_FILE).is_file():
        version = int(path.name) if is_version_name(path.name) else 1
        registry.add(path.parent.name, version, path / MODEL_FILE)
    elif any((p / MODEL_FILE).is_file() for p in path.glob("*") if p.is_dir()):
        registry.add_repository(path.parent, only=path.name)
    elif path.is_dir():
        registry.add_repository(path)
    if not registry.entries():
        raise NotFound(f"no model under {path} (expected <name>/<version>/{MODEL_FILE})")
    registry.load_all(runtime or RuntimeOptions(), batching or BatchingConfig())
    failed = [e for e in registry.entries() if e.state is not VersionState.READY]
    if len(failed) == len(registry.entries()):
        raise NotFound("; ".join(e.reason for e in failed))
    pool = ThreadPoolExecutor(decode_threads or os.cpu_count() or 1, thread_name_prefix="decode")
    return LocalModels(registry, DataPlane(registry, pool), pool)
