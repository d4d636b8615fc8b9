#!/usr/bin/env bash
# Installs convserve into a virtual environment. The Makefile and every Dockerfile use this script,
# so a fresh machine and an image get the same install.
#   scripts/install.sh VENV EXTRAS [--editable]
#   e.g. scripts/install.sh .venv serve,train,dev,fast --editable   (development)
#        scripts/install.sh /opt/venv serve,fast                     (the CPU serving image: no torch)
set -euo pipefail
venv=${1:?usage: scripts/install.sh VENV EXTRAS [--editable]}
extras=${2:?usage: scripts/install.sh VENV EXTRAS [--editable]}
mode=${3:-}
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
if [ "$mode" = "--editable" ]; then
  "$venv/bin/python" -m pip install --quiet -e "$here[$extras]"
else
  "$venv/bin/python" -m pip install --quiet "$here[$extras]"
fi
"$venv/bin/python" -c "import serving.core.contract; print('convserve installed in $venv with extras [$extras]')"
