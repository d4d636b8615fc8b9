"""`--workers N`: N server processes on one port, each serving its share, drained and stopped as one."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest

from protos.convserve.v1 import convserve_pb2_grpc as pb_grpc
from serving.client import make_request
from serving.tools.launch import process_tree
from tests.conftest import encode
from tests.test_metrics import Scrape, listening_ports

pytestmark = pytest.mark.slow
WORKERS = 2


def free_port_pair() -> int:
    """A port whose successor is free too: the workers' metrics ports."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base < 65535:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", base + 1))
                except OSError:
                    continue
            return base
    raise RuntimeError("no two free ports in a row")


def start_workers(server_factory, models: Path, *flags: str):
    base = free_port_pair()
    server = server_factory(models, "--workers", str(WORKERS), "--metrics-port", str(base), *flags, http=True)
    # The pids the supervisor logs, among its children (beside them: multiprocessing's resource tracker).
    pids = re.search(r"workers starting on \S+ \(pids \[([0-9, ]+)\]\)", server.log())
    assert pids is not None, server.log()
    workers = [int(pid) for pid in pids.group(1).split(",")]
    assert len(workers) == WORKERS and set(workers) <= set(process_tree(server.process.pid))
    return server, workers, [f"127.0.0.1:{base + i}" for i in range(WORKERS)]


def answered_ok(scrape: Scrape, protocol: str) -> float:
    return sum(
        v for k, v in scrape.by_labels("convserve_requests_total", protocol=protocol, code="OK").items()
    )


def test_workers_share_the_ports_and_each_serves_its_share(server_factory, model_repo, digit_samples) -> None:
    server, workers, metrics = start_workers(server_factory, model_repo)
    grpc_port, http_port = int(server.address.rsplit(":", 1)[1]), server.http_port
    # Every worker listens on both shared ports and on its own metrics port; the supervisor on none
    # (it holds the ports bound, not listening, so the kernel gives it no connection).
    for worker, address in zip(workers, metrics, strict=True):
        assert listening_ports(worker) == {grpc_port, http_port, int(address.rsplit(":", 1)[1])}
    assert listening_ports(server.process.pid) == set()

    png = encode(digit_samples[0][0])
    calls = 40
    for _ in range(calls):  # a new connection each: the kernel spreads connections, not calls
        with grpc.insecure_channel(server.address) as channel:
            response = pb_grpc.ClassifierStub(channel).Classify(make_request([png], "digits"), timeout=30)
            assert response.results[0].label
        request = urllib.request.Request(
            f"{server.http_url}/v1/models/digits:classify", data=png, headers={"Content-Type": "image/png"}
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200

    scrapes = [Scrape(address) for address in metrics]
    grpc_counts = [answered_ok(s, "convserve_v1") for s in scrapes]
    http_counts = [answered_ok(s, "http") for s in scrapes]
    print(f"gRPC calls per worker {grpc_counts}, HTTP {http_counts}")
    assert sum(grpc_counts) == calls and sum(http_counts) == calls
    assert all(count > 0 for count in grpc_counts + http_counts), "a worker took no connection"


def test_sigterm_drains_every_worker_under_continuous_load(server_factory, model_repo, digit_samples) -> None:
    server, workers, _ = start_workers(server_factory, model_repo, "--grace-s", "5")
    request = make_request([encode(p) for p in digit_samples[0][:4]], "digits", top_k=1)
    codes: Counter = Counter()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():  # a new connection now and then, so both workers get calls
            with grpc.insecure_channel(server.address) as channel:
                stub = pb_grpc.ClassifierStub(channel)
                for _ in range(20):
                    try:
                        stub.Classify(request, timeout=10)
                        codes[grpc.StatusCode.OK] += 1
                    except grpc.RpcError as exc:
                        codes[exc.code()] += 1
                        if exc.code() == grpc.StatusCode.UNAVAILABLE:
                            break

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        while codes[grpc.StatusCode.OK] < 300:
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(15) == 0
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    print(dict(codes))
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "a worker outlived the server"
    log = server.log()
    assert log.count("stopped after") == WORKERS and "Traceback" not in log


def test_a_worker_that_dies_stops_the_server_with_exit_1(server_factory, model_repo) -> None:
    server, workers, _ = start_workers(server_factory, model_repo)
    os.kill(workers[0], signal.SIGKILL)
    assert server.process.wait(20) == 1
    assert not Path(f"/proc/{workers[1]}").exists() or _zombie(workers[1])
    assert "exited on their own" in server.log()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_every_worker_loads_a_new_version(server_factory, model_repo, tmp_path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo, repo)
    _, _, metrics = start_workers(server_factory, repo, "--model-control", "poll", "--poll-s", "0.3")
    shutil.copytree(repo / "digits" / "1", repo / "digits" / "2")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = [
            Scrape(address).get("convserve_model_state", model="digits", version="2", state="READY")
            for address in metrics
        ]
        if states == [1.0] * WORKERS:
            break
        time.sleep(0.2)
    assert states == [1.0] * WORKERS, states


def test_workers_refuse_explicit_model_control(model_repo) -> None:
    command = [sys.executable, "-m", "serving", "serve", "--models", str(model_repo), "--workers", "2"]
    done = subprocess.run(
        [*command, "--model-control", "explicit"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "--model-control explicit" in done.stderr and "one worker only" in done.stderr
