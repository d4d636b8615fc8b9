"""The server's one config object: every field is a flag `--x-y` and an environment variable `CONVSERVE_X_Y`.

Precedence: flag, then environment variable, then the default here.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from serving.batching import BatchingConfig
from serving.preprocess import DEFAULT_MAX_PIXELS
from serving.runtime import RuntimeOptions
from serving.service import DEFAULT_MAX_IMAGES

ENV_PREFIX = "CONVSERVE_"


def option(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class ServerConfig:
    models: Path = option(Path("models"), "model repository: MODELS/<name>/<version>/model.onnx")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 in containers)")
    port: int = option(8500, "port to listen on; 0 picks a free one")
    port_file: Path | None = option(None, "write the bound port here once serving (for tests and scripts)")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    max_batch_size: int = option(32, "rows (images) per model call at most")
    max_delay_ms: float = option(
        2.0, "longest a queued image waits for a batch to fill while the model is busy"
    )
    max_queue_size: int = option(2048, "images queued per model at most; beyond it RESOURCE_EXHAUSTED")
    inline_below_ms: float = option(
        0.5, "a model whose batch call takes less runs on the event loop when idle"
    )
    instances: int = option(1, "ONNX Runtime sessions per model version, each in its own worker thread")
    intra_op_threads: int = option(0, "ONNX Runtime threads per session; 0: one per core")
    decode_threads: int = option(0, "image decoding threads; 0: one per core")
    max_message_mb: int = option(64, "largest request or response message, MiB")
    max_images: int = option(DEFAULT_MAX_IMAGES, "images per request at most")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "decoded pixels per image at most (checked from the header)")
    grace_s: float = option(10.0, "on SIGTERM, how long calls in flight may take to finish")
    log_level: str = option("INFO", "DEBUG, INFO, WARNING or ERROR")

    @property
    def batching(self) -> BatchingConfig:
        return BatchingConfig(
            self.max_batch_size,
            self.max_delay_ms / 1000.0,
            self.max_queue_size,
            inline_below_s=self.inline_below_ms / 1000.0,
        )

    @property
    def runtime(self) -> RuntimeOptions:
        return RuntimeOptions(
            device=self.device, intra_op_threads=self.intra_op_threads, instances=self.instances
        )

    @property
    def resolved_decode_threads(self) -> int:
        return self.decode_threads or (os.cpu_count() or 1)

    def describe(self) -> str:
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; each default comes from its environment variable when set."""
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        env = env_name(f.name)
        convert = {"int": int, "float": float, "str": str}.get(str(f.type), Path)
        default = os.environ.get(env)
        parser.add_argument(
            flag,
            dest=f.name,
            type=convert,
            default=convert(default) if default is not None else f.default,
            help=f"{f.metadata['help']} (env {env}; default {f.default})",
        )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(**{f.name: getattr(args, f.name) for f in fields(ServerConfig)})
