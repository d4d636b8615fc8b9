#!/usr/bin/env bash
# The container engine and compose command that `make test-deploy` (tests/test_compose_run.py) uses,
# and that a person can use by hand the same way.
#   scripts/container-engine.sh install         install podman, runc and docker-compose when no Docker
#                                               engine answers (Debian packages; needs root or sudo)
#   scripts/container-engine.sh env DIR         print ENGINE=, COMPOSE= and, for podman, DOCKER_HOST=
#                                               and CONTAINERS_CONF= (DIR holds podman's socket/config)
#   scripts/container-engine.sh serve DIR       run podman's Docker-compatible API service on DIR's
#                                               socket, in the foreground, until killed
# Docker is used where its engine answers. Otherwise podman (Debian's 4.3 here) behind its
# Docker-compatible API, driven by Debian's docker-compose 1.29, with the settings this machine needs:
# runc as the runtime, no default ulimits, cgroupfs and file events (there is no systemd), netavark
# with aardvark-dns so that services find each other by name, and chroot isolation for builds. Nothing here changes the machine's own podman configuration.
set -euo pipefail
command=${1:?usage: scripts/container-engine.sh install|env DIR|serve DIR}

docker_answers() { command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1; }

podman_config() {
  local dir=$1
  mkdir -p "$dir"
  cat >"$dir/containers.conf" <<'EOF'
[containers]
default_ulimits = []

[network]
network_backend = "netavark"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
}

case "$command" in
install)
  docker_answers && exit 0
  missing=()
  command -v podman >/dev/null 2>&1 || missing+=(podman)
  command -v runc >/dev/null 2>&1 || missing+=(runc)
  command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  # Name resolution between services: netavark's aardvark-dns (podman's CNI default has none here).
  [ -x /usr/lib/podman/netavark ] || missing+=(netavark)
  [ -x /usr/lib/podman/aardvark-dns ] || missing+=(aardvark-dns)
  [ ${#missing[@]} -eq 0 ] && exit 0
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing ${missing[*]} (apt-get)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  ;;
env)
  dir=${2:?usage: scripts/container-engine.sh env DIR}
  if docker_answers; then
    echo "ENGINE=docker"
    if docker compose version >/dev/null 2>&1; then echo "COMPOSE=docker compose"; else echo "COMPOSE=docker-compose"; fi
  else
    command -v podman >/dev/null 2>&1 || {
      echo "no Docker engine and no podman: run scripts/container-engine.sh install" >&2
      exit 1
    }
    podman_config "$dir"
    echo "ENGINE=podman"
    echo "COMPOSE=docker-compose"
    echo "DOCKER_HOST=unix://$dir/podman.sock"
    echo "CONTAINERS_CONF=$dir/containers.conf"
    echo "BUILDAH_ISOLATION=chroot"
  fi
  ;;
serve)
  dir=${2:?usage: scripts/container-engine.sh serve DIR}
  podman_config "$dir"
  rm -f "$dir/podman.sock"
  export CONTAINERS_CONF=$dir/containers.conf BUILDAH_ISOLATION=chroot
  exec podman system service --time=0 "unix://$dir/podman.sock"
  ;;
*)
  echo "usage: scripts/container-engine.sh install|env DIR|serve DIR" >&2
  exit 2
  ;;
esac
