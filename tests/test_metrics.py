"""Prometheus metrics (`--metrics-port`): a real server process, a known load over both protocols
(answered, refused and invalid calls), a real HTTP scrape parsed by prometheus_client, exact counts
checked against the load and against GetModel / ModelStatistics. Also: the endpoint is off at 0,
servers in one process keep their own figures, the flag is validated, the compose monitoring
profile's Prometheus configuration passes `promtool check config`."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from protos.convserve.v1 import convserve_pb2 as pb
from protos.convserve.v1 import convserve_pb2_grpc as pb_grpc
from protos.inference import grpc_service_pb2 as kpb
from protos.inference import grpc_service_pb2_grpc as kpb_grpc
from serving.protocols.kserve_v2 import ENCODED_INPUT, join_bytes
from serving.tools.launch import free_port
from tests.conftest import ROOT, encode
from tests.test_deploy import compose_config, require

pytestmark = pytest.mark.slow
V1, V2 = "convserve_v1", "kserve_v2"
STATES = {"LOADING", "WARMING", "READY", "UNAVAILABLE", "DRAINING", "UNLOADED"}


# -- the plain-number histograms the request path keeps ----------------------------------------------


def test_histograms_count_each_value_in_the_first_bucket_that_holds_it() -> None:
    from serving.core.timing import Histogram
    from serving.metrics import batch_size_bounds

    histogram = Histogram((0.001, 0.01, 0.1))
    for value in (0.0005, 0.001, 0.002, 0.01, 0.5, 3.0):
        histogram.observe(value)
    # Prometheus's `le`: a value equal to a bound counts in that bound's bucket.
    assert histogram.cumulative() == [(0.001, 2), (0.01, 4), (0.1, 4), (float("inf"), 6)]
    assert histogram.count == 6 and histogram.total == pytest.approx(3.5135)
    assert batch_size_bounds(32) == [1, 2, 4, 8, 16, 32]
    assert batch_size_bounds(24) == [1, 2, 4, 8, 16, 24]
    assert batch_size_bounds(1) == [1]


# -- scraping -------------------------------------------------------------------------------------


class Scrape:
    """One scrape, parsed with prometheus_client's own parser."""

    def __init__(self, address: str) -> None:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            self.text = response.read().decode()
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def get(self, name: str, **labels: str) -> float:
        """The one sample called `name` whose labels are exactly `labels` (0 when there is none)."""
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else 0.0

    def by_labels(self, name: str, **subset: str) -> dict[tuple, float]:
        return {
            tuple(sorted(s.labels.items())): s.value
            for s in self.samples
            if s.name == name and subset.items() <= s.labels.items()
        }

    def buckets(self, name: str, **labels: str) -> dict[str, float]:
        return {
            s.labels["le"]: s.value
            for s in self.samples
            if s.name == f"{name}_bucket" and {k: v for k, v in s.labels.items() if k != "le"} == labels
        }


def listening_ports(pid: int) -> set[int]:
    """The TCP ports a process listens on: its socket inodes matched against the kernel's tables."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if match := re.fullmatch(r"socket:\[(\d+)\]", target):
            inodes.add(match.group(1))
    ports = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        for line in path.read_text().splitlines()[1:] if path.exists() else []:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


# -- the known load -------------------------------------------------------------------------------


@pytest.fixture
def two_versions(model_repo: Path, tmp_path: Path) -> Path:
    """digits version 1 (served) and version 2, a corrupt file (UNAVAILABLE)."""
    repo = tmp_path / "repo"
    shutil.copytree(model_repo, repo)
    (repo / "digits" / "2").mkdir()
    (repo / "digits" / "2" / "model.onnx").write_bytes(b"not an onnx file")
    return repo


def code_of(call) -> str:
    try:
        call()
    except grpc.RpcError as error:
        return error.code().name
    return "OK"


def test_a_known_load_is_counted_exactly(server_factory, two_versions: Path, digit_samples) -> None:
    # Batches of at most 4 rows; a request of 5 images can never fit the queue: RESOURCE_EXHAUSTED.
    server = server_factory(
        two_versions, "--max-batch-size", "4", "--max-queue-size", "4", "--max-delay-ms", "5", metrics=True
    )
    assert server.metrics_address is not None
    grpc_port, metrics_port = (int(a.rsplit(":", 1)[1]) for a in (server.address, server.metrics_address))
    assert listening_ports(server.process.pid) == {grpc_port, metrics_port}

    pngs = [encode(p) for p in digit_samples[0][:8]]
    pixels = digit_samples[0][:8].astype("<f4") * np.float32(1 / 255)
    channel = grpc.insecure_channel(server.address)
    v1 = pb_grpc.ClassifierStub(channel)
    v2 = kpb_grpc.GRPCInferenceServiceStub(channel)
    input_name = v1.GetModel(pb.GetModelRequest(name="digits")).input.name

    def classify(images: list[bytes], **fields) -> str:
        request = pb.ClassifyRequest(images=[pb.Image(encoded=i) for i in images], **fields)
        return code_of(lambda: v1.Classify(request, timeout=30))

    def infer(count: int, name: str = input_name, model: str = "digits") -> kpb.ModelInferRequest:
        tensor = kpb.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=[count, 1, 8, 8])
        return kpb.ModelInferRequest(
            model_name=model, inputs=[tensor], raw_input_contents=[pixels[:count].tobytes()]
        )

    def infer_encoded(count: int, model: str = "digits") -> kpb.ModelInferRequest:
        tensor = kpb.ModelInferRequest.InferInputTensor(name=ENCODED_INPUT, datatype="BYTES", shape=[count])
        return kpb.ModelInferRequest(
            model_name=model, inputs=[tensor], raw_input_contents=[join_bytes(pngs[:count])]
        )

    codes: Counter[tuple[str, str, str, str]] = Counter()  # (protocol, model, version, code) -> calls
    for _ in range(5):
        codes[V1, "digits", "1", classify(pngs[:3])] += 1
    codes[V1, "digits", "1", classify([pngs[0], b"not an image"])] += 1  # OK, with one per-image error
    for _ in range(2):
        codes[V1, "digits", "1", classify([b"junk"])] += 1
    codes[V1, "", "", classify(pngs[:1], model="nope")] += 1
    codes[V1, "digits", "2", classify(pngs[:1], version=2)] += 1
    codes[V1, "digits", "1", classify(pngs[:5])] += 1
    garbage = channel.unary_unary("/convserve.v1.Classifier/Classify")  # bytes in, bytes out
    codes[V1, "", "", code_of(lambda: garbage(b"\xff\xff\xff", timeout=30))] += 1

    messages = [
        pb.ClassifyRequest(id=str(i), images=[pb.Image(encoded=p) for p in pngs[:2]]) for i in range(3)
    ]
    messages.append(pb.ClassifyRequest(id="bad", images=[pb.Image(encoded=b"junk")]))
    for response in v1.ClassifyStream(iter(messages), timeout=30):
        code = grpc.StatusCode.INVALID_ARGUMENT.name if response.HasField("error") else "OK"
        codes[V1, "digits", "1", code] += 1

    for _ in range(4):
        codes[V2, "digits", "1", code_of(lambda: v2.ModelInfer(infer(2), timeout=30))] += 1
    codes[V2, "digits", "1", code_of(lambda: v2.ModelInfer(infer(1, name="wrong"), timeout=30))] += 1
    codes[V2, "", "", code_of(lambda: v2.ModelInfer(infer(1, model="nope"), timeout=30))] += 1
    codes[V2, "digits", "1", code_of(lambda: v2.ModelInfer(infer(5), timeout=30))] += 1
    stream = [infer_encoded(1), infer_encoded(1), infer_encoded(1, model="nope")]
    for response in v2.ModelStreamInfer(iter(stream), timeout=30):
        model = "" if response.error_message else "digits"
        codes[V2, model, "1" if model else "", "NOT_FOUND" if response.error_message else "OK"] += 1

    # What the client saw is what the load was meant to be.
    assert codes == {
        (V1, "digits", "1", "OK"): 9,
        (V1, "digits", "1", "INVALID_ARGUMENT"): 3,
        (V1, "digits", "1", "RESOURCE_EXHAUSTED"): 1,
        (V1, "digits", "2", "UNAVAILABLE"): 1,
        (V1, "", "", "NOT_FOUND"): 1,
        (V1, "", "", "INVALID_ARGUMENT"): 1,
        (V2, "digits", "1", "OK"): 6,
        (V2, "digits", "1", "INVALID_ARGUMENT"): 1,
        (V2, "digits", "1", "RESOURCE_EXHAUSTED"): 1,
        (V2, "", "", "NOT_FOUND"): 2,
    }
    info = v1.GetModel(pb.GetModelRequest(name="digits", version=1))
    statistics = v2.ModelStatistics(kpb.ModelStatisticsRequest(name="digits", version="1")).model_stats[0]
    scrape = Scrape(server.metrics_address)

    counted = {
        (s.labels["protocol"], s.labels["model"], s.labels["version"], s.labels["code"]): s.value
        for s in scrape.samples
        if s.name == "convserve_requests_total"
    }
    assert counted == codes
    # One request ledger, three views: GetModel, ModelStatistics and convserve_requests_total agree
    # exactly on the version's requests over both protocols, answered and failed.
    mine = {(p, c): n for (p, m, v, c), n in codes.items() if (m, v) == ("digits", "1")}
    answered = sum(n for (_, c), n in mine.items() if c == "OK")
    failed = sum(n for (_, c), n in mine.items() if c != "OK")
    assert (answered, failed) == (9 + 6, 3 + 1 + 1 + 1)
    assert (info.stats.requests, info.stats.failed) == (answered, failed)
    inference = statistics.inference_stats
    assert (inference.success.count, inference.fail.count) == (answered, failed)
    assert inference.success.ns > 0 and inference.fail.ns > 0 and statistics.last_inference > 0
    assert scrape.get("convserve_images_total", protocol=V1, model="digits", version="1") == 5 * 3 + 2 + 3 * 2
    assert scrape.get("convserve_images_total", protocol=V2, model="digits", version="1") == 4 * 2 + 2
    for protocol in (V1, V2):
        labels = {"protocol": protocol, "model": "digits", "version": "1"}
        count = scrape.get("convserve_request_duration_seconds_count", **labels)
        assert count == codes[protocol, "digits", "1", "OK"]
        assert scrape.buckets("convserve_request_duration_seconds", **labels)["+Inf"] == count
        assert scrape.get("convserve_request_duration_seconds_sum", **labels) > 0

    # Per version: the batcher's figures, exactly as GetModel and ModelStatistics give them.
    one = {"model": "digits", "version": "1"}
    stats = info.stats
    assert stats.items == 5 * 3 + 1 + 3 * 2 + 4 * 2 + 2  # the per-image error's row never ran
    buckets = scrape.buckets("convserve_batch_size", **one)
    assert buckets == {
        "1.0": stats.batch_sizes.get(1, 0),
        "2.0": stats.batch_sizes.get(1, 0) + stats.batch_sizes.get(2, 0),
        "4.0": stats.batches,
        "+Inf": stats.batches,
    }
    assert set(stats.batch_sizes) <= {1, 2, 3, 4}
    assert scrape.get("convserve_batch_size_count", **one) == stats.batches
    assert scrape.get("convserve_batch_size_sum", **one) == stats.items
    assert scrape.get("convserve_rejected_requests_total", **one) == stats.rejected == 2
    assert scrape.get("convserve_expired_requests_total", **one) == stats.expired == 0
    assert scrape.get("convserve_dropped_rows_total", **one) == stats.dropped_rows == 0
    # Every request that reached the queue waited there once; every batch was one model call.
    assert (
        scrape.get("convserve_queue_wait_seconds_count", **one)
        == statistics.inference_stats.queue.count
        == 15
    )
    assert scrape.get("convserve_compute_seconds_count", **one) == statistics.execution_count == stats.batches
    # Requests whose images were turned into rows: all but those refused before (unknown model or
    # version, wrong input name, bytes that are no message).
    assert scrape.get("convserve_decode_seconds_count", **one) == 9 + 4 + 5 + 2
    assert scrape.get("convserve_pending_rows", **one) == 0
    assert scrape.get("convserve_pending_bytes") == 0
    assert scrape.get("convserve_input_budget_bytes") == 256 * 1024 * 1024
    for version, state in (("1", "READY"), ("2", "UNAVAILABLE")):
        states = {
            s: scrape.get("convserve_model_state", model="digits", version=version, state=s) for s in STATES
        }
        assert states == {s: float(s == state) for s in STATES}, version
    assert not scrape.by_labels("convserve_batch_size_count", version="2")  # not loaded: state only
    channel.close()
    assert server.stop() == 0
    assert "Traceback" not in server.log()


def test_metrics_port_0_serves_no_metrics(server_factory, model_repo: Path) -> None:
    server = server_factory(model_repo, "--metrics-port", "0")
    grpc_port = int(server.address.rsplit(":", 1)[1])
    assert listening_ports(server.process.pid) == {grpc_port}
    assert "metrics on" not in server.log()


def test_servers_in_one_process_keep_their_own_figures(
    threaded_server, model_repo: Path, digit_samples
) -> None:
    servers = []
    for _ in range(2):
        for attempt in range(3):  # a free port can be taken between the probe and the bind
            port = free_port("127.0.0.1")
            try:
                servers.append((threaded_server(model_repo, "--metrics-port", str(port)), port))
                break
            except OSError:
                if attempt == 2:
                    raise
    request = pb.ClassifyRequest(images=[pb.Image(encoded=encode(digit_samples[0][0]))])
    for (server, _), calls in zip(servers, (3, 1), strict=True):
        with grpc.insecure_channel(server.address) as channel:
            for _ in range(calls):
                pb_grpc.ClassifierStub(channel).Classify(request, timeout=30)
    for (_, port), calls in zip(servers, (3, 1), strict=True):
        scrape = Scrape(f"127.0.0.1:{port}")
        labels = {"protocol": V1, "model": "digits", "version": "1", "code": "OK"}
        assert scrape.get("convserve_requests_total", **labels) == calls
        assert scrape.get("convserve_batch_size_sum", model="digits", version="1") == calls


# -- the flag -------------------------------------------------------------------------------------


def parse(*flags: str):
    import argparse

    from serving.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(list(flags)))


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--metrics-port", "70000"], "--metrics-port '70000': Input should be less than or equal to 65535"),
        (["--metrics-port", "-1"], "--metrics-port '-1': Input should be greater than or equal to 0"),
        (["--metrics-port", "http"], "--metrics-port 'http': Input should be a valid integer"),
        (["--port", "9000", "--metrics-port", "9000"], "metrics_port must differ from port (9000)"),
    ],
)
def test_a_bad_metrics_port_is_one_line_and_exit_code_2(tmp_path, flags, named) -> None:
    command = [sys.executable, "-m", "serving", "serve", "--models", str(tmp_path), *flags]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {named}"), line


def test_metrics_are_on_by_default_beside_the_grpc_port(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("CONVSERVE_METRICS_PORT", raising=False)
    assert parse("--models", str(tmp_path)).metrics_port == 8502
    monkeypatch.setenv("CONVSERVE_METRICS_PORT", "0")
    assert parse("--models", str(tmp_path)).metrics_port == 0


def test_a_taken_metrics_port_is_one_log_line_and_exit_code_1(model_repo: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "serving", "serve", "--models", str(model_repo), "--port", "0"]
        done = subprocess.run(
            [*command, "--metrics-port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


# -- the compose monitoring profile ---------------------------------------------------------------


PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def test_the_prometheus_configuration_passes_promtool(tmp_path: Path) -> None:
    done = subprocess.run(
        [require("promtool"), "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # And promtool is a real check: a configuration with a mistake is refused.
    broken = tmp_path / "prometheus.yml"
    broken.write_text(PROMETHEUS_CONFIG.read_text().replace("type: A", "type: NOPE"))
    refused = subprocess.run(
        [require("promtool"), "check", "config", str(broken)], capture_output=True, text=True
    )
    assert refused.returncode != 0


def volume(entry: str | dict) -> tuple[str, str]:
    """(target, source) of a volume in either of `config`'s spellings (docker-compose 1.x: short)."""
    if isinstance(entry, dict):
        return entry["target"], entry.get("source", "")
    source, target = entry.split(":")[:2]
    return target, source


def published(entry: str | dict) -> tuple[str, str, str]:
    """(host address, host port, container port) of a published port, in either spelling."""
    if isinstance(entry, dict):
        return entry.get("host_ip", ""), str(entry.get("published", "")), str(entry["target"])
    parts = entry.split("/")[0].split(":")
    host_ip = parts[0] if len(parts) == 3 else ""
    return host_ip, parts[-2] if len(parts) > 1 else "", parts[-1]


def test_the_monitoring_profile_scrapes_every_server_on_its_metrics_port() -> None:
    services = compose_config("monitoring", "gpu", "scale")["services"]
    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    mounts = dict(volume(v) for v in prometheus["volumes"])
    assert Path(mounts["/etc/prometheus/prometheus.yml"]) == PROMETHEUS_CONFIG
    # Published on the host's loopback only; the servers publish no metrics port at all.
    assert [published(p)[:2] for p in prometheus["ports"]] == [("127.0.0.1", "9090")]
    (job,) = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    (discovery,) = job["dns_sd_configs"]
    servers = ("server", "server-gpu", "replica")
    assert set(discovery["names"]) == set(servers)
    for name in servers:
        environment = services[name]["environment"]
        assert environment["CONVSERVE_HOST"] == "0.0.0.0"
        assert int(environment["CONVSERVE_METRICS_PORT"]) == discovery["port"], name
        assert str(discovery["port"]) not in {published(p)[2] for p in services[name].get("ports", [])}, name
    assert prometheus["profiles"] == ["monitoring"]  # started only when asked for


# -- the cost, measured by the bench --------------------------------------------------------------


def test_bench_runs_each_scenario_with_metrics_on_and_off(model_repo: Path, tmp_path: Path) -> None:
    out, raw = tmp_path / "RESULTS.md", tmp_path / "results.json"
    command = [sys.executable, "-m", "serving", "bench", "--models", str(model_repo), "--model", "digits"]
    command += ["--scenario", "unary c1 tensor", "--metrics", "on,off", "--duration", "0.2", "--rounds", "1"]
    done = subprocess.run(
        [*command, "--out", str(out), "--json", str(raw)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (summary,) = json.loads(raw.read_text())["results"]
    assert set(summary["scenarios"]) == {"unary c1 tensor", "unary c1 tensor (metrics off)"}
    for name, scenario in summary["scenarios"].items():
        assert scenario["images_per_s"] > 0 and scenario["errors"] == 0, name
    assert "| digits: unary c1 tensor metrics on ≥ 0.97× off |" in out.read_text()
    refused = subprocess.run(
        [*command, "--server", "127.0.0.1:1"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "--metrics off needs servers the bench starts" in refused.stderr
