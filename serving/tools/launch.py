"""Starting a server process from another program (bench, the demo, tests) and waiting until it serves.

The server is told `--port 0 --port-file F`: it binds a free port and writes it to F only once every
model is loaded and health says SERVING, so the caller never races the start-up. Its metrics endpoint
and its HTTP server are off unless asked for (`metrics=True`, `http=True`: a free port each, picked
here and passed as --metrics-port / --http-port, the start tried again should another program take one
first), so that servers started side by side never compete for the default ports. The ports are on
`LaunchedServer`: `address` (gRPC), `http_port` / `http_url`, `metrics_address`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class LaunchedServer:
    process: subprocess.Popen
    address: str
    log_path: Path | None = None
    flags: tuple[str, ...] = ()
    metrics_address: str | None = None  # HOST:PORT of /metrics when launched with metrics=True
    http_port: int | None = None  # the HTTP server's port when launched with http=True

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    @property
    def http_address(self) -> str | None:
        """HOST:PORT of the HTTP server, or None when it is off."""
        return None if self.http_port is None else f"{self.host}:{self.http_port}"

    @property
    def http_url(self) -> str | None:
        """http://HOST:PORT (https:// when launched with --tls-cert), or None when HTTP is off."""
        if self.http_port is None:
            return None
        scheme = "https" if "--tls-cert" in self.flags else "http"
        return f"{scheme}://{self.host}:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server process and its workers (`--workers`), from /proc."""
        try:
            return sum(process_cpu_seconds(pid) for pid in process_tree(self.process.pid))
        except OSError:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signals the server and waits for it; kills it if it outlives `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc/PID/task/*/children."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").iterdir():
            with contextlib.suppress(OSError):
                pending += [int(child) for child in (task / "children").read_text().split()]
    return found


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def launch_server(
    models: Path,
    workdir: Path,
    *flags: str,
    host: str = "127.0.0.1",
    log: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    metrics: bool = False,
    http: bool = False,
    prefix: Sequence[str] = (),
) -> LaunchedServer:
    """Starts `python -m serving serve` on a free port of `host`; returns once it is SERVING.
    With `metrics` / `http`, the metrics endpoint / the HTTP server on free ports too. `prefix`
    goes before the command (e.g. `setpriv --reuid=nobody ...` to run the server as another user)."""
    for attempt in range(3):
        metrics_port = free_port(host) if metrics else 0
        http_port = free_port(host) if http else 0
        if http and http_port == metrics_port:
            continue
        ports = ("--metrics-port", str(metrics_port), "--http-port", str(http_port))
        try:
            server = _launch(models, workdir, (*ports, *flags), host, log, env, timeout, prefix)
        except RuntimeError:
            if attempt == 2 or not (metrics or http):
                raise
            continue
        server.metrics_address = f"{host}:{metrics_port}" if metrics else None
        server.http_port = http_port if http else None
        server.flags = flags
        return server
    raise RuntimeError("no free ports for the server")


def _launch(
    models: Path,
    workdir: Path,
    flags: tuple[str, ...],
    host: str,
    log: bool,
    env: dict[str, str] | None,
    timeout: float,
    prefix: Sequence[str] = (),
) -> LaunchedServer:
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = time.monotonic_ns()
    port_file = workdir / f"port-{stamp}"
    log_path = workdir / f"server-{stamp}.log" if log else None
    command = [
        *prefix,
        sys.executable,
        "-m",
        "serving",
        "serve",
        "--models",
        str(models),
        "--host",
        host,
        "--port",
        "0",
        "--port-file",
        str(port_file),
        *flags,
    ]
    log_file = log_path.open("w") if log_path else None
    try:
        process = subprocess.Popen(
            command,
            env={**os.environ, **(env or {})},
            stdout=log_file,
            stderr=subprocess.STDOUT if log_file else None,
        )
    finally:
        if log_file:
            log_file.close()
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            detail = log_path.read_text() if log_path else ""
            raise RuntimeError(f"the server did not start: {' '.join(command)}\n{detail}")
        time.sleep(0.05)
    while not (port := port_file.read_text().strip()):  # written, but not yet flushed
        time.sleep(0.01)
    return LaunchedServer(process, f"{host}:{port}", log_path)
