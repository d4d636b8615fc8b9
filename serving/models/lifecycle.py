"""Model lifecycle: what is loaded at start, the poll loop, and explicit load / unload.

`--model-control` takes Triton's names:
  * none: every version the models' version policies select is loaded at start; nothing changes after;
  * poll: the same at start, then the repository is scanned every `--poll-s` seconds;
  * explicit: the same at start, then models change only on `load` / `unload` (RepositoryModelLoad /
    RepositoryModelUnload on the Open Inference Protocol).

One rule for every change (`_sync_model`), learnt from Triton's and MLServer's slips:
  * a new or changed version is loaded and warmed **before** anything moves to it (triton#2076 unloaded
    the old version first); a changed version is loaded beside the serving one and swapped in;
  * a version that fails to load is UNAVAILABLE with its reason, the serving versions stay, and it is
    tried again only when its files change; a failed scan is logged and polling goes on (triton#6534);
  * a removed version, or one its policy no longer selects, drains (its admitted requests finish) and
    is then unloaded; a version leaves by policy only once a version the policy selects is READY, so
    a model never loses its last serving version to a newer one that does not load;
  * half-written versions are never loaded: only folders named by a number count (publish by renaming
    `.tmp-3` to `3`), and in poll mode a version's files (and config.json) must be unchanged across two
    scans before they are loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from serving.core.errors import FailedPrecondition, NotFound, shown
from serving.models.registry import ModelRegistry, ModelVersion, VersionState
from serving.models.repository import VersionFiles, scan
from serving.models.settings import LoadOptions, ModelSettings, SettingsError, load_options

log = logging.getLogger(__name__)


class ModelControl(enum.StrEnum):
    NONE = "none"
    POLL = "poll"
    EXPLICIT = "explicit"


class ModelLifecycle:
    """Keeps the registry in step with the repository, as `--model-control` says."""

    def __init__(
        self,
        registry: ModelRegistry,
        root: Path,
        defaults: LoadOptions,
        control: ModelControl | str = ModelControl.NONE,
        poll_s: float = 5.0,
        on_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.registry = registry
        self.root = root
        self.defaults = defaults
        self.control = ModelControl(control)
        self.poll_s = poll_s
        self.on_change = on_change  # called after every sync (the server updates its health)
        self._lock = asyncio.Lock()  # one sync at a time: poll, load and unload never interleave
        self._seen: dict[tuple[str, int], tuple] = {}  # each version's signature at the last scan
        self._poller: asyncio.Task | None = None
        self._drains: set[asyncio.Task] = set()
        self.failed_scans = 0

    # -- start and stop ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Loads what the repository holds (or what the registry was given), then polls if asked."""
        if self.registry.entries():  # registered by the caller: loaded with the server's flags
            options = self.defaults
            await asyncio.to_thread(self.registry.load_all, options.runtime, options.batching)
        else:
            await self.sync(stable_only=False)
        if self.control is ModelControl.POLL:
            self._poller = asyncio.create_task(self._poll(), name="model-poll")

    async def stop_polling(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None

    async def wait_drained(self, timeout: float) -> None:
        """Gives draining versions `timeout` to finish; the registry's close releases the rest."""
        if self._drains:
            _, late = await asyncio.wait(set(self._drains), timeout=timeout)
            for task in late:
                task.cancel()

    async def _poll(self) -> None:
        failing = ""  # the last failure, logged once until it changes or scanning works again
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.sync(stable_only=True)
            except Exception as exc:  # never stop polling over a bad scan (triton#6534)
                self.failed_scans += 1
                problem = f"{type(exc).__name__}: {exc}"
                if problem != failing:
                    log.error("scanning %s failed (%s); polling goes on", self.root, problem)
                failing = problem
                continue
            if failing:
                log.info("scanning %s works again", self.root)
                failing = ""

    # -- explicit control -------------------------------------------------------------------------

    def require_explicit(self, action: str) -> None:
        if self.control is not ModelControl.EXPLICIT:
            raise FailedPrecondition(
                f"cannot {action} a model: the server runs with --model-control {self.control.value}; "
                "loading and unloading on request need --model-control explicit"
            )

    async def load(self, name: str) -> None:
        """Loads (or reloads) every version of `name` its policy selects; FailedPrecondition when none
        of them is READY afterwards."""
        self.require_explicit("load")
        if not name or name.startswith(".") or "/" in name or not (self.root / name).is_dir():
            raise NotFound(f"no model {shown(name)} in the model repository")
        await self.sync(stable_only=False, only=name)
        versions = self.registry.known(name)
        if not any(e.state is VersionState.READY for e in versions.values()):
            reasons = "; ".join(e.reason for e in versions.values() if e.reason) or "no version on disk"
            raise FailedPrecondition(f"model {name} did not load: {reasons}")

    async def unload(self, name: str) -> None:
        """Drains and unloads every version of `name`: new calls get NotFound at once."""
        self.require_explicit("unload")
        async with self._lock:  # after any load in progress, so what it swapped in drains too
            versions = self.registry.known(name)
            if not versions:
                raise NotFound(f"unknown model {shown(name)}")
            for entry in versions.values():
                self._drain(entry, "unloaded on request")
        await self._changed()

    # -- the one rule -----------------------------------------------------------------------------

    async def sync(self, stable_only: bool, only: str | None = None) -> None:
        """Brings the registry in step with the repository (or with one model's folder)."""
        async with self._lock:
            found = await asyncio.to_thread(scan, self.root, only)
            names = set(found) | {n for n in self.registry.names() if only is None or n == only}
            for name in sorted(names):
                await self._sync_model(name, found.get(name, {}), stable_only)
            seen = {(n, v): files.signature for n, versions in found.items() for v, files in versions.items()}
            if only is None:
                self._seen = seen
            else:
                self._seen = {k: s for k, s in self._seen.items() if k[0] != only} | seen
        await self._changed()

    async def _changed(self) -> None:
        if self.on_change is not None:
            await self.on_change()

    async def _sync_model(self, name: str, found: dict[int, VersionFiles], stable_only: bool) -> None:
        problem = ""
        options: LoadOptions | None = None
        settings = ModelSettings()
        if found:
            try:
                settings, options = await asyncio.to_thread(load_options, self.root / name, self.defaults)
            except SettingsError as exc:
                problem = str(exc)
        # With a bad config.json the policy is unknown: every version on disk shows the reason.
        wanted = set(found) if problem else settings.select(found)
        for version in sorted(wanted):
            files = found[version]
            entry = self.registry.known(name).get(version)
            if entry is not None and not entry.gone and entry.signature == files.signature:
                continue  # loaded from these very files, or failed on them: wait for a change
            if stable_only and self._seen.get((name, version)) != files.signature:
                continue  # new or still changing since the last scan: look again next time
            await self._load(name, version, files, entry, files.problem or options or problem)
        versions = self.registry.known(name)
        policy_ready = any(e.state is VersionState.READY for v, e in versions.items() if v in wanted)
        for version, entry in versions.items():
            if entry.gone:
                continue
            if version not in found:
                self._drain(entry, "removed from the repository")
            elif version not in wanted and policy_ready:
                self._drain(entry, "not selected by the model's version_policy")

    async def _load(
        self,
        name: str,
        version: int,
        files: VersionFiles,
        previous: ModelVersion | None,
        options: LoadOptions | str,
    ) -> None:
        """Loads one version; a serving one is replaced only once the new one is READY. `options` is
        the model's settings, or why they could not be read (the version then fails with that reason)."""
        entry = ModelVersion(name, version, files.path, signature=files.signature)
        serving = previous if previous is not None and previous.state is VersionState.READY else None
        if serving is None:
            self.registry.swap(entry)  # shown as LOADING; unversioned calls still go to READY versions
        if isinstance(options, str):
            self.registry.fail(entry, options)
        else:
            registry, o = self.registry, options
            await asyncio.to_thread(registry.load, entry, o.runtime, o.batching, o.warm_up_sizes)
        if serving is None:
            return
        if entry.state is VersionState.READY:
            self.registry.swap(entry)
            self._drain(serving, "replaced by a reload of its changed files")
        else:  # keep serving what was loaded before; try again when the files change again
            serving.reason = f"reload failed, still serving the files loaded before: {entry.reason}"
            serving.signature = files.signature

    def _drain(self, entry: ModelVersion, reason: str) -> None:
        if not self.registry.begin_drain(entry, reason):
            return
        drain = self.registry.finish_drain(entry)
        task = asyncio.create_task(drain, name=f"drain-{entry.name}-{entry.version}")
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)
