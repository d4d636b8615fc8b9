"""The registry of model versions and their states.

Every version found in the repository gets an entry, loaded or not: a version that fails to load is
UNAVAILABLE with its reason, and the others serve. Requests resolve through `resolve`: version 0
means the newest READY version.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from serving.core.batching import BatchingConfig
from serving.core.errors import InvalidInput, NotFound, Unavailable
from serving.core.model import ServedModel, load_model
from serving.core.runtime import ModelLoadError, RuntimeOptions
from serving.models.repository import discover

log = logging.getLogger(__name__)


class VersionState(enum.StrEnum):
    LOADING = "LOADING"
    WARMING = "WARMING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    DRAINING = "DRAINING"
    UNLOADED = "UNLOADED"


@dataclass
class ModelVersion:
    name: str
    version: int
    path: Path
    state: VersionState = VersionState.LOADING
    reason: str = ""
    model: ServedModel | None = None


class ModelRegistry:
    """All versions by name; `resolve` is what the data plane calls for each request."""

    def __init__(self) -> None:
        self._models: dict[str, dict[int, ModelVersion]] = {}

    # -- loading (in a worker thread at start-up) -------------------------------------------------

    def add_repository(self, root: Path, only: str | None = None) -> list[ModelVersion]:
        """Registers every version under `root` (or only model `only`) as LOADING."""
        added = []
        for name, versions in discover(root).items():
            if only is not None and name != only:
                continue
            for version, path in versions.items():
                added.append(self.add(name, version, path))
        return added

    def add(self, name: str, version: int, path: Path) -> ModelVersion:
        entry = ModelVersion(name, version, path)
        self._models.setdefault(name, {})[version] = entry
        return entry

    def load(self, entry: ModelVersion, runtime: RuntimeOptions, batching: BatchingConfig) -> None:
        """Loads and warms one version; a failure leaves it UNAVAILABLE with the reason, logged once."""
        try:
            entry.model = load_model(entry.name, entry.version, entry.path, runtime, batching)
            entry.state = VersionState.WARMING
            entry.model.warm_up()
        except ModelLoadError as exc:
            self._fail(entry, str(exc))
            return
        except Exception as exc:  # warm-up can fail in ONNX Runtime for a model that loaded
            self._fail(entry, f"cannot serve {entry.name} version {entry.version}: warm-up failed: {exc}")
            return
        entry.state = VersionState.READY
        log.info(
            "loaded model %s version %d from %s: %s",
            entry.name,
            entry.version,
            entry.path,
            entry.model.runtime.describe(),
        )

    @staticmethod
    def _fail(entry: ModelVersion, reason: str) -> None:
        entry.state, entry.reason = VersionState.UNAVAILABLE, reason
        log.error("model %s version %d is unavailable: %s", entry.name, entry.version, reason)

    def load_all(self, runtime: RuntimeOptions, batching: BatchingConfig) -> None:
        for entry in self.entries():
            if entry.state is VersionState.LOADING:
                self.load(entry, runtime, batching)

    # -- lookup -----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> dict[int, ModelVersion]:
        versions = self._models.get(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise NotFound(f"unknown model {name!r} (served: {known})")
        return versions

    def entries(self) -> list[ModelVersion]:
        return [entry for name in self.names() for _, entry in sorted(self._models[name].items())]

    def ready(self) -> list[ServedModel]:
        return [e.model for e in self.entries() if e.state is VersionState.READY and e.model is not None]

    def default_name(self, name: str) -> str:
        if name:
            return name
        if len(self._models) != 1:
            raise InvalidInput(f"name a model: this server serves {self.names()}")
        return next(iter(self._models))

    def entry(self, name: str, version: int) -> ModelVersion:
        """The entry a request would use: a named version, or the newest READY one (else the newest)."""
        if version < 0:
            raise InvalidInput(f"version must be 0 (newest) or positive, got {version}")
        name = self.default_name(name)
        versions = self.versions(name)
        if version == 0:
            ready = [v for v, e in versions.items() if e.state is VersionState.READY]
            return versions[max(ready)] if ready else versions[max(versions)]
        if version not in versions:
            raise NotFound(f"model {name!r} has no version {version} (versions: {sorted(versions)})")
        return versions[version]

    def resolve(self, name: str, version: int) -> ServedModel:
        entry = self.entry(name, version)
        if entry.state is not VersionState.READY or entry.model is None:
            detail = f": {entry.reason}" if entry.reason else ""
            raise Unavailable(f"model {entry.name} version {entry.version} is {entry.state}{detail}")
        return entry.model

    async def close(self, entries: Iterable[ModelVersion] | None = None) -> None:
        for entry in list(entries or self.entries()):
            if entry.model is not None:
                await entry.model.close()
            entry.state, entry.model = VersionState.UNLOADED, None
