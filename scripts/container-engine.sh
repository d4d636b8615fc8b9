#!/usr/bin/env bash
# The container engine and compose command that `make test-deploy` (tests/test_compose_run.py) uses,
# and that a person can use by hand the same way.
#   scripts/container-engine.sh install         install what podman needs when no Docker engine answers
#                                               (Debian packages; needs root or sudo), then `check`
#   scripts/container-engine.sh check           start one container on a network of its own; when that
#                                               fails, say what is missing
#   scripts/container-engine.sh packages        the Debian packages `install` installs, one a line
#   scripts/container-engine.sh env DIR         print ENGINE=, COMPOSE= and, for podman, DOCKER_HOST=
#                                               and CONTAINERS_CONF= (DIR holds podman's socket/config)
#   scripts/container-engine.sh serve DIR       run podman's Docker-compatible API service on DIR's
#                                               socket, in the foreground, until killed
# Docker is used where its engine answers. Otherwise podman (Debian's 4.3 here) behind its
# Docker-compatible API, driven by Debian's docker-compose 1.29, with the settings this machine needs:
# runc as the runtime, no default ulimits, cgroupfs and file events (there is no systemd), netavark
# with aardvark-dns so that services find each other by name, and chroot isolation for builds.
# Nothing here changes the machine's own podman configuration.
set -euo pipefail
usage="usage: scripts/container-engine.sh install|check|packages|env DIR|serve DIR"
command=${1:?$usage}

# Everything the engine runs, as Debian package and the file that shows it is there. With
# --no-install-recommends podman pulls conmon and runc (Depends) but not iptables (only Suggests),
# and netavark 1.4 calls iptables for every network's rules: without it no container with a network
# starts ("netavark: No such file or directory"). debootstrap builds base images when no registry
# answers (scripts/base-images.sh); aardvark-dns lets services find each other by name.
PACKAGES=(podman runc netavark aardvark-dns iptables docker-compose debootstrap)
declare -A PROVIDES=(
  [podman]=podman [runc]=runc [netavark]=/usr/lib/podman/netavark
  [aardvark-dns]=/usr/lib/podman/aardvark-dns [iptables]=iptables
  [docker-compose]=docker-compose [debootstrap]=debootstrap
)
declare -A NEEDED_FOR=(
  [podman]="the engine" [runc]="the runtime podman starts containers with"
  [netavark]="container networks" [aardvark-dns]="names of services on a network"
  [iptables]="netavark's firewall rules for every network"
  [docker-compose]="the compose command" [debootstrap]="base images built without a registry"
)

present() { # PACKAGE: is what it provides here (sbin included: iptables is there, off a user's PATH)
  local file=${PROVIDES[$1]}
  if [[ $file == /* ]]; then [ -x "$file" ]; else PATH=$PATH:/usr/sbin:/sbin command -v "$file" >/dev/null 2>&1; fi
}

missing_packages() { for package in "${PACKAGES[@]}"; do present "$package" || echo "$package"; done; }

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

# A container on a network of its own, as compose starts them: netavark (with iptables) and
# aardvark-dns set the network up. No image is needed (registries may be out of reach): the
# container's root is a folder holding /bin/true and the libraries it loads.
check_podman() {
  local dir net rc=0 output
  dir=$(mktemp -d /var/tmp/convserve-engine-check.XXXXXX)
  net=convserve-engine-check-$$
  podman_config "$dir"
  mkdir "$dir/rootfs"
  for file in /bin/true $(ldd /bin/true | grep -o '/[^ ]*'); do cp --parents -L "$file" "$dir/rootfs/"; done
  export CONTAINERS_CONF=$dir/containers.conf
  output=$({ podman network create "$net" >/dev/null && timeout 120 podman run --rm --network "$net" --rootfs "$dir/rootfs" /bin/true; } 2>&1) || rc=$?
  podman network rm -f "$net" >/dev/null 2>&1 || true
  rm -rf "$dir"
  [ $rc -eq 0 ] && { echo "container engine: podman starts a container with a network"; return 0; }
  echo "container engine: podman cannot start a container with a network:" >&2
  echo "$output" | tail -5 | sed 's/^/  /' >&2
  local missing
  missing=$(missing_packages)
  if [ -n "$missing" ]; then
    for package in $missing; do echo "  missing: $package (${NEEDED_FOR[$package]})" >&2; done
    echo "  run scripts/container-engine.sh install" >&2
  else
    echo "  every package it needs is installed (${PACKAGES[*]}): see the error above" >&2
  fi
  return 1
}

case "$command" in
packages)
  printf '%s\n' "${PACKAGES[@]}"
  ;;
install)
  docker_answers && exit 0
  mapfile -t missing < <(missing_packages)
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "installing ${missing[*]} (apt-get)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  check_podman
  ;;
check)
  docker_answers && { echo "container engine: docker answers"; exit 0; }
  command -v podman >/dev/null 2>&1 || {
    echo "no Docker engine and no podman: run scripts/container-engine.sh install" >&2
    exit 1
  }
  check_podman
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
  echo "$usage" >&2
  exit 2
  ;;
esac
