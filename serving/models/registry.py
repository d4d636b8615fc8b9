"""The registry of model versions and their states.

Every version registered (by `lifecycle`: those its model's version policy selects) gets an entry,
loaded or not: a version that fails to load is UNAVAILABLE with its reason, and the others serve.
Requests resolve through `resolve`: version 0 means the newest READY version. States:

    LOADING -> WARMING -> READY -> DRAINING -> UNLOADED
           `-----------`-> UNAVAILABLE (+ reason)

A DRAINING version takes no new requests (a call naming it gets NotFound) while those that resolved
it before finish; then its sessions are released and it is UNLOADED. A reload builds a new entry
off to the side and swaps it in only once it is READY (`swap`), then drains the old one.
The event loop thread makes every change that decides where a request goes (swap, drain); loading
runs in a worker thread and publishes READY last.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from serving.core.batch_settings import BatchingConfig
from serving.core.errors import InvalidInput, NotFound, Unavailable, shown
from serving.core.model import ServedModel, load_model
from serving.core.runtime import ModelLoadError, RuntimeOptions
from serving.models.repository import scan

log = logging.getLogger(__name__)


class VersionState(enum.StrEnum):
    LOADING = "LOADING"
    WARMING = "WARMING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    DRAINING = "DRAINING"
    UNLOADED = "UNLOADED"


@dataclass(eq=False)  # compared and hashed by identity: a reload makes a second entry of one version
class ModelVersion:
    name: str
    version: int
    path: Path
    state: VersionState = VersionState.LOADING
    reason: str = ""
    model: ServedModel | None = None
    signature: tuple = ()  # the files' stamps this entry was (or will be) loaded from (repository.scan)
    sha256: str = ""  # of the model file it was loaded from (hex), set once READY
    loaded_at: float = 0.0  # time.time() when it turned READY

    @property
    def loaded_at_text(self) -> str:
        """When it turned READY, RFC 3339 in UTC to the millisecond ("" before)."""
        if not self.loaded_at:
            return ""
        return (
            datetime.fromtimestamp(self.loaded_at, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )

    @property
    def gone(self) -> bool:
        """Draining or unloaded: no new request may use it."""
        return self.state in (VersionState.DRAINING, VersionState.UNLOADED)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class ModelRegistry:
    """All versions by name; `resolve` is what the data plane calls for each request."""

    def __init__(self) -> None:
        self._models: dict[str, dict[int, ModelVersion]] = {}
        self._draining: set[ModelVersion] = set()  # swapped-out entries still finishing their requests

    # -- loading (in a worker thread at start-up) -------------------------------------------------

    def add_repository(self, root: Path, only: str | None = None) -> None:
        """Registers every version under `root` (or only model `only`) as LOADING."""
        for name, versions in scan(root, only).items():
            for version, files in versions.items():
                entry = self.add(name, version, files.path)
                if files.problem:
                    self.fail(entry, files.problem)

    def add(self, name: str, version: int, path: Path) -> ModelVersion:
        entry = ModelVersion(name, version, path)
        self._models.setdefault(name, {})[version] = entry
        return entry

    def load(
        self,
        entry: ModelVersion,
        runtime: RuntimeOptions,
        batching: BatchingConfig,
        warm_up_sizes: Sequence[int] | None = None,
    ) -> None:
        """Loads and warms one version; a failure leaves it UNAVAILABLE with the reason, logged once."""
        entry.state, entry.reason = VersionState.LOADING, ""
        try:
            sha256 = file_sha256(entry.path)  # first: what ONNX Runtime then reads is no older
            model = load_model(entry.name, entry.version, entry.path, runtime, batching)
        except OSError as exc:
            self.fail(entry, f"cannot serve {entry.name} version {entry.version}: {exc}")
            return
        except ModelLoadError as exc:
            self.fail(entry, str(exc))
            return
        entry.state = VersionState.WARMING
        try:
            model.warm_up(warm_up_sizes)
        except Exception as exc:  # warm-up can fail in ONNX Runtime for a model that loaded
            self.fail(entry, f"cannot serve {entry.name} version {entry.version}: warm-up failed: {exc}")
            return
        entry.model, entry.sha256, entry.loaded_at = model, sha256, time.time()
        entry.state = VersionState.READY  # last: from here on requests may resolve to it
        log.info(
            "loaded model %s version %d from %s: %s",
            entry.name,
            entry.version,
            entry.path,
            entry.model.runtime.describe(),
        )

    @staticmethod
    def fail(entry: ModelVersion, reason: str) -> None:
        # Clients see the reason: paths in it are shown relative to the repository (<root>/<name>/<v>/).
        root = f"{entry.path.parents[2]}{os.sep}" if len(entry.path.parents) > 2 else ""
        reason = reason.replace(root, "") if root and root != os.sep else reason
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
            raise NotFound(f"unknown model {shown(name)} (served: {known})")
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
        if version == 0 and len(versions) == 1:
            return next(iter(versions.values()))  # the common case, on every request: one version
        if version == 0:
            ready = [v for v, e in versions.items() if e.state is VersionState.READY]
            present = [v for v, e in versions.items() if not e.gone]
            return versions[max(ready or present or versions)]
        if version not in versions:
            raise NotFound(f"model {shown(name)} has no version {version} (versions: {sorted(versions)})")
        return versions[version]

    def resolve(self, name: str, version: int) -> ServedModel:
        entry = self.entry(name, version)
        if entry.gone:
            detail = f" ({entry.reason})" if entry.reason else ""
            raise NotFound(f"model {entry.name} version {entry.version} is {entry.state}{detail}")
        if entry.state is not VersionState.READY or entry.model is None:
            detail = f": {entry.reason}" if entry.reason else ""
            raise Unavailable(f"model {entry.name} version {entry.version} is {entry.state}{detail}")
        return entry.model

    # -- changes while serving (event loop thread) -------------------------------------------------

    def swap(self, entry: ModelVersion) -> None:
        """Puts `entry` in its version's place."""
        self._models.setdefault(entry.name, {})[entry.version] = entry

    def known(self, name: str) -> dict[int, ModelVersion]:
        """The versions of `name` (any state), or none when the name was never seen."""
        return dict(self._models.get(name, {}))

    def begin_drain(self, entry: ModelVersion, reason: str) -> bool:
        """DRAINING at once: no new request resolves to it. True when `finish_drain` has work to do."""
        if entry.gone:
            return False
        entry.reason = reason
        if entry.model is None:  # never served (failed to load): nothing to drain
            entry.state = VersionState.UNLOADED
            return False
        entry.state = VersionState.DRAINING
        self._draining.add(entry)
        log.info("draining model %s version %d: %s", entry.name, entry.version, reason)
        return True

    async def finish_drain(self, entry: ModelVersion) -> None:
        """Waits for the requests that hold the version, then releases its sessions: UNLOADED.

        Cancelled while waiting, the entry stays listed as draining and `close` releases it."""
        model = entry.model
        if model is None or entry.state is not VersionState.DRAINING:
            return
        await model.wait_unused()
        await model.close()
        self._draining.discard(entry)
        entry.state, entry.model = VersionState.UNLOADED, None
        log.info("unloaded model %s version %d", entry.name, entry.version)

    async def close(self, entries: Iterable[ModelVersion] | None = None) -> None:
        for entry in list(entries or [*self.entries(), *self._draining]):
            model, entry.model = entry.model, None
            entry.state = VersionState.UNLOADED
            if model is not None:
                await model.close()
