"""Deployment, checked without a container engine: the compose file and Dockerfiles, the install
script the images run, and the load balancer's nginx configuration in front of a real server.
tests/test_compose_run.py (`make test-deploy`) builds the images and runs the compose file."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest
import yaml

from serving.client import ClassifierClient
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
PROFILES = ["", "score", "gpu", "scale"]


def require(tool: str) -> str:
    """The tool's path; on CI a missing tool is a failure (scripts/system-deps.sh installs it)."""
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing: scripts/system-deps.sh should have installed it")
        pytest.skip(f"{tool} is not installed (run scripts/system-deps.sh)")
    return path


@pytest.mark.parametrize("profile", PROFILES)
def test_compose_file_is_valid_for_every_profile(profile: str) -> None:
    command = [require("docker-compose"), "-f", str(ROOT / "docker-compose.yml")]
    if profile:
        command += ["--profile", profile]
    done = subprocess.run([*command, "config"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    services = set(re.findall(r"^  ([a-z-]+):$", done.stdout.split("\nvolumes:")[0], re.M))
    expected = {"": set(), "score": {"score"}, "gpu": {"server-gpu"}, "scale": {"replica", "lb"}}[profile]
    assert {"train", "server"} | expected <= services


def compose_config(*profiles: str) -> dict:
    command = [require("docker-compose"), "-f", str(ROOT / "docker-compose.yml")]
    for profile in profiles:
        command += ["--profile", profile]
    done = subprocess.run([*command, "config"], capture_output=True, text=True, cwd=ROOT, env=os.environ)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def seconds(value: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:([\d.]+)s)?", value)
    assert match and value, value
    return int(match.group(1) or 0) * 60 + float(match.group(2) or 0)


def test_servers_get_longer_than_their_own_grace_to_stop() -> None:
    # Item 7: with Docker's default 10 s, a server using all of its 10 s --grace-s would be killed.
    services = compose_config("gpu", "scale")["services"]
    for name in ("server", "server-gpu", "replica"):
        grace = float(services[name]["environment"].get("CONVSERVE_GRACE_S", 10))
        assert seconds(services[name]["stop_grace_period"]) >= grace + 3, name


def test_out_of_the_box_every_port_is_on_loopback_and_reflection_is_off() -> None:
    # Plaintext without tokens must not face the network unless the operator says so (docs: security).
    from tests.test_metrics import published

    environment = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    command = [require("docker-compose"), "-f", str(ROOT / "docker-compose.yml")]
    for profile in ("gpu", "scale", "monitoring"):
        command += ["--profile", profile]
    done = subprocess.run([*command, "config"], capture_output=True, text=True, cwd=ROOT, env=environment)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    ports = {name: [published(p) for p in s.get("ports", [])] for name, s in services.items()}
    assert {name for name, p in ports.items() if p} == {"server", "server-gpu", "lb", "prometheus"}
    assert all(host == "127.0.0.1" for p in ports.values() for host, _, _ in p), ports
    for name in ("server", "server-gpu", "replica"):
        assert services[name]["environment"]["CONVSERVE_REFLECTION"] == "false", name


def test_every_server_serves_http_beside_grpc_on_its_own_host_ports() -> None:
    # The HTTP API (--http-port 8501) is published like gRPC, and no two services take one host port
    # (the GPU server's gRPC used to be 8501 on the host: it moved to 8510 when HTTP took 8501).
    from tests.test_metrics import published

    environment = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    command = [require("docker-compose"), "-f", str(ROOT / "docker-compose.yml")]
    for profile in ("gpu", "scale", "monitoring"):
        command += ["--profile", profile]
    done = subprocess.run([*command, "config"], capture_output=True, text=True, cwd=ROOT, env=environment)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    for name in ("server", "server-gpu", "replica"):
        assert services[name]["environment"]["CONVSERVE_HTTP_PORT"] == "8501", name
    targets = {name: {p[2]: p[1] for p in map(published, s.get("ports", []))} for name, s in services.items()}
    assert targets["server"] == {"8500": "8500", "8501": "8501"}
    assert set(targets["server-gpu"]) == {"8500", "8501"} and set(targets["lb"]) == {"8600", "8601"}
    host_ports = [port for ports in targets.values() for port in ports.values()]
    assert len(host_ports) == len(set(host_ports)), targets
    lb = services["lb"]["environment"]
    assert lb["CONVSERVE_LB_UPSTREAM"] == "replica:8500"
    assert lb["CONVSERVE_LB_HTTP_UPSTREAM"] == "replica:8501"
    assert lb["CONVSERVE_LB_HTTP_PORT"] == "8601"
    for name in ("Dockerfile.serve", "Dockerfile.serve-gpu"):
        text = (ROOT / "docker" / name).read_text()
        assert "CONVSERVE_HTTP_PORT=8501" in text and re.search(r"^EXPOSE 8500 8501 8502$", text, re.M)
    assert re.search(r"^EXPOSE 8600 8601$", (ROOT / "docker" / "Dockerfile.lb").read_text(), re.M)


def test_the_scoring_job_has_no_server_healthcheck_and_prepares_its_output() -> None:
    score = compose_config("score")["services"]["score"]
    assert score["healthcheck"]["test"] == ["NONE"]  # item 6 (disable: true): no server in a job
    assert score["entrypoint"] == ["convserve-score-job"] and str(score["user"]) == "0"  # item 1
    assert (
        "COPY docker/score-job.sh /usr/local/bin/convserve-score-job"
        in (ROOT / "docker" / "Dockerfile.serve").read_text()
    )


def test_build_settings_are_build_arguments_only() -> None:
    # Items 3 and 5: the train image's torch source is chosen by build arguments, never baked in.
    services = compose_config("scale")["services"]
    assert services["train"]["build"]["args"]["TORCH_BUILD"] == "cpu"
    assert {"PIP_EXTRA_INDEX_URL", "PYTHON_IMAGE", "WHEELHOUSE_ONLY"} <= set(
        services["train"]["build"]["args"]
    )
    assert "NGINX_IMAGE" in services["lb"]["build"]["args"]
    for dockerfile in (ROOT / "docker").glob("Dockerfile.*"):
        env_lines = [line for line in dockerfile.read_text().splitlines() if line.startswith("ENV")]
        assert not any("PIP_" in line for line in env_lines), dockerfile.name


def test_the_build_context_leaves_out_development_files() -> None:
    # Item 4: an allow-list, so a .venv, runs, models or scores never travel to the engine.
    rules = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert rules[0] == "*"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = set()
    for dockerfile in (ROOT / "docker").glob("Dockerfile.*"):
        copied |= {
            m.split()[0] for m in re.findall(r"^COPY (?!--from)(.+?) \S+$", dockerfile.read_text(), re.M)
        }
    sources = {part for line in copied for part in line.split()}
    assert sources <= allowed | {"docker/score-job.sh", "docker/wheelhouse", "docker/nginx.conf.template"} | {
        "docker/lb-entrypoint.sh"
    }, sources - allowed
    assert not {".venv", "runs", "models", "scores", ".git", "tests"} & allowed


@pytest.mark.parametrize("name", ["Dockerfile.serve", "Dockerfile.serve-gpu", "Dockerfile.train"])
def test_dockerfiles_install_through_the_script_as_non_root(name: str) -> None:
    text = (ROOT / "docker" / name).read_text()
    assert re.search(r"scripts/install.sh /opt/venv \S+", text)
    assert re.search(r"^USER convserve$", text, re.M)
    if name != "Dockerfile.train":
        assert 'CMD ["python", "-m", "serving", "health", "--server", "127.0.0.1:8500"]' in text
        assert "train" not in re.search(r"install.sh /opt/venv (\S+)", text).group(1)


def test_install_script_gives_a_serving_install_without_torch(tmp_path: Path) -> None:
    target = tmp_path / "venv"
    venv.create(target, with_pip=True)  # the script reuses it: faster than a second venv inside
    done = subprocess.run(
        [str(ROOT / "scripts" / "install.sh"), str(target), "serve"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    python = str(target / "bin" / "python")
    check = "import serving.server, serving.tools.score, importlib.util as u; print(u.find_spec('torch'))"
    probe = subprocess.run([python, "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "None", "the serving install must not pull torch"
    health = subprocess.run(
        [python, "-m", "serving", "health", "--server", "127.0.0.1:1", "--timeout", "1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert health.returncode == 1 and "unhealthy" in health.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lb(prefix: Path, upstream: str, port: int, **settings: str) -> subprocess.Popen:
    """docker/lb-entrypoint.sh as the lb image runs it (rendering docker/nginx.conf.template), with this
    machine's nginx (1.22, the offline stand-in's) and its files under `prefix`."""
    nginx = require("nginx")
    prefix.mkdir()
    env = {
        **os.environ,
        "PATH": f"{Path(nginx).parent}:{os.environ['PATH']}",
        "CONVSERVE_LB_TEMPLATE": str(ROOT / "docker" / "nginx.conf.template"),
        "CONVSERVE_LB_PREFIX": str(prefix),
        "CONVSERVE_LB_RESOLVER": "127.0.0.1",
        "CONVSERVE_LB_UPSTREAM": upstream,
        "CONVSERVE_LB_PORT": f"127.0.0.1:{port}",
        "CONVSERVE_LB_RESOLVE_S": "2",
        **settings,
    }
    with (prefix / "output.log").open("w") as output:
        return subprocess.Popen(
            ["sh", str(ROOT / "docker" / "lb-entrypoint.sh")],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def test_the_load_balancer_config_carries_a_scoring_job_to_a_server(
    model_repo, server_factory, tmp_path, digit_samples
) -> None:
    """Plaintext, the default. Following replicas through DNS is checked with real containers."""
    server = server_factory(model_repo)
    port = free_port()
    prefix = tmp_path / "nginx"
    process = start_lb(prefix, server.address, port)
    try:
        images = tmp_path / "images"
        images.mkdir()
        from tests.conftest import encode

        for i, pixels in enumerate(digit_samples[0][:300]):
            (images / f"{i:03d}.png").write_bytes(encode(pixels))
        with ClassifierClient(f"127.0.0.1:{port}") as client:
            client.wait_ready(10)
            assert client.health() == "SERVING"
        out = tmp_path / "scores.jsonl"
        job = subprocess.run(
            [
                sys.executable,
                "-m",
                "serving",
                "score",
                str(images),
                "--out",
                str(out),
                "--server",
                f"127.0.0.1:{port}",
                "--streams",
                "4",
                "--batch",
                "4",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert job.returncode == 0, job.stderr + (prefix / "output.log").read_text()
        assert "scored 300, failed 0" in job.stdout
        assert out.read_text().count("\n") == 300
        time.sleep(0.1)
        with ClassifierClient(server.address) as direct:
            assert direct.get_model("digits").stats.items == 300
    finally:
        process.terminate()
        process.wait(10)


def test_the_load_balancer_terminates_tls_and_re_encrypts_to_a_replica(
    model_repo, server_factory, tmp_path, digit_samples
) -> None:
    """TLS from the client to nginx, TLS again (with nginx's client certificate) to a replica that
    requires one; the bearer token passes through to the replica, which checks it."""
    import grpc

    from serving.client import Connection, make_request
    from tests.conftest import encode
    from tests.pki import make_pki

    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    tokens = tmp_path / "tokens"
    tokens.write_text("lb-test-token\n")
    server = server_factory(
        model_repo,
        *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)),
        *("--tls-client-ca", str(pki.ca), "--auth-token-file", str(tokens)),
    )
    port = free_port()
    prefix = tmp_path / "nginx"
    process = start_lb(
        prefix,
        server.address,
        port,
        CONVSERVE_LB_TLS_CERT=str(
            pki.server_cert
        ),  # the certificate names 127.0.0.1: it serves for nginx too
        CONVSERVE_LB_TLS_KEY=str(pki.server_key),
        CONVSERVE_LB_UPSTREAM_CA=str(pki.ca),
        CONVSERVE_LB_UPSTREAM_NAME="localhost",
        CONVSERVE_LB_UPSTREAM_CERT=str(pki.client_cert),
        CONVSERVE_LB_UPSTREAM_KEY=str(pki.client_key),
    )
    try:
        images, labels = [encode(p) for p in digit_samples[0][:8]], digit_samples[1][:8]
        good = Connection(tls_ca=pki.ca, token_file=tokens)
        with ClassifierClient(f"127.0.0.1:{port}", connection=good, timeout=10) as client:
            client.wait_ready(10)
            predicted = [r.top.index for r in client.classify(images)]
            assert sum(p == y for p, y in zip(predicted, labels, strict=True)) >= 6
            assert client.get_model("digits").stats.items == 8  # the replica counted them
        no_token = Connection(tls_ca=pki.ca)
        with ClassifierClient(f"127.0.0.1:{port}", connection=no_token, retries=0) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.classify(images, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # from the replica, through nginx
        with ClassifierClient(f"127.0.0.1:{port}", retries=0) as plaintext, pytest.raises(grpc.RpcError):
            plaintext.stub.Classify(make_request(images), timeout=5)
        assert "TLS, re-encrypted to the replicas" in (prefix / "output.log").read_text()
    finally:
        process.terminate()
        process.wait(10)


class TwoAddressDns:
    """A DNS server on 127.0.0.1 answering every A query with the same addresses, as compose's DNS
    answers `replica` with every replica's: nginx's resolver asks it, and balances over the answers."""

    def __init__(self, addresses: list[str]) -> None:
        import threading

        self.addresses = addresses
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.address = f"127.0.0.1:{self.socket.getsockname()[1]}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def answer(self, query: bytes) -> bytes:
        end = 12
        while query[end]:  # the question's name: length-prefixed labels, then a zero byte
            end += query[end] + 1
        question = query[12 : end + 5]
        kind = int.from_bytes(query[end + 1 : end + 3], "big")
        records = [] if kind != 1 else [socket.inet_aton(a) for a in self.addresses]
        header = query[:2] + b"\x81\x80" + (1).to_bytes(2, "big") + len(records).to_bytes(2, "big") + bytes(4)
        # Each: a pointer to the question's name, type A, class IN, a 2 s TTL, 4 bytes of address.
        answer = b"\xc0\x0c\x00\x01\x00\x01" + (2).to_bytes(4, "big") + b"\x00\x04"
        return header + question + b"".join(answer + r for r in records)

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                query, peer = self.socket.recvfrom(512)
            except TimeoutError:
                continue
            self.socket.sendto(self.answer(query), peer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.socket.close()


def free_port_on(*hosts: str) -> int:
    """A port free on every one of `hosts` (loopback addresses), for replicas that share one."""
    for _ in range(50):
        port = free_port()
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError("no port free on every address")


def test_the_load_balancer_spreads_grpc_and_http_over_two_replicas_and_drains_one(
    model_repo, server_factory, tmp_path, digit_samples
) -> None:
    """Two replicas behind one name (same ports on 127.0.0.2 and 127.0.0.3, a DNS answering with both,
    as compose's does): gRPC calls and HTTP requests (keep-alive, as curl and tritonclient send them)
    both reach both. Then one replica gets SIGTERM under HTTP load: it refuses new requests with 503
    while it drains, nginx sends those to the other, and no client sees a failure."""
    import threading

    import httpx

    from tests.conftest import encode
    from tests.test_http_ops_shutdown import infer_body

    hosts = ["127.0.0.2", "127.0.0.3"]
    grpc_port, http_port = free_port_on(*hosts), free_port_on(*hosts)
    replicas = [
        server_factory(model_repo, "--port", str(grpc_port), "--http-port", str(http_port), host=host)
        for host in hosts
    ]
    dns = TwoAddressDns(hosts)
    port, lb_http_port = free_port(), free_port()
    prefix = tmp_path / "nginx"
    process = start_lb(
        prefix,
        f"replicas.test:{grpc_port}",
        port,
        CONVSERVE_LB_RESOLVER=dns.address,
        CONVSERVE_LB_HTTP_UPSTREAM=f"replicas.test:{http_port}",
        CONVSERVE_LB_HTTP_PORT=f"127.0.0.1:{lb_http_port}",
    )

    def items() -> list[int]:
        counts = []
        for replica in replicas:
            with ClassifierClient(replica.address) as client:
                counts.append(client.get_model("digits").stats.items)
        return counts

    try:
        with ClassifierClient(f"127.0.0.1:{port}", timeout=10) as client:
            client.wait_ready(10)
            images = [encode(p) for p in digit_samples[0][:4]]
            for _ in range(60):
                assert all(r.ok for r in client.classify(images, top_k=1))
        grpc_counts = items()
        assert sum(grpc_counts) == 240 and min(grpc_counts) >= 40, grpc_counts

        base = f"http://127.0.0.1:{lb_http_port}"
        with httpx.Client(base_url=base, timeout=10) as http:
            assert http.get("/v2/health/ready").status_code == 200
            metadata = http.get("/v2/models/digits").json()
            body = infer_body(metadata, digit_samples[0][:4])
            for _ in range(60):
                answer = http.post("/v2/models/digits/infer", json=body)
                assert answer.status_code == 200, answer.text
        http_counts = [b - a for a, b in zip(grpc_counts, items(), strict=True)]
        assert sum(http_counts) == 240 and min(http_counts) >= 40, http_counts

        outcomes: list[int] = []
        stop = threading.Event()

        def loop() -> None:
            with httpx.Client(base_url=base, timeout=10) as http:
                while not stop.is_set():
                    outcomes.append(http.post("/v2/models/digits/infer", json=body).status_code)

        clients = [threading.Thread(target=loop) for _ in range(4)]
        for thread in clients:
            thread.start()
        try:
            while len(outcomes) < 100:
                time.sleep(0.01)
            replicas[0].process.send_signal(15)
            assert replicas[0].process.wait(20) == 0
            sent = len(outcomes)
            while len(outcomes) < sent + 100:  # the other replica serves them all now
                time.sleep(0.01)
        finally:
            stop.set()
            for thread in clients:
                thread.join(15)
        assert set(outcomes) == {200}, {code: outcomes.count(code) for code in set(outcomes)}
        assert "Traceback" not in replicas[0].log() + replicas[1].log()
    finally:
        process.terminate()
        process.wait(10)
        dns.close()


def test_the_gpu_install_serves_everything_the_cpu_install_does() -> None:
    # The GPU image installs the `gpu` extra instead of `serve`: only ONNX Runtime's build may differ,
    # or the GPU server fails to import what the CPU one serves with (the HTTP edge, for one).
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "install.sh /opt/venv gpu," in (ROOT / "docker" / "Dockerfile.serve-gpu").read_text()
    assert set(extras["serve"]) - {r for r in extras["serve"] if r.startswith("onnxruntime")} <= set(
        extras["gpu"]
    )
