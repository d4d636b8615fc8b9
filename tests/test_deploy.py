"""Deployment, as far as this machine can run it: the compose file, the install script the images
run, and the nginx gRPC load balancer exercised for real in front of two server processes."""

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


def render_template(path: Path, values: dict[str, str]) -> str:
    """envsubst, as the nginx image does for /etc/nginx/templates/*.template."""
    return subprocess.run(
        ["envsubst", " ".join(f"${{{k}}}" for k in values)],
        input=path.read_text(),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **values},
    ).stdout


def test_nginx_balances_a_scoring_job_over_two_servers(
    model_repo, server_factory, tmp_path, digit_samples
) -> None:
    nginx = require("nginx")
    servers = [server_factory(model_repo), server_factory(model_repo)]
    port = free_port()
    upstreams = " ".join(f"server {s.address};" for s in servers)
    site = render_template(
        ROOT / "docker" / "nginx.conf.template",
        {"CONVSERVE_UPSTREAMS": upstreams, "CONVSERVE_LB_PORT": f"127.0.0.1:{port}"},
    )
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    (prefix / "convserve.conf").write_text(site)
    temp = {name: prefix / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    main = f"""
        daemon off; pid {prefix}/nginx.pid; error_log {prefix}/error.log warn;
        events {{ worker_connections 256; }}
        http {{
            access_log off;
            client_body_temp_path {temp["body"]}; proxy_temp_path {temp["proxy"]};
            fastcgi_temp_path {temp["fastcgi"]}; uwsgi_temp_path {temp["uwsgi"]};
            scgi_temp_path {temp["scgi"]};
            include {prefix}/convserve.conf;
        }}
    """
    (prefix / "nginx.conf").write_text(main)
    process = subprocess.Popen(
        [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
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
        assert job.returncode == 0, job.stderr + (prefix / "error.log").read_text()
        assert "scored 300, failed 0" in job.stdout
        assert out.read_text().count("\n") == 300
        time.sleep(0.1)
        items = [ClassifierClient(s.address).get_model("digits").stats.items for s in servers]
        assert sum(items) == 300 and min(items) > 0, f"nginx did not spread the streams: {items}"
    finally:
        process.terminate()
        process.wait(10)
