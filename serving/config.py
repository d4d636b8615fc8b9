"""The server's one config object: every field is a flag `--x-y` and an environment variable `CONVSERVE_X_Y`.

Precedence: flag, then environment variable, then the default. pydantic-settings reads the
environment, converts types (booleans, paths, numbers) and checks ranges; the whole config is
validated before anything starts, and a bad value is one line naming the flag (`ConfigError`).
A leaf: it imports nothing of the server but the default values.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import ssl
from pathlib import Path
from typing import Literal, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving.core import defaults
from serving.tokens import parse_tokens

ENV_PREFIX = "CONVSERVE_"


def check_tls_files(cert: Path | None, key: Path | None, client_ca: Path | None) -> None:
    """PEM files that parse, and a key that matches the certificate (what gRPC would fail on later)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as error:
            raise ValueError(
                f"--tls-cert/--tls-key: {cert} and {key} are not a PEM certificate and its key "
                f"({error.reason})"
            ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as error:
            raise ValueError(
                f"--tls-client-ca: {client_ca} is not a PEM CA certificate ({error.reason})"
            ) from None


def check_otlp_endpoint(url: str) -> None:
    """An http(s) URL, and the exporter installed: found now, not after the ports are bound."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("not an http:// or https:// URL")
    try:
        found = importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is not None
    except ModuleNotFoundError:  # a parent package missing
        found = False
    if not found:
        raise ValueError("needs the OpenTelemetry packages: pip install 'convserve[otel]'")


class ConfigError(ValueError):
    """A bad setting; the message names the flag and its environment variable."""


class ServerConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    models: Path = Field(Path("models"), description="model repository: MODELS/<name>/<version>/model.onnx")
    model_control: Literal["none", "poll", "explicit"] = Field(
        "none",
        description="none: load the repository at start; poll: rescan it every --poll-s; "
        "explicit: load and unload on RepositoryModelLoad/Unload",
    )
    poll_s: float = Field(5.0, gt=0, le=3600, description="seconds between repository scans (poll mode)")
    host: str = Field("127.0.0.1", min_length=1, description="address to listen on (0.0.0.0 in containers)")
    port: int = Field(8500, ge=0, le=65535, description="port to listen on; 0 picks a free one")
    metrics_port: int = Field(
        8502,
        ge=0,
        le=65535,
        description="Prometheus metrics over HTTP on this port of --host, at /metrics; 0: off",
    )
    http_port: int = Field(
        8501,
        ge=0,
        le=65535,
        description="HTTP/REST (Open Inference Protocol REST, image upload) on this port of --host; 0: off",
    )
    http_header_timeout_s: float = Field(
        10.0, gt=0, le=600, description="an HTTP request's headers must arrive within this, else 408"
    )
    port_file: Path | None = Field(
        None, description="write the bound port here once serving (for tests and scripts)"
    )
    device: str = Field("auto", pattern=defaults.DEVICE_PATTERN, description="auto | cpu | cuda | cuda:N")
    max_batch_size: int = Field(defaults.MAX_BATCH_SIZE, ge=1, le=4096, description="rows per model call")
    max_delay_ms: float = Field(
        defaults.MAX_DELAY_MS,
        ge=0,
        le=10_000,
        description="longest a queued image waits for a batch to fill while the model is busy",
    )
    max_queue_size: int = Field(
        defaults.MAX_QUEUE_ROWS,
        ge=1,
        description="images queued per model version; beyond: RESOURCE_EXHAUSTED",
    )
    inline_below_ms: float = Field(
        defaults.INLINE_BELOW_MS,
        ge=0,
        description="a batch whose call is expected to take less runs on the event loop",
    )
    instances: int = Field(
        1, ge=1, le=64, description="ONNX Runtime sessions per model version, one per worker"
    )
    intra_op_threads: int = Field(
        0, ge=0, le=1024, description="ONNX Runtime threads per session; 0: automatic"
    )
    allow_preprocessing_drift: bool = Field(
        False,
        description="serve a version whose fixtures/ this server decodes or runs otherwise than training did "
        "(default: UNAVAILABLE with the reason); GetModel and a metric say so",
    )
    decode_threads: int = Field(0, ge=0, le=1024, description="image decoding threads; 0: one per core")
    max_message_mb: int = Field(64, ge=1, le=2047, description="largest request or response message, MiB")
    max_images: int = Field(defaults.MAX_IMAGES, ge=1, le=100_000, description="images per request at most")
    max_pixels: int = Field(
        defaults.MAX_PIXELS,
        ge=1,
        description="pixels per image at most (read from the header before decoding)",
    )
    max_request_pixels: int = Field(
        defaults.MAX_REQUEST_PIXELS, ge=1, description="pixels per request at most, all its images together"
    )
    max_explain_copies: int = Field(
        defaults.MAX_EXPLAIN_COPIES,
        ge=1,
        le=1_000_000,
        description="occlusion's masked copies per explain request, all its images together; beyond: "
        "INVALID_ARGUMENT",
    )
    explain_max_wait_ms: float = Field(
        defaults.LOW_PRIORITY_MAX_WAIT_MS,
        ge=0,
        le=600_000,
        description="longest occlusion copies (low priority) wait behind classification before they go first",
    )
    input_budget_mb: int = Field(
        defaults.INPUT_BUDGET_MB,
        ge=1,
        description="decoded and queued model input, server-wide, MiB; beyond: RESOURCE_EXHAUSTED",
    )
    max_connection_age_s: float = Field(
        0.0,
        ge=0,
        description="close each client connection after this long (0: never), so clients re-resolve and "
        "reach new replicas; its calls in flight get --grace-s",
    )
    grace_s: float = Field(
        10.0, gt=0, le=3600, description="on SIGTERM, the whole shutdown takes at most this"
    )
    reflection: bool = Field(True, description="serve gRPC server reflection")
    bench_service: bool = Field(
        False, description="serve convserve.v1.Bench (Echo: the transport's ceiling, for `bench`)"
    )
    tls_cert: Path | None = Field(
        None, description="TLS: the server's certificate chain (PEM); with --tls-key"
    )
    tls_key: Path | None = Field(None, description="TLS: the server's private key (PEM); with --tls-cert")
    tls_client_ca: Path | None = Field(
        None, description="mTLS: require client certificates signed by this CA (PEM); needs --tls-cert"
    )
    auth_token_file: Path | None = Field(
        None,
        description="require `authorization: Bearer <token>` with a token from this file (one per line; "
        "re-read when it changes); grpc.health.v1 stays open",
    )
    keepalive_time_s: float = Field(
        60.0, gt=0, description="ping a client connection after this long without activity"
    )
    keepalive_timeout_s: float = Field(
        20.0, gt=0, description="close a connection whose ping is not answered within this"
    )
    keepalive_min_ping_interval_s: float = Field(
        10.0,
        ge=0,
        description="clients pinging more often than this get GOAWAY (too_many_pings)",
    )
    keepalive_permit_without_calls: bool = Field(
        True, description="allow client keepalive pings on connections with no call in flight"
    )
    max_concurrent_streams: int = Field(
        256, ge=1, le=1_000_000, description="calls (HTTP/2 streams) open at once per client connection"
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="server processes sharing --port and --http-port (SO_REUSEPORT), each with its own "
        "batchers and model sessions; worker i serves metrics on --metrics-port + i - 1",
    )
    reuse_port: bool = Field(
        False,
        description="listen with SO_REUSEPORT, so that other processes may share the ports (each of "
        "--workers does)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text: one readable line per event; json: one JSON object per line, for every logger "
        "(gRPC's and uvicorn's too)",
    )
    access_log: bool = Field(
        False,
        description="one event per answered request on logger convserve.access: protocol, method, model, "
        "status, images, the receipt's times, trace id, peer",
    )
    otlp_endpoint: str = Field(
        "",
        description="export OpenTelemetry spans (OTLP over HTTP/protobuf) to this URL, e.g. "
        "http://collector:4318/v1/traces; needs the `otel` extra; empty: off",
    )

    @field_validator("otlp_endpoint")
    @classmethod
    def _otlp_endpoint(cls, value: str) -> str:
        if value:
            check_otlp_endpoint(value)
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> ServerConfig:
        """Flags that only make sense together: sizes, ports, workers."""
        if self.max_queue_size < self.max_batch_size:
            raise ValueError("max_queue_size must be at least max_batch_size")
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError(f"metrics_port must differ from port ({self.port})")
        if self.http_port and self.http_port in (self.port, self.metrics_port):
            raise ValueError(f"http_port must differ from port and metrics_port ({self.http_port})")
        if self.workers > 1 and self.model_control == "explicit":
            raise ValueError(
                "--workers > 1 and --model-control explicit do not go together: a load or unload call "
                "reaches one worker only (use poll, which every worker does)"
            )
        if self.workers > 1 and self.metrics_port:
            taken = {self.port, self.http_port} - {0}
            last = self.metrics_port + self.workers - 1
            if last > 65535 or taken & set(range(self.metrics_port, last + 1)):
                raise ValueError(
                    f"--workers {self.workers} need metrics ports {self.metrics_port}-{last}, free of "
                    "--port and --http-port and at most 65535"
                )
        return self

    @model_validator(mode="after")
    def _files_usable(self) -> ServerConfig:
        """Every file a flag names is there and readable, and TLS's come in the pairs it needs."""
        if not self.models.is_dir():
            raise ValueError(f"models: {self.models} is not a directory")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            path = getattr(self, name)
            if path is not None and not (path.is_file() and os.access(path, os.R_OK)):
                raise ValueError(f"{flag(name)}: {path} is not a readable file")
        check_tls_files(self.tls_cert, self.tls_key, self.tls_client_ca)
        if self.auth_token_file is not None and not parse_tokens(self.auth_token_file.read_text()):
            raise ValueError(f"--auth-token-file: {self.auth_token_file} holds no token")
        return self

    @property
    def resolved_decode_threads(self) -> int:
        return self.decode_threads or (os.cpu_count() or 1)

    def describe(self) -> str:
        return " ".join(f"{name}={getattr(self, name)}" for name in type(self).model_fields)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


# `serve --help` in sections: each field's section, in this order; a field named in none (a new one) is
# still listed, under OTHER_GROUP.
HELP_GROUPS: dict[str, tuple[str, ...]] = {
    "models": (
        "models",
        "model_control",
        "poll_s",
        "device",
        "instances",
        "intra_op_threads",
        "allow_preprocessing_drift",
    ),
    "network": ("host", "port", "http_port", "port_file", "reflection", "bench_service"),
    "batching": (
        "max_batch_size",
        "max_delay_ms",
        "max_queue_size",
        "inline_below_ms",
        "explain_max_wait_ms",
    ),
    "limits": (
        "max_message_mb",
        "max_images",
        "max_pixels",
        "max_request_pixels",
        "max_explain_copies",
        "input_budget_mb",
        "max_concurrent_streams",
        "http_header_timeout_s",
    ),
    "connections and shutdown": (
        "keepalive_time_s",
        "keepalive_timeout_s",
        "keepalive_min_ping_interval_s",
        "keepalive_permit_without_calls",
        "max_connection_age_s",
        "grace_s",
    ),
    "processes and threads": ("workers", "reuse_port", "decode_threads"),
    "security": ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"),
    "metrics and logging": (
        "metrics_port",
        "log_level",
        "log_format",
        "access_log",
        "otlp_endpoint",
    ),
}
OTHER_GROUP = "other"


def help_groups() -> dict[str, list[str]]:
    """Section title -> its fields; every field exactly once."""
    fields = ServerConfig.model_fields
    groups = {title: [name for name in names if name in fields] for title, names in HELP_GROUPS.items()}
    listed = {name for names in groups.values() for name in names}
    groups[OTHER_GROUP] = [name for name in fields if name not in listed]
    return {title: names for title, names in groups.items() if names}


def choices(annotation: object) -> tuple[object, ...]:
    """A `Literal[...]` field's values (optional or not); () for any other type."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return next((values for arg in get_args(annotation) if (values := choices(arg))), ())


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, in sections. Flags not given are left out, so the environment and
    defaults apply. Enumerated flags show their values; pydantic checks them, as every other value."""
    for title, names in help_groups().items():
        group = parser.add_argument_group(title)
        for name in names:
            field = ServerConfig.model_fields[name]
            help_text = f"{field.description} (env {env_name(name)}; default {field.default})"
            if field.annotation is bool:
                group.add_argument(
                    flag(name),
                    dest=name,
                    action=argparse.BooleanOptionalAction,
                    default=argparse.SUPPRESS,
                    help=help_text,
                )
                continue
            values = choices(field.annotation)
            metavar = "{" + ",".join(map(str, values)) + "}" if values else None
            group.add_argument(
                flag(name), dest=name, default=argparse.SUPPRESS, metavar=metavar, help=help_text
            )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    given = {name: getattr(args, name) for name in ServerConfig.model_fields if hasattr(args, name)}
    try:
        return ServerConfig(**given)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc, given)) from None


def describe_error(exc: ValidationError, given: dict[str, object]) -> str:
    """One line per bad setting, naming the flag (or variable) and the value."""
    lines = []
    for error in exc.errors(include_url=False):
        name = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        if name not in ServerConfig.model_fields:  # a check across fields
            lines.append(message)
            continue
        source = flag(name) if name in given else env_name(name)
        value = given.get(name, os.environ.get(env_name(name)))
        lines.append(f"{source} {value!r}: {message}")
    return "; ".join(lines)
