"""One model's rounds: its in-process limit, then every chosen scenario on the shared servers."""

from __future__ import annotations

import argparse

from serving.client.connection import PLAINTEXT, Connection
from serving.tools.bench.in_process import LIMIT_BATCH_SIZES, InProcessLimit
from serving.tools.bench.processes import ExternalServer, LoadGenerator, Servers
from serving.tools.bench.scenarios import Scenario, chosen_scenarios, variant
from serving.tools.bench.summary import Measured, summarise


def model_stats(address: str, model: str, connection: Connection) -> tuple[int, int]:
    from serving.client import ClassifierClient

    with ClassifierClient(address, timeout=10, connection=connection) as client:
        stats = client.get_model(model).stats
    return stats.items, stats.batches


class ModelBench:
    """One model's in-process limit and figures on the shared servers, measured a round at a time so
    that the rounds of several models interleave: drift in the machine's speed hits every model alike
    (the resize modes are compared across models)."""

    def __init__(
        self, args: argparse.Namespace, model: str, servers: Servers, connection: Connection
    ) -> None:
        self.args, self.model = args, model
        path = args.models / model
        path = path / str(max(int(p.name) for p in path.iterdir() if p.name.isdigit()))
        self.limit = InProcessLimit(path, args.device)
        self.connection = connection
        self.servers = servers
        self.chosen = chosen_scenarios(args)
        self.states = args.metrics.split(",")
        self.limits: dict[int, list[tuple[float, float]]] = {b: [] for b in LIMIT_BATCH_SIZES}
        self.results = {variant(s.name, state): Measured() for s in self.chosen for state in self.states}

    def run_round(self, load: LoadGenerator) -> None:
        for batch in LIMIT_BATCH_SIZES:  # the limit, then the server, alternating every round
            self.limits[batch].append(self.limit.measure(batch, min(self.args.duration, 1.0)))
        for scenario, state in ((s, state) for s in self.chosen for state in self.states):
            self.run_scenario(load, scenario, state)

    def run_scenario(self, load: LoadGenerator, scenario: Scenario, state: str) -> None:
        args, model = self.args, self.model
        server = self.servers[scenario.server, state]
        link = self.connection if isinstance(server, ExternalServer) else PLAINTEXT
        items0, batches0 = model_stats(server.address, model, link)
        cpu0 = server.cpu_seconds()
        http = server.http_address
        command = scenario.command(
            server.address, model, args.duration, link, args.image_size, http, args.channels
        )
        result = load.run(command)
        cpu1 = server.cpu_seconds()
        items1, batches1 = model_stats(server.address, model, link)
        measured = self.results[variant(scenario.name, state)]
        measured.images_per_s.append(result["images_per_s"])
        measured.p50.append(result["p50_ms"])
        measured.p95.append(result["p95_ms"])
        measured.p99.append(result["p99_ms"])
        measured.errors += result["errors"]
        # With --workers, GetModel reaches whichever worker takes the connection: its counts are
        # one worker's, so neither the mean batch nor the images seen are known.
        one_process = args.workers == 1
        if scenario.kind != "echo" and batches1 > batches0 and one_process:
            measured.batch.append((items1 - items0) / (batches1 - batches0))
        if cpu0 is not None and cpu1 is not None and result["images"]:
            # Warm-up calls count in the CPU time too: scale by all images the server saw.
            seen = items1 - items0 if scenario.kind != "echo" and one_process else result["images"]
            measured.cpu_ms_per_image.append(1000 * (cpu1 - cpu0) / max(seen, 1))

    def summary(self) -> dict:
        return summarise(self.model, self.limits, self.results)
