#!/usr/bin/env bash
# Base images for the convserve builds on a machine that cannot reach an image registry.
#   scripts/base-images.sh ENGINE        (ENGINE: docker or podman)
# Prints the build settings to use, one NAME=VALUE a line (compose reads them from the environment):
#   CONVSERVE_PYTHON_IMAGE=...   the base of the train and serve images (python:3.11-slim)
#   CONVSERVE_NGINX_IMAGE=...    the base of the load balancer image    (nginx:1.28-alpine)
# Where an official image is present or can be pulled, it is used and nothing else here runs. Where
# the pull fails, a stand-in is built once from Debian bookworm with debootstrap (Debian's packages
# are reachable where images are not): bookworm's Python 3.11 for python:3.11-slim, its nginx 1.22
# for the nginx image. Stand-ins are for offline builds and tests only; they are tagged
# localhost/convserve-standin/* so that they are never mistaken for the official images.
set -euo pipefail
engine=${1:?usage: scripts/base-images.sh docker|podman}
python_image=${CONVSERVE_PYTHON_IMAGE:-python:3.11-slim}
nginx_image=${CONVSERVE_NGINX_IMAGE:-nginx:1.28-alpine}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

have() { "$engine" image inspect "$1" >/dev/null 2>&1; }
pullable() { have "$1" || timeout 120 "$engine" pull -q "$1" >/dev/null 2>&1; }

# standin TAG PACKAGES: a minimal bookworm with PACKAGES, imported as an image (once).
standin() {
  local tag=$1 packages=$2
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
    --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
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
