#!/usr/bin/env bash
# Base images for the convserve builds on a machine that cannot reach an image registry.
#   scripts/base-images.sh ENGINE        (ENGINE: docker or podman)
# Prints the build settings to use, one NAME=VALUE a line (compose reads them from the environment):
#   CONVSERVE_PYTHON_IMAGE=...   the base of the train and serve images (python:3.11-slim)
#   CONVSERVE_NGINX_IMAGE=...    the base of the load balancer image    (nginx:1.28-alpine)
#   CONVSERVE_PROMETHEUS_IMAGE=  the `monitoring` profile's Prometheus   (prom/prometheus:v3.5.0)
# Where an official image is present or can be pulled, it is used and nothing else here runs. Where
# the pull fails, a stand-in is built once from Debian bookworm with debootstrap (Debian's packages
# are reachable where images are not): bookworm's Python 3.11 for python:3.11-slim, its nginx 1.22
# for the nginx image, its Prometheus 2.42 (started as the official image starts its own) for Prometheus. Stand-ins are for offline builds and tests only; they are tagged
# localhost/convserve-standin/* so that they are never mistaken for the official images.
set -euo pipefail
engine=${1:?usage: scripts/base-images.sh docker|podman}
python_image=${CONVSERVE_PYTHON_IMAGE:-python:3.11-slim}
nginx_image=${CONVSERVE_NGINX_IMAGE:-nginx:1.28-alpine}
prometheus_image=${CONVSERVE_PROMETHEUS_IMAGE:-prom/prometheus:v3.5.0}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

have() { "$engine" image inspect "$1" >/dev/null 2>&1; }
pullable() { have "$1" || timeout 120 "$engine" pull -q "$1" >/dev/null 2>&1; }

# standin TAG PACKAGES [CHANGE...]: a minimal bookworm with PACKAGES, imported as an image (once), with
# more Dockerfile instructions (ENTRYPOINT, CMD) given as CHANGEs.
standin() {
  local tag=$1 packages=$2
  shift 2
  local changes=(--change 'CMD ["/bin/bash"]')
  [ $# -gt 0 ] && changes=()
  for change in "$@"; do changes+=(--change "$change"); done
  have "$tag" && return 0
  command -v debootstrap >/dev/null || {
    echo "base-images: no registry and no debootstrap to build $tag (apt-get install debootstrap)" >&2
    exit 1
  }
  local root
  root=$(mktemp -d /var/tmp/convserve-standin.XXXXXX)
  echo "base-images: building $tag from Debian bookworm ($packages)" >&2
  debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >&2
  chroot "$root" apt-get clean
  rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
  tar -C "$root" --numeric-owner -c . | "$engine" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    "${changes[@]}" - "$tag" >/dev/null
  rm -rf "$root"
}

if pullable "$python_image"; then
  echo "CONVSERVE_PYTHON_IMAGE=$python_image"
else
  standin localhost/convserve-standin/python:3.11-bookworm python3,python3-venv,ca-certificates
  echo "CONVSERVE_PYTHON_IMAGE=localhost/convserve-standin/python:3.11-bookworm"
fi
if pullable "$nginx_image"; then
  echo "CONVSERVE_NGINX_IMAGE=$nginx_image"
else
  standin localhost/convserve-standin/nginx:1.22-bookworm nginx,gettext-base
  echo "CONVSERVE_NGINX_IMAGE=localhost/convserve-standin/nginx:1.22-bookworm"
fi
if pullable "$prometheus_image"; then
  echo "CONVSERVE_PROMETHEUS_IMAGE=$prometheus_image"
else
  # The official image's entrypoint and arguments, and a data folder its user (nobody) may write.
  standin localhost/convserve-standin/prometheus:2.42-bookworm prometheus \
    'ENTRYPOINT ["/usr/bin/prometheus"]' \
    'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]' \
    'WORKDIR /prometheus'
  echo "CONVSERVE_PROMETHEUS_IMAGE=localhost/convserve-standin/prometheus:2.42-bookworm"
fi
