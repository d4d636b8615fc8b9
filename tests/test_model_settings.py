"""Per-model settings (`MODELS/<name>/config.json`): validation with messages naming the file and the
key, the server's flags as defaults, and Triton's version policies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.core.batch_settings import BatchingConfig
from serving.core.runtime import RuntimeOptions
from serving.models.settings import LoadOptions, ModelSettings, SettingsError, load_options

DEFAULTS = LoadOptions(RuntimeOptions(device="auto", instances=1), BatchingConfig(32, 0.002, 2048))


def write(model_dir: Path, data: object) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    text = data if isinstance(data, str) else json.dumps(data)
    (model_dir / "config.json").write_text(text)
    return model_dir


def test_no_file_means_the_server_flags(tmp_path: Path) -> None:
    settings, options = load_options(tmp_path, DEFAULTS)
    assert options == DEFAULTS
    assert settings.select([1, 2, 3]) == {1, 2, 3}  # "all": every version on disk, as before


def test_keys_override_the_flags_one_by_one(tmp_path: Path) -> None:
    config = {
        "max_batch_size": 8,
        "max_delay_ms": 5,
        "max_queue_size": 64,
        "instances": 2,
        "device": "cpu",
        "warm_up_batch_sizes": [8, 1, 4, 4],
    }
    _, options = load_options(write(tmp_path / "m", config), DEFAULTS)
    assert options.batching == BatchingConfig(8, 0.005, 64)
    assert options.runtime == RuntimeOptions(device="cpu", instances=2)
    assert options.warm_up_sizes == (1, 4, 8)
    _, options = load_options(write(tmp_path / "n", {"max_delay_ms": 0}), DEFAULTS)
    assert options.batching == BatchingConfig(32, 0.0, 2048) and options.runtime == DEFAULTS.runtime


@pytest.mark.parametrize(
    ("config", "key", "words"),
    [
        ({"max_batch_size": 0}, "max_batch_size", "greater than or equal to 1"),
        ({"max_batch_size": "many"}, "max_batch_size", "integer"),
        ({"max_delay_ms": -1}, "max_delay_ms", "greater than or equal to 0"),
        ({"instances": 0}, "instances", "greater than or equal to 1"),
        ({"device": "tpu"}, "device", "pattern"),
        ({"max_batch_szie": 8}, "max_batch_szie", "Extra inputs are not permitted"),
        ({"version_policy": {"latest": 0}}, "version_policy", '{"latest": N}'),
        ({"version_policy": "newest"}, "version_policy", '"all"'),
        ({"version_policy": {"specific": []}}, "version_policy", '{"specific": [versions]}'),
        ({"version_policy": {"latest": 1, "specific": [1]}}, "version_policy", "got"),
        ({"max_batch_size": 64, "max_queue_size": 16}, "max_queue_size", "at least max_batch_size"),
        ({"max_batch_size": 4, "warm_up_batch_sizes": [1, 8]}, "warm_up_batch_sizes", "[8]"),
        ("[1, 2]", "", "JSON object"),
        ("{not json", "", "not valid JSON"),
    ],
)
def test_bad_settings_name_the_file_and_the_key(tmp_path: Path, config: object, key: str, words: str) -> None:
    model_dir = write(tmp_path / "digits", config)
    with pytest.raises(SettingsError) as caught:
        load_options(model_dir, DEFAULTS)
    message = str(caught.value)
    assert message.startswith(f"{model_dir / 'config.json'}: "), message
    assert key in message and words in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("policy", "versions", "selected"),
    [
        ("all", [1, 2, 5], {1, 2, 5}),
        ({"latest": 1}, [1, 2, 5], {5}),
        ({"latest": 2}, [3, 1, 2], {2, 3}),
        ({"latest": 9}, [1, 2], {1, 2}),
        ({"specific": [1, 3]}, [1, 2, 5], {1}),
        ({"specific": [4]}, [1, 2], set()),
    ],
)
def test_version_policy_selects_like_triton(policy: object, versions: list[int], selected: set[int]) -> None:
    assert ModelSettings.model_validate({"version_policy": policy}).select(versions) == selected


def test_model_control_flags_are_checked_before_anything_starts(tmp_path: Path, monkeypatch) -> None:
    import argparse

    from serving.config import ConfigError, add_config_arguments, config_from_args

    def parse(*flags: str):
        parser = argparse.ArgumentParser()
        add_config_arguments(parser)
        return config_from_args(parser.parse_args(["--models", str(tmp_path), *flags]))

    assert (parse().model_control, parse().poll_s) == ("none", 5.0)
    assert parse("--model-control", "explicit").model_control == "explicit"
    with pytest.raises(
        ConfigError, match="--model-control 'watch': Input should be 'none', 'poll' or 'explicit'"
    ):
        parse("--model-control", "watch")
    with pytest.raises(ConfigError, match="--poll-s '0': Input should be greater than 0"):
        parse("--poll-s", "0")
    monkeypatch.setenv("CONVSERVE_MODEL_CONTROL", "poll")
    monkeypatch.setenv("CONVSERVE_POLL_S", "0.5")
    assert (parse().model_control, parse().poll_s) == ("poll", 0.5)
