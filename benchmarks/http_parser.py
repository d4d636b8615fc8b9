"""Per-call cost of the HTTP edge with uvicorn's httptools protocol (what the server uses) against h11.

Starts `serving serve` twice per round (the protocol picked by $HTTP_IMPL in the child), then from one
keep-alive client (http.client) sends 2,000 sequential calls after 100 warm-up calls: a JSON FP32
infer of one 1x1x8x8 row, and GET /v2/health/live. Prints p50, p99 and the server process's CPU time
per call (from /proc: steadier than latency on a shared machine).

    PYTHONPATH=. python benchmarks/http_parser.py MODELS_DIR
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CALLS, WARM_UP = 2000, 100
BODY = json.dumps(
    {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
).encode()


def serve_child(argv: list[str]) -> int:
    import serving.http_server as http_server

    if os.environ.get("HTTP_IMPL") == "h11":
        original = http_server.uvicorn.Config

        def config(*args, **kwargs):  # type: ignore[no-untyped-def]
            return original(*args, **{**kwargs, "http": "h11"})

        http_server.uvicorn.Config = config  # type: ignore[misc]
    from serving.__main__ import main

    return main(argv)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(port: int, pid: int, path: str, body: bytes | None) -> tuple[float, float, float]:
    connection = http.client.HTTPConnection("127.0.0.1", port)
    times = []
    for i in range(CALLS + WARM_UP):
        if i == WARM_UP:
            cpu_start = cpu_seconds(pid)
        started = time.perf_counter()
        connection.request("GET" if body is None else "POST", path, body=body)
        answer = connection.getresponse()
        answer.read()
        assert answer.status == 200, answer.status
        if i >= WARM_UP:
            times.append(time.perf_counter() - started)
    cpu = cpu_seconds(pid) - cpu_start
    connection.close()
    return statistics.median(times) * 1e6, float(np.percentile(times, 99)) * 1e6, cpu / CALLS * 1e6


def main(models: str) -> None:
    from serving.tools.launch import free_port

    for round_ in range(3):
        for impl in ("httptools", "h11"):
            port_file = Path(f"/tmp/http-parser-{os.getpid()}-{impl}")
            port_file.unlink(missing_ok=True)
            http_port = free_port("127.0.0.1")
            flags = ["serve", "--models", models, "--port", "0", "--port-file", str(port_file)]
            child = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    *flags,
                    "--http-port",
                    str(http_port),
                    "--metrics-port",
                    "0",
                ],
                env={**os.environ, "HTTP_IMPL": impl},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                while not (port_file.exists() and port_file.read_text().strip()):
                    time.sleep(0.05)
                for name, path, body in (
                    ("infer", "/v2/models/digits/infer", BODY),
                    ("live", "/v2/health/live", None),
                ):
                    p50, p99, cpu = measure(http_port, child.pid, path, body)
                    print(
                        f"round {round_} {impl:9s} {name:5s} p50 {p50:5.0f} us  p99 {p99:6.0f} us  "
                        f"server CPU {cpu:4.0f} us/call"
                    )
            finally:
                child.terminate()
                child.wait()
                port_file.unlink(missing_ok=True)


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        sys.exit(serve_child(sys.argv[2:]))
    main(sys.argv[1])
