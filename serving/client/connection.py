"""How our clients reach a server: TLS or plaintext, an optional client certificate, a bearer token.

One `Connection` built from the same flags on every command (`--tls-ca`, `--tls-cert`, `--tls-key`,
`--tls`, `--token-file`), which then makes the channel: `channel()` for the synchronous API (the
client library, `classify`, `score`, `health`), `aio_channel()` for asyncio (`bench`'s load
generator). The token is sent as `authorization: Bearer <token>` on every call, by a channel
interceptor (plaintext channels refuse gRPC's call credentials).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from serving.tokens import parse_tokens


def read_token(path: Path) -> str:
    """The first token of a token file."""
    tokens = parse_tokens(path.read_text())
    if not tokens:
        raise ValueError(f"{path} holds no token")
    return tokens[0]


@dataclass(frozen=True)
class Connection:
    tls_ca: Path | None = None  # trust this CA (PEM); without it, the system's roots
    tls_cert: Path | None = None  # our client certificate, for a server that requires one (mTLS)
    tls_key: Path | None = None
    tls: bool = False  # TLS with the system's roots, when no file is given
    token_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")

    @property
    def secure(self) -> bool:
        return self.tls or self.tls_ca is not None or self.tls_cert is not None

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.secure:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.tls_ca.read_bytes() if self.tls_ca else None,
            private_key=self.tls_key.read_bytes() if self.tls_key else None,
            certificate_chain=self.tls_cert.read_bytes() if self.tls_cert else None,
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self.token_file is None:
            return ()
        return (("authorization", f"Bearer {read_token(self.token_file)}"),)

    def channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        credentials = self.credentials()
        channel = (
            grpc.secure_channel(target, credentials, options)
            if credentials
            else grpc.insecure_channel(target, options)
        )
        metadata = self.metadata()
        return grpc.intercept_channel(channel, AddMetadata(metadata)) if metadata else channel

    def aio_channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        metadata = self.metadata()
        interceptors = aio_metadata_interceptors(metadata) if metadata else None
        credentials = self.credentials()
        if credentials:
            return grpc.aio.secure_channel(target, credentials, options, interceptors=interceptors)
        return grpc.aio.insecure_channel(target, options, interceptors=interceptors)

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Connection:
        data = data or {}
        paths = {k: Path(v) for k, v in data.items() if k != "tls" and v is not None}
        return cls(**paths, tls=bool(data.get("tls")))


PLAINTEXT = Connection()


class CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _Details(CallDetails, grpc.ClientCallDetails):
    pass


class AddMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (the bearer token) to every call of a synchronous channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.extra = metadata

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _Details(
            details.method,
            details.timeout,
            (*(details.metadata or ()), *self.extra),
            details.credentials,
            details.wait_for_ready,
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    # Every kind of call takes the same step: the request (or request iterator) passes through.
    intercept_unary_stream = intercept_stream_unary = intercept_stream_stream = intercept_unary_unary


class _AioMetadata:
    """Adds fixed metadata (the bearer token) to every call of an asyncio channel. grpc.aio files an
    interceptor under the first call kind it implements only, hence one class per kind."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.extra = metadata

    async def _intercept(self, continuation, client_call_details, request):
        details = client_call_details._replace(
            metadata=grpc.aio.Metadata(*(client_call_details.metadata or ()), *self.extra)
        )
        return await continuation(details, request)


class _AioUnaryUnary(_AioMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _AioMetadata._intercept


class _AioUnaryStream(_AioMetadata, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _AioMetadata._intercept


class _AioStreamUnary(_AioMetadata, grpc.aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _AioMetadata._intercept


class _AioStreamStream(_AioMetadata, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _AioMetadata._intercept


def aio_metadata_interceptors(metadata: tuple[tuple[str, str], ...]) -> list[Any]:
    kinds = (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)
    return [kind(metadata) for kind in kinds]


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every command that talks to a server takes (environment variables as defaults)."""

    def env_path(name: str) -> Path | None:
        value = os.environ.get(name)
        return Path(value) if value else None

    group = parser.add_argument_group("connection (TLS, mTLS, token)")
    group.add_argument(
        "--tls-ca",
        type=Path,
        default=env_path("CONVSERVE_CLIENT_TLS_CA"),
        help="TLS: trust this CA certificate (PEM) (env CONVSERVE_CLIENT_TLS_CA)",
    )
    group.add_argument(
        "--tls-cert",
        type=Path,
        default=env_path("CONVSERVE_CLIENT_TLS_CERT"),
        help="mTLS: our client certificate (PEM), with --tls-key (env CONVSERVE_CLIENT_TLS_CERT)",
    )
    group.add_argument(
        "--tls-key",
        type=Path,
        default=env_path("CONVSERVE_CLIENT_TLS_KEY"),
        help="mTLS: our client certificate's key (PEM) (env CONVSERVE_CLIENT_TLS_KEY)",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        help="TLS with the system's trusted roots (implied by --tls-ca and --tls-cert)",
    )
    group.add_argument(
        "--token-file",
        type=Path,
        default=env_path("CONVSERVE_CLIENT_TOKEN_FILE"),
        help="send `authorization: Bearer <token>`, the file's first token (env CONVSERVE_CLIENT_TOKEN_FILE)",
    )


def connection_from_args(args: argparse.Namespace) -> Connection:
    """The Connection the flags describe; ValueError (one line) when they do not fit together."""
    connection = Connection(
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls=args.tls,
        token_file=args.token_file,
    )
    for path in (connection.tls_ca, connection.tls_cert, connection.tls_key, connection.token_file):
        if path is not None and not path.is_file():
            raise ValueError(f"{path} is not a readable file")
    if connection.token_file is not None:
        read_token(connection.token_file)
    return connection
