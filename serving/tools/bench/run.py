"""`python -m serving bench`: checks the flags, starts the servers and the load generator, runs the
rounds (every model in every round), then writes the JSON figures and the Markdown report."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from serving.client.connection import PLAINTEXT, connection_from_args
from serving.tools.bench.markdown import machine, write_report
from serving.tools.bench.measure import ModelBench
from serving.tools.bench.processes import LoadGenerator, Servers, launch_servers
from serving.tools.bench.scenarios import chosen_scenarios, scenarios


def run_bench(args: argparse.Namespace) -> int:
    if args.explain:
        from serving.tools.bench_explain import run_explain_bench

        return run_explain_bench(args)
    command = "python -m serving bench " + shlex.join(
        sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]
    )
    models = args.model or ["digits", "resnet18"]
    if (problem := refusal(args, models)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    summaries = measure(args, models)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"command": command, "machine": machine(), "results": summaries}, indent=2)
    )
    print(write_report(summaries, command, args.out or Path("benchmarks/RESULTS.md")))
    return 0


def refusal(args: argparse.Namespace, models: list[str]) -> str | None:
    """Why the flags cannot run (exit code 2), before anything starts; None when they can."""
    unknown = set(args.scenario or ()) - {s.name for s in scenarios()}
    if unknown:
        return f"unknown scenario(s) {sorted(unknown)}"
    missing = [m for m in models if not (args.models / m).is_dir()]
    if missing:
        return (
            f"no model {missing} under {args.models}; build the reference models with "
            f"`python -m training reference digits|resnet18 --repository {args.models}` (make bench does)"
        )
    http_chosen = any(s.kind.startswith("http") for s in chosen_scenarios(args))
    if args.server and not args.http_server and http_chosen:
        return "the http scenarios need --http-server with --server (or --scenario)"
    if args.server and "off" in args.metrics.split(","):
        return "--metrics off needs servers the bench starts (not --server)"
    return None


def measure(args: argparse.Namespace, models: list[str]) -> list[dict]:
    """Every model's summary, from rounds that interleave the models on shared servers."""
    load = LoadGenerator()
    connection = connection_from_args(args) if args.server else PLAINTEXT
    servers: Servers = {}
    try:
        with tempfile.TemporaryDirectory() as workdir:
            servers = launch_servers(args, Path(workdir))
            benches = [ModelBench(args, model, servers, connection) for model in models]
            for round_index in range(args.rounds):
                for bench in benches:  # every model in every round
                    bench.run_round(load)
                print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
        load.close()
    return [bench.summary() for bench in benches]
