"""The HTTP server (`--http-port`): uvicorn (httptools) serving the REST routes on gRPC's event loop.

Same process, same loop, same data plane and batchers as gRPC, so an HTTP request and a gRPC call
share a batch. uvicorn is embedded, not run: `Server.serve()` would install its own signal handlers,
while SIGTERM belongs to `server.serve` (`Server.shut_down` stops this server as part of its drain).

Connections (what uvicorn does not do by itself):
  * a request's headers must arrive within `--http-header-timeout-s` of its first byte (a client
    trickling headers is answered 408 and closed), and hold at most MAX_HEADERS headers of
    MAX_HEADER_BYTES in all (431 and closed);
  * TLS and mTLS from --tls-cert/--tls-key/--tls-client-ca, as for gRPC;
  * idle keep-alive connections close after KEEP_ALIVE_S;
  * what uvicorn logs about a client's bad bytes ("Invalid HTTP request received.") is rate-limited:
    no client can flood the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.config import ServerConfig
from serving.protocols import openapi, rest_v1, rest_v2, web_page
from serving.protocols.http_edge import HttpEdge

log = logging.getLogger(__name__)

MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 * 1024
KEEP_ALIVE_S = 75.0  # longer than the usual load balancer's idle timeout (60 s)


class RateLimitedWarnings(logging.Filter):
    """Lets each kind of warning (its message template) through at most once per `interval_s`."""

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = str(record.msg)[:200]
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            return False
        self._last[key] = now
        return True


def limit_uvicorn_warnings() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, RateLimitedWarnings) for f in logger.filters):
        logger.addFilter(RateLimitedWarnings())


def _refuse(transport: asyncio.Transport, status: str, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    transport.write(head.encode() + body)
    transport.close()


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header-read timeout and limits on the headers."""

    header_timeout_s = 10.0

    # As uvicorn's own: asyncio.Protocol's signature says BaseTransport; a stream server's is a Transport.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_count = 0
        self._header_bytes = 0
        # From the connection's first byte too: a client that connects and sends nothing is closed.
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.header_timeout_s, self._headers_too_slow
        )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_count = self._header_bytes = 0
        self._stop_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value)
        if self._header_count > MAX_HEADERS or self._header_bytes > MAX_HEADER_BYTES:
            if not self.transport.is_closing():
                self._stop_timer()
                _refuse(
                    self.transport,
                    "431 Request Header Fields Too Large",
                    f"at most {MAX_HEADERS} headers of {MAX_HEADER_BYTES} bytes in all",
                )
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._stop_timer()
        if self.transport.is_closing():
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self.transport.is_closing():
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self.transport.is_closing():
            super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def _stop_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            _refuse(
                self.transport,
                "408 Request Timeout",
                f"the request's headers did not arrive within {self.header_timeout_s:g}s",
            )


async def not_found(request: Request, error: Exception) -> JSONResponse:
    status = error.status_code if isinstance(error, HTTPException) else 404
    detail = error.detail if isinstance(error, HTTPException) else "not found"
    message = f"{request.method} {request.url.path[:200]}: {detail}"
    return JSONResponse({"error": message}, status_code=status)


def build_app(edge: HttpEdge) -> Starlette:
    routes = [*rest_v2.routes(edge), *rest_v1.routes(edge), *openapi.routes(edge), *web_page.routes(edge)]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


class EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the composition root owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # --workers: the kernel spreads new connections over the processes listening
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise OSError(f"cannot listen for HTTP on {host}:{port}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class HttpServer:
    def __init__(self, config: ServerConfig, edge: HttpEdge) -> None:
        timeout = {"header_timeout_s": config.http_header_timeout_s}
        protocol = type("Protocol", (GuardedHttpProtocol,), timeout)
        tls = config.tls_cert is not None
        client_ca = config.tls_client_ca if tls else None
        self.uvicorn_config = uvicorn.Config(
            build_app(edge),
            http=protocol,
            lifespan="off",
            access_log=False,
            log_config=None,
            server_header=False,
            timeout_keep_alive=int(KEEP_ALIVE_S),
            ssl_certfile=str(config.tls_cert) if tls else None,
            ssl_keyfile=str(config.tls_key) if tls else None,
            ssl_ca_certs=str(client_ca) if client_ca is not None else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if client_ca is not None else ssl.CERT_NONE,
        )
        self.server = EmbeddedServer(self.uvicorn_config)
        limit_uvicorn_warnings()
        self.host = config.host
        self.requested_port = config.http_port
        self.reuse_port = config.reuse_port
        self.port = 0
        self._socket: socket.socket | None = None
        self._main: asyncio.Task | None = None

    async def start(self) -> int:
        self._socket = bind(self.host, self.requested_port, self.reuse_port)
        self.port = self._socket.getsockname()[1]
        self.uvicorn_config.load()
        self.server.lifespan = self.uvicorn_config.lifespan_class(self.uvicorn_config)
        await self.server.startup(sockets=[self._socket])
        self._main = asyncio.create_task(self.server.main_loop())
        return self.port

    def stop_accepting(self) -> None:
        """Closes the listener; connections already open keep being served."""
        for server in self.server.servers:
            server.close()

    async def stop(self, timeout_s: float) -> None:
        """Stops accepting, lets the responses in flight finish (each then closes its connection), closes
        idle connections; what is left after `timeout_s` is cancelled."""
        if self._main is None:
            return
        self.server.should_exit = True
        # uvicorn annotates it int but uses it as asyncio.wait_for's timeout: a float keeps sub-second ones.
        self.uvicorn_config.timeout_graceful_shutdown = max(0.0, timeout_s)  # type: ignore[assignment]
        await self._main
        await self.server.shutdown(sockets=[self._socket] if self._socket else None)
        self._main = None
