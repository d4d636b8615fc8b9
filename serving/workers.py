"""`--workers N`: N server processes on one port, so the front end can use more than one core.

One Python process runs its event loop on one core: gRPC's Python layer, parsing, the data plane and
a fast model's inline calls all share it. With N workers the parent reserves the gRPC and HTTP ports
(a bound, non-listening socket with SO_REUSEPORT, so an ephemeral port stays the same for every
worker and no other program takes it), then starts N ordinary servers (`server.run_server`, spawned)
that listen on those ports with SO_REUSEPORT: the kernel spreads new *connections* over them. Each
worker has its own batchers, input budget and model sessions (models load once per worker), its own
health and drain; worker i serves its own metrics on `--metrics-port + i - 1` (one scrape target per
worker: Prometheus adds the `instance` label, sums are taken at query time).

The parent only supervises: `--port-file` is written once every worker is SERVING; SIGTERM or
SIGINT is passed on to every worker, which drains as a single server does, and the parent exits 0
once all have exited 0. A worker that exits on its own is a failure: the others are stopped and the
parent exits 1, so that the orchestrator restarts the whole server (nothing half-served hides).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from serving.config import ServerConfig
from serving.logs import configure_logging

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # prctl(2)
STOP_MARGIN_S = 5.0  # beyond --grace-s, before a worker that has not exited is killed


@contextlib.contextmanager
def reserved_port(host: str, port: int) -> Iterator[int]:
    """Binds `host:port` (0: a free one) with SO_REUSEPORT without listening, and yields the port.

    The kernel only hands connections to listening sockets, so the reservation takes none; it keeps
    the port for the workers, which bind it too, as long as it is held."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise OSError(f"cannot listen on {host}:{port}") from None
        yield sock.getsockname()[1]


def worker_config(config: ServerConfig, index: int, port: int, http_port: int, port_file: Path) -> dict:
    """Worker `index` (0-based): the parent's settings, its ports, and a share of the cores when the
    thread counts are automatic (N processes each taking every core would only contend)."""
    share = max(1, (os.cpu_count() or 1) // config.workers)
    values = config.model_dump()
    values.update(
        workers=1,
        reuse_port=True,
        port=port,
        http_port=http_port,
        metrics_port=config.metrics_port + index if config.metrics_port else 0,
        port_file=port_file,
        intra_op_threads=config.intra_op_threads or share,
        decode_threads=config.decode_threads or share,
    )
    return values


def die_with_parent(parent: int) -> None:
    """SIGTERM (a drain) to this worker should the supervisor die without passing one on."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_worker(values: dict[str, Any], index: int, parent: int) -> None:
    """A worker process's entry point (spawned: a fresh interpreter, nothing inherited but arguments)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # until the server installs its own handlers
    die_with_parent(parent)
    configure_logging(values["log_level"], values["log_format"], worker=index + 1)
    from serving.server import run_server

    raise SystemExit(run_server(ServerConfig(**values)))


def run_workers(config: ServerConfig) -> int:
    """Starts `config.workers` servers on shared ports and supervises them until SIGTERM/SIGINT."""
    stop = {"asked": False}

    def ask_stop(signum: int, frame: object) -> None:
        stop["asked"] = True

    signal.signal(signal.SIGTERM, ask_stop)
    signal.signal(signal.SIGINT, ask_stop)
    context = multiprocessing.get_context("spawn")
    with (
        reserved_port(config.host, config.port) as port,
        (
            reserved_port(config.host, config.http_port) if config.http_port else contextlib.nullcontext(0)
        ) as http_port,
        tempfile.TemporaryDirectory(prefix="convserve-workers-") as folder,
    ):
        files = [Path(folder) / f"port-{i}" for i in range(config.workers)]
        workers = [
            context.Process(
                target=run_worker,
                args=(worker_config(config, i, port, http_port, files[i]), i, os.getpid()),
                name=f"convserve-worker-{i + 1}",
            )
            for i in range(config.workers)
        ]
        for worker in workers:
            worker.start()
        pids = [w.pid for w in workers]
        log.info("%d workers starting on %s:%d (pids %s)", len(workers), config.host, port, pids)
        serving = False
        failed = False
        while not stop["asked"]:
            if not serving and all(f.exists() for f in files):
                serving = True
                log.info("all %d workers SERVING on %s:%d", len(workers), config.host, port)
                if config.port_file:
                    config.port_file.write_text(str(port))
            ended = wait([w.sentinel for w in workers], timeout=0.2)
            if ended:
                gone = [w for w in workers if not w.is_alive()]
                log.error(
                    "worker(s) %s exited on their own (codes %s): stopping the others",
                    [w.name for w in gone],
                    [w.exitcode for w in gone],
                )
                failed = True
                break
        return stop_workers(workers, config.grace_s) or int(failed)


def stop_workers(workers: list[Any], grace_s: float) -> int:
    """SIGTERM to every worker still running, then waits; 1 when any had to be killed or failed."""
    for worker in workers:
        if worker.is_alive():
            worker.terminate()  # SIGTERM: the worker drains
    until = time.monotonic() + grace_s + STOP_MARGIN_S
    for worker in workers:
        worker.join(max(0.0, until - time.monotonic()))
        if worker.is_alive():
            log.error("%s did not stop within the grace period: killed", worker.name)
            worker.kill()
            worker.join()
    codes = [w.exitcode for w in workers]
    log.info("workers stopped (exit codes %s)", codes)
    return 0 if all(code == 0 for code in codes) else 1
