"""The processes a bench run talks to: the servers it measures and the load generator that drives them."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from serving.tools.bench.scenarios import chosen_scenarios
from serving.tools.launch import LaunchedServer, launch_server


@dataclass
class ExternalServer:
    """A server given with --server: measured, but neither started, stopped nor profiled here."""

    address: str
    http_address: str | None = None

    def cpu_seconds(self) -> None:
        return None

    def stop(self) -> None:
        pass


class LoadGenerator:
    """`python -m serving.tools.loadgen` in its own process, fed one scenario at a time."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving.tools.loadgen"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, command: dict) -> dict:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the load generator died")
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(30)


# (server kind, metrics state) -> the server that runs those scenarios for every model
Servers = dict[tuple[str, str], LaunchedServer | ExternalServer]


def launch_servers(args: argparse.Namespace, workdir: Path) -> Servers:
    """One server per (kind, metrics state) the chosen scenarios need, serving every model: each model's
    figures come from its own calls and its own counters, so the models share them."""
    flags = ["--device", args.device, "--max-delay-ms", str(args.max_delay_ms), "--log-level", "WARNING"]
    flags.append("--bench-service")  # the Echo RPC: the transport's ceiling
    flags += ["--workers", str(args.workers)]
    batch_flags = {"batching": str(args.max_batch_size), "no-batching": "1"}
    servers: Servers = {}
    try:
        for kind in dict.fromkeys(s.server for s in chosen_scenarios(args)):
            for state in args.metrics.split(","):
                if args.server and kind == "batching":
                    servers[kind, state] = ExternalServer(args.server, args.http_server)
                else:
                    servers[kind, state] = launch_server(
                        args.models,
                        workdir,
                        "--max-batch-size",
                        batch_flags[kind],
                        *flags,
                        metrics=state == "on",
                        http=True,
                    )
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers
