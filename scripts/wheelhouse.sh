#!/usr/bin/env bash
# Fills docker/wheelhouse/, the wheels the image builds offer pip first (`--find-links`, in the
# build stage only: none of it reaches an image).
#   scripts/wheelhouse.sh [PYTHON]          the CPU build of torch (the version pyproject.toml pins), so
#                                           that the train image builds without fetching the CUDA build
#   scripts/wheelhouse.sh [PYTHON] --all    every wheel the serve and train images install, for builds
#                                           with no package index (build argument WHEELHOUSE_ONLY=1):
#                                           for machines whose containers cannot reach or trust one
# pip takes the wheels from its configured sources (a local wheel directory, or PyTorch's CPU index
# given with PIP_EXTRA_INDEX_URL); it fails, without downloading a CUDA build, when none has the CPU
# build. Wheels already there are kept.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
python=${1:-python3}
all=${2:-}
pin=$(grep -o '"torch==[^"]*"' "$here/pyproject.toml" | tr -d '"')
wheelhouse=$here/docker/wheelhouse
pip=("$python" -m pip download --quiet --only-binary :all: --dest "$wheelhouse")
compgen -G "$wheelhouse/${pin/==/-}+cpu-*.whl" >/dev/null || "${pip[@]}" --no-deps "$pin+cpu"
if [ "$all" = "--all" ]; then
  # The project's own dependencies (with torch's CPU build found above), pip, and the build backend.
  "${pip[@]}" --find-links "$wheelhouse" pip "setuptools>=77" "$pin+cpu" "$here[serve,fast,train]"
  rm -f "$wheelhouse"/convserve-*
fi
ls "$wheelhouse"
