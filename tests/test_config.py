"""The server's config: validated before anything starts; flags, environment variables and types."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from serving.config import ConfigError, ServerConfig, add_config_arguments, config_from_args
from tests.conftest import ROOT


def parse(*flags: str) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(list(flags)))


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--max-batch-size", "0"], "--max-batch-size '0': Input should be greater than or equal to 1"),
        (["--device", "bogus"], "--device 'bogus': String should match pattern"),
        (["--max-delay-ms", "-5"], "--max-delay-ms '-5': Input should be greater than or equal to 0"),
        (["--max-message-mb", "0"], "--max-message-mb '0': Input should be greater than or equal to 1"),
        (["--max-message-mb", "3000"], "--max-message-mb '3000': Input should be less than or equal to 2047"),
        (["--max-images", "0"], "--max-images '0': Input should be greater than or equal to 1"),
        (["--port", "http"], "--port 'http': Input should be a valid integer"),
        (["--log-format", "xml"], "--log-format 'xml': Input should be 'text' or 'json'"),
        (
            ["--otlp-endpoint", "collector:4318"],
            "--otlp-endpoint 'collector:4318': not an http:// or https:// URL",
        ),
    ],
)
def test_a_bad_flag_is_one_line_and_exit_code_2_before_any_port_is_bound(tmp_path, flags, named) -> None:
    command = [sys.executable, "-m", "serving", "serve", "--models", str(tmp_path), "--port", "0", *flags]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {named}"), line
    assert "Traceback" not in done.stderr and "listening" not in done.stderr + done.stdout


def test_environment_variables_convert_and_are_named_when_wrong(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CONVSERVE_REFLECTION", "false")
    monkeypatch.setenv("CONVSERVE_GRACE_S", "2.5")
    monkeypatch.setenv("CONVSERVE_LOG_LEVEL", "debug")
    monkeypatch.setenv("CONVSERVE_PORT_FILE", "/tmp/port")
    config = parse("--models", str(tmp_path))
    assert config.reflection is False and config.grace_s == 2.5 and config.log_level == "DEBUG"
    assert config.port_file == Path("/tmp/port") and isinstance(config.models, Path)
    assert parse("--models", str(tmp_path), "--reflection").reflection is True  # the flag wins
    monkeypatch.setenv("CONVSERVE_MAX_BATCH_SIZE", "many")
    with pytest.raises(ConfigError, match="CONVSERVE_MAX_BATCH_SIZE 'many': Input should be a valid integer"):
        parse("--models", str(tmp_path))


def test_settings_that_contradict_each_other_or_the_disk_are_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="max_queue_size must be at least max_batch_size"):
        parse("--models", str(tmp_path), "--max-batch-size", "64", "--max-queue-size", "8")
    with pytest.raises(ConfigError, match="is not a directory"):
        parse("--models", str(tmp_path / "none"))


def test_max_connection_age_becomes_grpc_options(tmp_path) -> None:
    from serving.server import grpc_options

    options = dict(
        grpc_options(parse("--models", str(tmp_path), "--max-connection-age-s", "30", "--grace-s", "7"))
    )
    assert (
        options["grpc.max_connection_age_ms"] == 30_000
        and options["grpc.max_connection_age_grace_ms"] == 7_000
    )
    assert "grpc.max_connection_age_ms" not in dict(grpc_options(parse("--models", str(tmp_path))))
