"""Bearer tokens: every call but `grpc.health.v1` must carry `authorization: Bearer <token>`.

`TokenFile` holds the accepted tokens (one per line; blank lines and `#` comments ignored) and
re-reads the file when it changes, looking at most once a second, on the request path (a `stat`;
the file is read only when its size, mtime or inode changed). A file that turns empty or unreadable
keeps the tokens read before, with one warning per change. Tokens are compared in constant time
against every accepted token, and never logged.

`TokenCheck` is the gRPC side, the first step of `gate.CallGate`: a call without a token is
answered UNAUTHENTICATED, one with a wrong token PERMISSION_DENIED, by an aborting handler that reads
nothing of the request (not even a unary one), before it is parsed or admitted. The metrics count a
refusal without a model or version: they never parse it either.
Refusing costs the same whatever method name a caller makes up: nothing is kept per name.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from serving.core.errors import PermissionDenied, Unauthenticated, shown
from serving.protocols.status import log_limited
from serving.tokens import parse_tokens

log = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)  # probes need no token
CHECK_EVERY_S = 1.0
MISSING = "this server needs a bearer token: send metadata `authorization: Bearer <token>`"
WRONG = "the bearer token is not accepted"


def token_bytes(text: str) -> tuple[bytes, ...]:
    """The file's tokens as bytes, as compare_digest compares them with the metadata's."""
    return tuple(token.encode() for token in parse_tokens(text))


def bearer_token(metadata: Any) -> bytes | None:
    """The token of an `authorization: Bearer <token>` entry, or None when there is none."""
    for key, value in metadata or ():
        if key != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip().encode()
    return None


class TokenFile:
    def __init__(self, path: Path, check_every_s: float = CHECK_EVERY_S) -> None:
        self.path = path
        self.check_every_s = check_every_s
        self._stamp = self._stat()
        self._tokens = token_bytes(path.read_text())
        if not self._tokens:
            raise ValueError(f"{path} holds no token")
        self._next_check = time.monotonic() + check_every_s

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def tokens(self) -> tuple[bytes, ...]:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.check_every_s
            self._reload_if_changed()
        return self._tokens

    def _reload_if_changed(self) -> None:
        stamp = self._stat()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            tokens = token_bytes(self.path.read_text())
            problem = "holds no token"
        except (OSError, UnicodeDecodeError) as error:
            tokens, problem = (), f"cannot be read ({type(error).__name__})"
        if not tokens:
            log.warning(
                "token file %s %s: keeping the %d token(s) read before", self.path, problem, len(self._tokens)
            )
            return
        self._tokens = tokens
        log.info("token file %s re-read: %d token(s)", self.path, len(tokens))

    def accepts(self, presented: bytes) -> bool:
        """Constant time: compared against every token, whatever matched before."""
        accepted = False
        for token in self.tokens():
            accepted |= hmac.compare_digest(presented, token)
        return accepted


def check_bearer(tokens: TokenFile, presented: bytes | None, where: str, missing: str = MISSING) -> None:
    """Any transport: returns when `presented` is an accepted token; raises Unauthenticated (none
    presented) or PermissionDenied (a wrong one), logged rate-limited. `where` names the call for the log."""
    if presented is not None and tokens.accepts(presented):
        return
    error = Unauthenticated(missing) if presented is None else PermissionDenied(WRONG)
    kind = type(error).__name__
    log_limited(f"auth:{kind}", logging.WARNING, "refused %s: %s", where, kind)
    raise error


def denying_handler(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str) -> Any:
    """A handler that aborts at once, reading nothing of the request: it takes the request as a stream
    whatever the method's kind (the wire is the same), so gRPC does not receive a unary request whole
    before the refusal (a 60 MB message from a caller without a token stays unread: flow control)."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if handler is not None and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    return grpc.stream_unary_rpc_method_handler(deny)


def streams_responses(handler: grpc.RpcMethodHandler | None) -> bool:
    """Whether the method answers with a stream; an unknown method's (None) is refused as unary."""
    return handler is not None and bool(handler.response_streaming)


class TokenCheck:
    """The gRPC side of the token check, for `gate.CallGate`: which calls are refused, and
    the aborting handler each gets."""

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens
        # By the kind of answer and the code, never by the method's name: clients without a token
        # choose the names, and a cache keyed by them grew without bound (four refusals at most).
        self._denials: dict[tuple[bool, grpc.StatusCode], Any] = {}

    def refusal(self, metadata: Any, method: str) -> grpc.StatusCode | None:
        """None for a call with an accepted token; else the code it is refused with (logged, rate-limited)."""
        presented = bearer_token(metadata)
        if presented is not None and self.tokens.accepts(presented):
            return None
        code = grpc.StatusCode.UNAUTHENTICATED if presented is None else grpc.StatusCode.PERMISSION_DENIED
        log_limited(
            f"auth:{code.name}", logging.WARNING, "refused a call to %s: %s", shown(method), code.name
        )
        return code

    def denial(self, handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode) -> Any:
        key = (streams_responses(handler), code)
        denial = self._denials.get(key)
        if denial is None:
            message = MISSING if code == grpc.StatusCode.UNAUTHENTICATED else WRONG
            denial = self._denials[key] = denying_handler(handler, code, message)
        return denial
