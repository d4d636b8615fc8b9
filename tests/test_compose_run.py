"""The compose deployment, run for real (`make test-deploy`): images built, containers started.

One stack per module, under its own compose project name, host ports ephemeral on 127.0.0.1, and
`down -v` at the end whatever happened. Docker where its engine answers, else podman behind its
Docker-compatible API (scripts/container-engine.sh), with locally built stand-ins for the base
images when no registry answers (scripts/base-images.sh). podman runs no HEALTHCHECK by itself
without systemd, so `Stack.up` drives `podman healthcheck run` while compose waits for health.
Every load loop is bounded in calls and seconds, and goes to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from serving.client import ClassifierClient
from tests.conftest import ROOT

# A cold build (base images, wheels, images) takes minutes; each test bounds its own waits.
pytestmark = [pytest.mark.deploy, pytest.mark.slow, pytest.mark.timeout(1800)]
PROJECT_LABEL = "label=com.docker.compose.project"
ALL_PROFILES = ("--profile", "scale", "--profile", "score", "--profile", "monitoring")
TIMES: dict[str, float] = {}  # measured durations, printed at the end (-s) and in the closing note


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is missing: run scripts/container-engine.sh install"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(command: list[str], env: dict[str, str], timeout: float = 600, check: bool = True, **kwargs):
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


@dataclass
class Stack:
    engine: str
    compose: list[str]
    env: dict[str, str]
    project: str
    tmp: Path
    images: dict[str, int] = field(default_factory=dict)

    def c(self, *args: str, timeout: float = 600, check: bool = True, profiles: tuple[str, ...] = ()):
        command = [*self.compose, "-f", str(ROOT / "docker-compose.yml")]
        for profile in profiles:
            command += ["--profile", profile]
        return run([*command, *args], self.env, timeout=timeout, check=check)

    def e(self, *args: str, timeout: float = 120, check: bool = True):
        return run([self.engine, *args], self.env, timeout=timeout, check=check)

    def containers(self, service: str | None = None, all_: bool = False) -> list[str]:
        command = ["ps", "--format", "{{.Names}}", "--filter", f"{PROJECT_LABEL}={self.project}"]
        if service:
            command += ["--filter", f"label=com.docker.compose.service={service}"]
        if all_:
            command.append("-a")
        return sorted(self.e(*command).stdout.split())

    def drive_health(self, stop: threading.Event) -> None:
        """podman without systemd runs no HEALTHCHECK: run it, as Docker's engine would, every second."""
        while not stop.wait(1.0):
            for name in self.containers():
                self.e("healthcheck", "run", name, check=False, timeout=30)

    def healthy_c(self, *args: str, profiles: tuple[str, ...] = (), timeout: float = 300, check: bool = True):
        """A compose command that may wait for a service to turn healthy (up, run with dependencies)."""
        stop = threading.Event()
        driver = None
        if self.engine == "podman":
            driver = threading.Thread(target=self.drive_health, args=(stop,), daemon=True)
            driver.start()
        try:
            return self.c(*args, profiles=profiles, timeout=timeout, check=check)
        finally:
            stop.set()
            if driver:
                driver.join(60)

    def up(self, *args: str, profiles: tuple[str, ...] = (), timeout: float = 300):
        return self.healthy_c("up", "-d", *args, profiles=profiles, timeout=timeout)

    def port(self, service: str, container_port: int, index: int = 1) -> int:
        out = self.c("port", "--index", str(index), service, str(container_port)).stdout.strip()
        return int(out.rsplit(":", 1)[1])

    def wait_healthy(self, service: str, count: int, timeout: float = 90) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            names = self.containers(service)
            healthy = []
            for name in names:
                if self.engine == "podman":
                    self.e("healthcheck", "run", name, check=False, timeout=30)
                status = self.e("inspect", "--format", "{{.State.Health.Status}}", name, check=False)
                if status.stdout.strip() == "healthy":
                    healthy.append(name)
            if len(healthy) == count == len(names):
                return healthy
            assert time.monotonic() < deadline, f"{service}: {len(healthy)} of {count} healthy ({names})"
            time.sleep(1)


def write_digits(folder: Path, count: int) -> list[Path]:
    """Real handwritten digits (scikit-learn's bundled set) as 8x8 PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
        path = folder / f"{i:04d}-{digits.target[i]}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("deploy")
    settings = run([str(ROOT / "scripts/container-engine.sh"), "env", str(tmp / "engine")], dict(os.environ))
    values = dict(line.split("=", 1) for line in settings.stdout.splitlines() if "=" in line)
    engine, compose = values.pop("ENGINE"), values.pop("COMPOSE").split()
    need(engine)
    need(compose[0])
    project = f"convservetest{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        **values,
        "COMPOSE_PROJECT_NAME": project,
        "CONVSERVE_PUBLISH_PORT": "127.0.0.1:",  # "127.0.0.1::8500": any free port, loopback only
        "CONVSERVE_LB_PUBLISH_PORT": "127.0.0.1:",
        "CONVSERVE_HTTP_PUBLISH_PORT": "127.0.0.1:",
        "CONVSERVE_LB_HTTP_PUBLISH_PORT": "127.0.0.1:",
        "CONVSERVE_WHEELHOUSE_ONLY": "1",
        "TRAIN_ARGS": "--epochs 5",  # enough for these checks; the default 40 take minutes on a busy machine
    }
    service = None
    if engine == "podman":
        service = subprocess.Popen(
            [str(ROOT / "scripts/container-engine.sh"), "serve", str(tmp / "engine")],
            env=env,
            stdout=(tmp / "podman-service.log").open("w"),
            stderr=subprocess.STDOUT,
        )
    try:
        if service:
            deadline = time.monotonic() + 30
            while not (tmp / "engine/podman.sock").exists():
                assert service.poll() is None and time.monotonic() < deadline, "podman service did not start"
                time.sleep(0.2)
        started = time.monotonic()
        bases = run([str(ROOT / "scripts/base-images.sh"), engine], env, timeout=1200)
        env.update(line.split("=", 1) for line in bases.stdout.split())
        TIMES["base images (present or built)"] = time.monotonic() - started
        started = time.monotonic()
        run([str(ROOT / "scripts/wheelhouse.sh"), sys.executable, "--all"], env, timeout=600)
        TIMES["wheelhouse"] = time.monotonic() - started
        yield Stack(engine, compose, env, project, tmp)
    finally:
        cleanup = Stack(engine, compose, env, project, tmp)
        cleanup.c(*ALL_PROFILES, "down", "-v", "--remove-orphans", "-t", "20", check=False)
        if service:
            service.terminate()
            service.wait(30)
        for name, seconds in TIMES.items():
            print(f"deploy timing: {name}: {seconds:.1f}s")


def test_images_build_and_the_train_image_has_torch_cpu(stack: Stack) -> None:
    started = time.monotonic()
    stack.c("--profile", "scale", "build", "train", "server", "lb", timeout=1800)
    TIMES["compose build train server lb"] = time.monotonic() - started
    for image in ("convserve-train", "convserve-serve", "convserve-lb"):
        size = stack.e("image", "inspect", "--format", "{{.Size}}", f"{image}:latest").stdout.strip()
        stack.images[image] = int(size)
        print(f"deploy image: {image}: {int(size) / 1e6:.0f} MB")
    probe = (
        "import importlib.metadata as m, torch; print(torch.__version__, "
        "[d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].lower().startswith('nvidia')])"
    )
    torch = stack.e("run", "--rm", "--entrypoint", "python", "convserve-train:latest", "-c", probe)
    assert torch.stdout.split()[0].endswith("+cpu"), torch.stdout  # item 3: no CUDA build
    assert "[]" in torch.stdout, f"CUDA wheels in the train image: {torch.stdout}"
    assert stack.images["convserve-train"] < 2e9, stack.images
    for image in ("convserve-train", "convserve-serve"):  # item 5: no build-time pip setting baked in
        env = stack.e("image", "inspect", "--format", "{{json .Config.Env}}", f"{image}:latest").stdout
        assert "PIP_" not in env, env
    serve = stack.e(
        "run", "--rm", "--entrypoint", "python", "convserve-serve:latest", "-c", "import torch", check=False
    )
    assert serve.returncode != 0 and "No module named 'torch'" in serve.stderr


def test_build_context_leaves_out_the_development_files(stack: Stack, tmp_path: Path) -> None:
    # Item 4: what the engine receives as context, listed from inside a build.
    (ROOT / ".venv").mkdir(exist_ok=True)
    probe = "FROM {}\nCOPY . /ctx\n" + (
        "RUN cd /ctx && find . -maxdepth 2 | sort && du -sk --exclude=./docker/wheelhouse .\n"
    )
    dockerfile = tmp_path / "Dockerfile.context"
    dockerfile.write_text(probe.format(stack.env["CONVSERVE_PYTHON_IMAGE"]))
    args = ["--isolation", "chroot"] if stack.engine == "podman" else []
    tag = f"localhost/{stack.project}-context"
    built = stack.e("build", *args, "--no-cache", "-t", tag, "-f", str(dockerfile), str(ROOT), timeout=300)
    stack.e("rmi", tag, check=False)
    listing = built.stdout + built.stderr
    for absent in ("./.venv", "./.git", "./runs", "./models", "./scores", "./demo-out", "./tests"):
        assert f"\n{absent}\n" not in listing, f"{absent} is in the build context"
    kb = int(re.findall(r"^(\d+)\s+\.$", listing, re.M)[-1])
    assert kb < 5000, f"build context without wheels: {kb} KiB"


def test_train_job_writes_the_model_and_the_server_turns_healthy(stack: Stack, tmp_path: Path) -> None:
    started = time.monotonic()
    stack.up("server")
    stack.wait_healthy("server", 1)
    TIMES["up: train job + healthy server"] = time.monotonic() - started
    train = stack.containers("train", all_=True)
    assert len(train) == 1
    assert stack.e("inspect", "--format", "{{.State.ExitCode}}", train[0]).stdout.strip() == "0"
    listing = stack.e("exec", stack.containers("server")[0], "ls", "-l", "/models/digits/1").stdout
    assert "model.onnx" in listing
    images = write_digits(tmp_path / "digits", 3)
    port = stack.port("server", 8500)
    server = f"127.0.0.1:{port}"
    classify = run(
        [sys.executable, "-m", "serving", "classify", *map(str, images), "--json", "--server", server],
        dict(os.environ),
        timeout=60,
    )
    answers = json.loads(classify.stdout)
    assert len(answers) == 3
    correct = sum(a["top_k"][0]["label"] == Path(a["path"]).stem.split("-")[1] for a in answers)
    assert correct >= 2, answers
    # The HTTP API on its own published port: health, and an image by curl's route.
    http = f"http://127.0.0.1:{stack.port('server', 8501)}"
    with urllib.request.urlopen(f"{http}/v2/health/ready", timeout=10) as response:
        assert response.status == 200
    labels = [classify_over_http(http, path.read_bytes()) for path in images]
    correct = sum(label == path.stem.split("-")[1] for label, path in zip(labels, images, strict=True))
    assert correct >= 2, labels


def classify_over_http(base: str, image: bytes) -> str:
    """The top label for one PNG sent as curl sends a file to `POST /v1/models/digits:classify`."""
    request = urllib.request.Request(
        f"{base}/v1/models/digits:classify", data=image, headers={"Content-Type": "image/png"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        (result,) = json.load(response)["results"]
    return result["label"][0]  # convserve.v1 ImageResult, field names as in the .proto


def test_score_profile_writes_one_result_per_input_into_a_folder_the_engine_creates(
    stack: Stack, tmp_path: Path
) -> None:
    images = write_digits(tmp_path / "in", 120)
    out = tmp_path / "scores"  # does not exist: the engine creates it, as root (item 1)
    stack.env.update(SCORE_INPUT=str(tmp_path / "in"), SCORE_OUTPUT=str(out))
    name = stack.healthy_c("run", "-d", "score", profiles=("score",)).stdout.strip().splitlines()[-1]
    health = stack.e("inspect", "--format", "{{json .Config.Healthcheck}}", name).stdout
    assert "NONE" in health, f"the scoring job inherited a HEALTHCHECK: {health}"  # item 6
    code = stack.e("wait", name, timeout=180).stdout.strip().splitlines()[-1]
    logs = stack.e("logs", name).stdout + stack.e("logs", name).stderr
    stack.e("rm", name, check=False)
    assert code == "0", logs
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(Path(line["path"]).name for line in lines) == sorted(p.name for p in images)
    assert all(line["error"] is None for line in lines)
    assert "scored 120, failed 0" in logs


def test_score_profile_fails_on_an_input_with_no_images(stack: Stack, tmp_path: Path) -> None:
    # A fresh clone has no ./demo-out/digits: the engine creates an empty folder for the bind mount.
    stack.env.update(SCORE_INPUT=str(tmp_path / "missing"), SCORE_OUTPUT=str(tmp_path / "scores"))
    job = stack.healthy_c("run", "--rm", "-T", "score", profiles=("score",), check=False, timeout=180)
    assert job.returncode == 2, job.stdout + job.stderr
    assert "no images" in job.stdout + job.stderr


@dataclass
class Load:
    """Unary Classify calls with a 5 s deadline from a few threads, until stopped (or 240 s)."""

    port: int
    image: bytes
    threads: int = 4
    ok: int = 0
    failed: Counter = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for _ in range(self.threads):
            worker = threading.Thread(target=self.work, daemon=True)
            worker.start()
            self.workers.append(worker)
        return self

    def work(self) -> None:
        deadline = time.monotonic() + 240
        with ClassifierClient(f"127.0.0.1:{self.port}", timeout=5) as client:
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    result = client.classify([self.image], top_k=1)[0]
                    with self.lock:
                        if result.ok:
                            self.ok += 1
                        else:
                            self.failed["wrong answer"] += 1
                except grpc.RpcError as exc:
                    with self.lock:
                        self.failed[exc.code().name] += 1
                time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for worker in self.workers:
            worker.join(30)


def served_requests(stack: Stack) -> dict[str, int]:
    """Each replica's count of Classify requests, asked inside its container."""
    code = (
        "from serving.client import ClassifierClient as C; "
        "print(C('127.0.0.1:8500').get_model('digits').stats.requests)"
    )
    return {
        name: int(stack.e("exec", name, "python", "-c", code).stdout.strip())
        for name in stack.containers("replica")
    }


def test_scale_profile_spreads_calls_and_follows_the_replica_count(stack: Stack, tmp_path: Path) -> None:
    image = write_digits(tmp_path / "one", 1)[0].read_bytes()
    started = time.monotonic()
    stack.up("--scale", "replica=2", profiles=("scale",))
    stack.wait_healthy("replica", 2)
    TIMES["up: scale profile, 2 replicas"] = time.monotonic() - started
    port = stack.port("lb", 8600)
    with ClassifierClient(f"127.0.0.1:{port}", timeout=5) as client:
        client.wait_ready(30)
        results = [client.classify([image], top_k=1)[0] for _ in range(200)]
    assert all(r.ok for r in results)
    counts = served_requests(stack)
    assert sum(counts.values()) >= 200 and min(counts.values()) >= 40, counts
    # HTTP through the balancer's HTTP port: each request balanced over the replicas too.
    http = f"http://127.0.0.1:{stack.port('lb', 8601)}"
    labels = [classify_over_http(http, image) for _ in range(200)]
    assert len(set(labels)) == 1, Counter(labels)
    grown = {name: n - counts[name] for name, n in served_requests(stack).items()}
    assert sum(grown.values()) >= 200 and min(grown.values()) >= 40, grown
    replicas = ("up", "-d", "--no-deps")  # the train job is done: leave it be

    with Load(port, image) as load:
        # Scale up: the new replica gets calls within 15 s of turning healthy.
        stack.healthy_c(*replicas, "--no-recreate", "--scale", "replica=3", "replica", profiles=("scale",))
        stack.wait_healthy("replica", 3)
        before = served_requests(stack)
        time.sleep(15)
        after = served_requests(stack)
        grown = {name: after[name] - before.get(name, 0) for name in after}
        assert len(grown) == 3 and min(grown.values()) > 0, f"calls per replica in 15 s: {grown}"
        # Scale down: the removed replica drains; the balancer stops sending to it.
        stack.healthy_c(*replicas, "--no-recreate", "--scale", "replica=2", "replica", profiles=("scale",))
        time.sleep(3)
        # Recreate every replica with a new setting, the new ones first (scripts/rollout.sh).
        stack.env.update(CONVSERVE_MAX_BATCH_SIZE="16", ENGINE=stack.engine, COMPOSE=" ".join(stack.compose))
        started = time.monotonic()
        run([str(ROOT / "scripts/rollout.sh"), "replica", "--profile", "scale"], stack.env, timeout=300)
        TIMES["rollout of 2 replicas under load"] = time.monotonic() - started
        time.sleep(3)
    print(f"deploy load: {load.ok} calls answered, failed: {dict(load.failed)}")
    assert load.ok > 100 and not load.failed, f"{load.ok} answered, failed {dict(load.failed)}"
    assert len(served_requests(stack)) == 2

    # compose's own recreation (all replicas at once: calls fail meanwhile) leaves no stale balancer.
    stack.env["CONVSERVE_MAX_BATCH_SIZE"] = "8"
    stack.healthy_c(*replicas, "--scale", "replica=2", "replica", profiles=("scale",))
    stack.wait_healthy("replica", 2)
    time.sleep(int(stack.env.get("CONVSERVE_LB_RESOLVE_S", "2")) + 1)
    with ClassifierClient(f"127.0.0.1:{port}", timeout=5) as client:
        results = [client.classify([image], top_k=1)[0] for _ in range(100)]
    assert all(r.ok for r in results)
    counts = served_requests(stack)
    assert len(counts) == 2 and min(counts.values()) > 0, counts


def test_a_version_exported_into_the_volume_is_served_without_a_restart(stack: Stack, tmp_path: Path) -> None:
    """The publishing step of docs/guides/compose.md, run for real: the server polls the volume and
    moves to version 2 once it is loaded and warmed, while clients keep calling, and none of their
    calls fails."""
    image = write_digits(tmp_path / "one", 1)[0].read_bytes()
    port = stack.port("server", 8500)
    with ClassifierClient(f"127.0.0.1:{port}", timeout=5) as client:
        assert client.get_model("digits").version == 1
        with Load(port, image, threads=4) as load:
            export = "python -m training export /runs/digits --repository /models --name digits"
            stack.c("run", "--rm", "--no-deps", "train", export, timeout=300)
            deadline = time.monotonic() + 60
            while client.get_model("digits").version != 2:
                assert time.monotonic() < deadline, client.get_model("digits")
                time.sleep(0.5)
            time.sleep(2)  # calls go on against version 2
        states = {v.version: v.state for v in client.get_model("digits").version_states}
    print(f"deploy publish: {load.ok} calls answered, failed: {dict(load.failed)}")
    assert states == {1: "READY", 2: "READY"}, states
    assert load.ok > 50 and not load.failed, f"{load.ok} answered, failed {dict(load.failed)}"


def prometheus_api(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/{path}", timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return answer["data"]


def test_monitoring_profile_scrapes_every_server(stack: Stack) -> None:
    stack.env["CONVSERVE_PROMETHEUS_PUBLISH_PORT"] = ""  # "127.0.0.1::9090": any free port, loopback only
    started = time.monotonic()
    stack.c("up", "-d", "--no-deps", "prometheus", profiles=("monitoring",), timeout=300)
    port = stack.port("prometheus", 9090)
    deadline = time.monotonic() + 150  # DNS discovery and scrapes every 15 s
    while True:
        try:
            targets = prometheus_api(port, "targets")["activeTargets"]
        except OSError:  # still starting
            targets = []
        up = Counter(t["labels"]["service"] for t in targets if t["health"] == "up")
        if up == {"server": 1, "replica": 2}:
            break
        assert time.monotonic() < deadline, f"targets up: {dict(up)}; {targets}"
        time.sleep(2)
    TIMES["monitoring: every server scraped"] = time.monotonic() - started
    # The calls of the tests before, as Prometheus sees them: every server answered some.
    query = urllib.parse.quote('sum by (service, instance) (convserve_requests_total{code="OK"})')
    served = {
        (r["metric"]["service"], r["metric"]["instance"]): float(r["value"][1])
        for r in prometheus_api(port, f"query?query={query}")["result"]
    }
    assert len(served) == 3 and min(served.values()) > 0, served
    states = prometheus_api(port, f"query?query={urllib.parse.quote('convserve_model_state == 1')}")
    assert {r["metric"]["state"] for r in states["result"]} == {"READY"}, states


def test_stopping_the_server_under_load_loses_no_call(stack: Stack, tmp_path: Path) -> None:
    """A scoring job streams to the server; the server is stopped midway. Every image it was sent is
    answered or handed back to the job, and a rerun after a restart scores exactly the rest."""
    originals = write_digits(tmp_path / "in", 1797)
    images = list(originals)
    for copy in ("a", "b"):  # 5,391 images: seconds of work at this job's pace
        for path in originals:
            images.append(path.with_name(f"{copy}-{path.name}"))
            images[-1].write_bytes(path.read_bytes())
    out = tmp_path / "scores.jsonl"
    server = f"127.0.0.1:{stack.port('server', 8500)}"
    command = [sys.executable, "-m", "serving", "score", str(tmp_path / "in"), "--out", str(out)]
    command += ["--server", server, "--batch", "1", "--inflight", "4", "--streams", "1"]
    with (tmp_path / "job.log").open("w") as log:
        job = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not out.exists() or out.read_text().count("\n") < 100:  # under load
                assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "job.log").read_text()
                time.sleep(0.05)
            stack.c("stop", "-t", "20", "server", timeout=60)
            first = job.wait(120)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    name = stack.containers("server", all_=True)[0]
    assert stack.e("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    logs = stack.e("logs", name)
    assert "stopped" in logs.stdout + logs.stderr
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert first == 1 and 100 <= len(scored) < len(images), (first, len(scored))
    assert all(line["error"] is None for line in scored), "a call cut off by the stop became an error"

    stack.up("--no-deps", "server")
    stack.wait_healthy("server", 1)
    command[command.index("--server") + 1] = f"127.0.0.1:{stack.port('server', 8500)}"
    rerun = run(command, dict(os.environ), timeout=180)
    assert f"skipped {len(scored)}" in rerun.stdout, rerun.stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["path"] for line in lines) == sorted(map(str, images)), "each image exactly once"
    assert all(line["error"] is None for line in lines)


def test_down_leaves_nothing_running(stack: Stack) -> None:
    stack.c(*ALL_PROFILES, "down", "-v", "--remove-orphans", "-t", "20")
    assert stack.containers(all_=True) == []
    volumes = stack.e("volume", "ls", "--format", "{{.Name}}").stdout.split()
    networks = stack.e("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert not [v for v in volumes + networks if v.startswith(stack.project)], (volumes, networks)
