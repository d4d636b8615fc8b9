"""scripts/container-engine.sh installs everything the container engine runs on a fresh machine.

apt is asked what `apt-get install --no-install-recommends` of the script's packages would install
on an empty system (a simulation against an empty dpkg status: nothing is installed, nothing is
downloaded), and every program podman runs to start a container on a network must be among them.
A developer's machine that happens to have iptables cannot hide a missing one this way.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.network

SCRIPT = ROOT / "scripts" / "container-engine.sh"
# The Debian packages holding what podman runs for `compose up` (Debian bookworm: podman 4.3, netavark 1.4).
ENGINE_RUNS = {
    "podman": "the engine and its Docker-compatible API",
    "conmon": "the monitor of every container",
    "runc": "the OCI runtime (containers.conf names runc)",
    "netavark": "container networks",
    "aardvark-dns": "service names on a compose network",
    "iptables": "netavark 1.4 runs iptables to write every network's rules",
    "docker-compose": "the compose command",
    "debootstrap": "base images built when no registry answers",
}


def script_packages() -> list[str]:
    done = subprocess.run([SCRIPT, "packages"], capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.split()


def simulated_install(packages: list[str], tmp_path) -> set[str]:
    """The packages apt would install for `packages` on a system with nothing installed."""
    status = tmp_path / "status"
    status.write_text("")
    command = [
        "apt-get",
        "-s",
        "install",
        "--no-install-recommends",
        "-o",
        f"Dir::State::status={status}",
        "-o",
        f"Dir::State::extended_states={tmp_path / 'extended_states'}",
        "-o",
        "Debug::NoLocking=1",
        *packages,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return {line.split()[1] for line in done.stdout.splitlines() if line.startswith("Inst ")}


@pytest.fixture(scope="module")
def apt_knows_podman() -> None:
    if shutil.which("apt-get") is None:
        pytest.skip("no apt-get: not a Debian machine")
    policy = subprocess.run(["apt-cache", "policy", "podman"], capture_output=True, text=True, timeout=60)
    if "Candidate:" not in policy.stdout or "Candidate: (none)" in policy.stdout:
        pytest.skip("apt has no package lists naming podman (run apt-get update)")


def test_install_brings_everything_the_engine_runs(apt_knows_podman, tmp_path) -> None:
    installed = simulated_install(script_packages(), tmp_path)
    missing = {name: why for name, why in ENGINE_RUNS.items() if name not in installed}
    assert not missing, f"scripts/container-engine.sh install leaves out {missing}"


def test_the_engine_runs_what_recommends_would_not_bring(apt_knows_podman, tmp_path) -> None:
    """The reason the list is explicit: podman alone, without recommends, brings no iptables."""
    alone = simulated_install(["podman", "netavark"], tmp_path)
    assert "conmon" in alone and "iptables" not in alone
