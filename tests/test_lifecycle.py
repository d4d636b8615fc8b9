"""The model lifecycle in process: registry transitions driven by `ModelLifecycle` over a real repository
of real ONNX files. Every scan is called by the test (no timer), so nothing depends on timing."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from serving.core.batch_settings import BatchingConfig
from serving.core.errors import FailedPrecondition, NotFound, Unavailable
from serving.core.runtime import RuntimeOptions
from serving.models.lifecycle import ModelLifecycle
from serving.models.registry import ModelRegistry, VersionState
from serving.models.settings import LoadOptions
from tests.conftest import build_conv_model

NAME = "tiny"
SIDE = 8
DEFAULTS = LoadOptions(RuntimeOptions(device="cpu", intra_op_threads=1), BatchingConfig(8, 0.001, 64))
READY, UNAVAILABLE, DRAINING, UNLOADED = (
    VersionState.READY,
    VersionState.UNAVAILABLE,
    VersionState.DRAINING,
    VersionState.UNLOADED,
)


def publish(repo: Path, version: int, seed: int | None = None, data: bytes | None = None) -> Path:
    """Writes a version under a temporary name, then renames it into place (the documented way)."""
    staging = repo / NAME / f".tmp-{version}"
    if data is None:
        build_conv_model(
            staging / "model.onnx", side=SIDE, channels=2, seed=version if seed is None else seed
        )
    else:
        staging.mkdir(parents=True)
        (staging / "model.onnx").write_bytes(data)
    final = repo / NAME / str(version)
    os.rename(staging, final)
    return final


def replace_file(folder: Path, seed: int | None = None, data: bytes | None = None) -> None:
    """Replaces a version's model.onnx in place by an atomic rename over it."""
    fresh = folder / "model.onnx.new"
    if data is None:
        build_conv_model(fresh, side=SIDE, channels=2, seed=seed or 0)
    else:
        fresh.write_bytes(data)
    os.replace(fresh, folder / "model.onnx")


def states(registry: ModelRegistry) -> dict[int, VersionState]:
    return {v: e.state for v, e in registry.known(NAME).items()}


def rows() -> np.ndarray:
    return np.random.default_rng(0).random((2, 3, SIDE, SIDE), dtype=np.float32)


def lifecycle(repo: Path, control: str = "poll", poll_s: float = 3600) -> ModelLifecycle:
    return ModelLifecycle(ModelRegistry(), repo, DEFAULTS, control, poll_s)


async def settle(life: ModelLifecycle) -> None:
    await life.wait_drained(timeout=30)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / NAME).mkdir()
    publish(tmp_path, 1)
    return tmp_path


def test_a_new_version_serves_only_once_ready_and_its_files_held_still(repo: Path) -> None:
    async def scenario() -> None:
        life = lifecycle(repo)
        await life.start()
        registry = life.registry
        assert states(registry) == {1: READY} and registry.resolve(NAME, 0).version == 1
        # Half-written versions are invisible: not a number, or hidden.
        (repo / NAME / "2.partial").mkdir()
        shutil.copy(repo / NAME / "1" / "model.onnx", repo / NAME / "2.partial" / "model.onnx")
        (repo / NAME / ".tmp-5").mkdir()
        publish(repo, 2)
        await life.sync(stable_only=True)  # first seen: it may still be changing
        assert states(registry) == {1: READY} and registry.resolve(NAME, 0).version == 1
        await life.sync(stable_only=True)  # unchanged since: loaded, warmed, then served
        assert states(registry) == {1: READY, 2: READY}
        assert registry.resolve(NAME, 0).version == 2 and registry.resolve(NAME, 1).version == 1
        await life.stop_polling()
        await registry.close()

    asyncio.run(scenario())


def test_a_removed_version_drains_its_requests_then_unloads(repo: Path) -> None:
    async def scenario() -> None:
        life = lifecycle(repo)
        await life.start()
        publish(repo, 2)
        await life.sync(stable_only=True)
        await life.sync(stable_only=True)
        registry = life.registry
        old = registry.resolve(NAME, 1)
        with old.hold():  # a request that resolved version 1 before it was removed
            shutil.rmtree(repo / NAME / "1")
            await life.sync(stable_only=True)
            assert states(registry) == {1: DRAINING, 2: READY}
            with pytest.raises(NotFound, match="version 1 is DRAINING"):
                registry.resolve(NAME, 1)
            assert registry.resolve(NAME, 0).version == 2
            await asyncio.sleep(0)
            probabilities = await old.infer(rows())  # the held request still gets its answer
            assert probabilities.shape == (2, 10) and states(registry)[1] is DRAINING
        await settle(life)
        entry = registry.known(NAME)[1]
        assert entry.state is UNLOADED and entry.model is None and "removed" in entry.reason
        with pytest.raises(NotFound):
            registry.resolve(NAME, 1)
        with pytest.raises(Unavailable):  # its sessions are released: the batcher takes no more work
            await old.infer(rows())
        await registry.close()

    asyncio.run(scenario())


def test_a_version_that_fails_leaves_the_serving_one_and_is_retried_when_its_files_change(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        life = lifecycle(repo)
        await life.start()
        registry = life.registry
        publish(repo, 3, data=b"this is not an ONNX file")
        for _ in range(4):
            await life.sync(stable_only=True)
        entry = registry.known(NAME)[3]
        assert entry.state is UNAVAILABLE and "cannot serve tiny version 3" in entry.reason
        assert registry.resolve(NAME, 0).version == 1
        with pytest.raises(Unavailable, match="version 3 is UNAVAILABLE"):
            registry.resolve(NAME, 3)
        failures = [r for r in caplog.records if "version 3 is unavailable" in r.getMessage()]
        assert len(failures) == 1  # tried once per change of its files, not once per scan
        replace_file(repo / NAME / "3", seed=3)
        await life.sync(stable_only=True)
        await life.sync(stable_only=True)
        assert states(registry) == {1: READY, 3: READY} and registry.resolve(NAME, 0).version == 3
        await registry.close()

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())


def test_a_changed_file_is_loaded_beside_the_old_one_and_swapped_in(repo: Path) -> None:
    async def scenario() -> None:
        life = lifecycle(repo)
        await life.start()
        registry = life.registry
        old = registry.resolve(NAME, 1)
        before = await old.infer(rows())
        with old.hold():
            replace_file(repo / NAME / "1", seed=42)
            await life.sync(stable_only=True)
            await life.sync(stable_only=True)
            new = registry.resolve(NAME, 1)
            assert new is not old and states(registry) == {1: READY}
            after = await new.infer(rows())
            assert not np.allclose(before, after)  # the new file's weights
            assert np.allclose(await old.infer(rows()), before)  # the held request: the old ones
        await settle(life)
        assert registry.resolve(NAME, 1) is new
        with pytest.raises(Unavailable):
            await old.infer(rows())
        # A broken replacement: the version keeps serving what it had, and says why.
        replace_file(repo / NAME / "1", data=b"\0" * 100)
        await life.sync(stable_only=True)
        await life.sync(stable_only=True)
        entry = registry.known(NAME)[1]
        assert entry.state is READY and entry.model is new
        assert entry.reason.startswith("reload failed, still serving the files loaded before: cannot serve")
        await registry.close()

    asyncio.run(scenario())


def test_version_policy_latest_keeps_the_serving_version_until_a_newer_one_is_ready(repo: Path) -> None:
    async def scenario() -> None:
        publish(repo, 2)
        (repo / NAME / "config.json").write_text(json.dumps({"version_policy": {"latest": 1}}))
        life = lifecycle(repo)
        await life.start()
        registry = life.registry
        assert states(registry) == {2: READY}  # version 1 is on disk but not selected
        publish(repo, 3, data=b"corrupt")
        await life.sync(stable_only=True)
        await life.sync(stable_only=True)
        assert states(registry) == {2: READY, 3: UNAVAILABLE}  # no newer version ready: 2 stays
        assert registry.resolve(NAME, 0).version == 2
        replace_file(repo / NAME / "3", seed=3)
        await life.sync(stable_only=True)
        await life.sync(stable_only=True)
        await settle(life)
        assert states(registry) == {2: UNLOADED, 3: READY}
        assert "version_policy" in registry.known(NAME)[2].reason
        await registry.close()

    asyncio.run(scenario())


def test_per_model_settings_apply_and_a_bad_file_makes_only_that_model_unavailable(repo: Path) -> None:
    async def scenario() -> None:
        other = repo / "other"
        build_conv_model(other / "1" / "model.onnx", side=SIDE, channels=2)
        config = {"max_batch_size": 4, "max_queue_size": 16, "instances": 2, "warm_up_batch_sizes": [2]}
        (repo / NAME / "config.json").write_text(json.dumps(config))
        (other / "config.json").write_text(json.dumps({"max_batch_size": 0}))
        life = lifecycle(repo, control="none")
        await life.start()
        registry = life.registry
        model = registry.resolve(NAME, 0)
        assert model.batcher.config.max_batch_size == 4 and model.batcher.config.max_queue_rows == 16
        assert model.runtime.instances == 2 and model.runtime.session_calls == [1, 1]  # warm-up: size 2
        entry = registry.known("other")[1]
        assert entry.state is UNAVAILABLE
        # Shown to clients: the path relative to the repository.
        assert entry.reason == "other/config.json: max_batch_size: Input should be greater than or equal to 1"
        with pytest.raises(Unavailable, match="max_batch_size"):
            registry.resolve("other", 0)
        await registry.close()

    asyncio.run(scenario())


def test_explicit_control_loads_and_unloads_on_request_only(repo: Path) -> None:
    async def scenario() -> None:
        life = lifecycle(repo, control="explicit")
        await life.start()
        registry = life.registry
        publish(repo, 2)
        await asyncio.sleep(0)
        assert states(registry) == {1: READY}  # nothing polls
        await life.load(NAME)  # the operator says the files are complete: no second look needed
        assert states(registry) == {1: READY, 2: READY}
        model = registry.resolve(NAME, 0)
        with model.hold():
            await life.unload(NAME)
            assert states(registry) == {1: DRAINING, 2: DRAINING}
            with pytest.raises(NotFound):
                registry.resolve(NAME, 0)
        await settle(life)
        assert states(registry) == {1: UNLOADED, 2: UNLOADED}
        await life.load(NAME)
        assert states(registry) == {1: READY, 2: READY}
        with pytest.raises(NotFound):
            await life.load("nothing-here")
        with pytest.raises(NotFound):
            await life.load("../" + NAME)
        (repo / "broken" / "1").mkdir(parents=True)
        (repo / "broken" / "1" / "model.onnx").write_bytes(b"junk")
        with pytest.raises(
            FailedPrecondition, match="model broken did not load: cannot serve broken version 1"
        ):
            await life.load("broken")
        await registry.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("control", ["none", "poll"])
def test_load_and_unload_are_refused_outside_explicit_control(repo: Path, control: str) -> None:
    async def scenario() -> None:
        life = lifecycle(repo, control=control)
        await life.start()
        for action in (life.load, life.unload):
            with pytest.raises(FailedPrecondition, match=f"--model-control {control}"):
                await action(NAME)
        assert states(life.registry) == {1: READY}
        await life.stop_polling()
        await life.registry.close()

    asyncio.run(scenario())


def test_polling_goes_on_after_a_failed_scan(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        life = lifecycle(repo, poll_s=0.01)
        await life.start()
        hidden = repo.parent / (repo.name + "-away")
        os.rename(repo, hidden)  # the whole repository vanishes: every scan fails
        while not any("polling goes on" in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.01)
        while life.failed_scans < 5:  # the same failure, again and again
            await asyncio.sleep(0.01)
        os.rename(hidden, repo)
        publish(repo, 2)
        while states(life.registry).get(2) is not READY:
            await asyncio.sleep(0.01)
        assert life.registry.resolve(NAME, 0).version == 2
        failures = [r for r in caplog.records if "polling goes on" in r.getMessage()]
        assert len(failures) == 1  # one line for a failure that repeats, not one per scan
        assert any("works again" in r.getMessage() for r in caplog.records)
        await life.stop_polling()
        await life.registry.close()

    with caplog.at_level(logging.INFO):
        asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_changed_config_json_reloads_the_model_and_a_bad_one_keeps_it_serving(repo: Path) -> None:
    async def scenario() -> None:
        life = lifecycle(repo)
        await life.start()
        registry = life.registry
        first = registry.resolve(NAME, 1)
        assert first.batcher.config.max_batch_size == DEFAULTS.batching.max_batch_size
        config = repo / NAME / "config.json"
        config.write_text(json.dumps({"max_batch_size": 2, "max_queue_size": 8}))
        await life.sync(stable_only=True)
        await life.sync(stable_only=True)
        second = registry.resolve(NAME, 1)
        assert second is not first and second.batcher.config.max_batch_size == 2
        config.write_text(json.dumps({"max_batch_size": 2, "max_queue": 8}))
        await life.sync(stable_only=True)
        await life.sync(stable_only=True)
        entry = registry.known(NAME)[1]
        assert entry.state is READY and entry.model is second
        assert entry.reason.endswith(f"{NAME}/config.json: max_queue: Extra inputs are not permitted")
        assert str(repo) not in entry.reason
        await settle(life)
        await registry.close()

    asyncio.run(scenario())
