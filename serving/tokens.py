"""The token file's format, read the same way by the server (`--auth-token-file`) and its clients
(`--token-file`): one bearer token per line; blank lines and lines starting with # are ignored."""

from __future__ import annotations


def parse_tokens(text: str) -> tuple[str, ...]:
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))
