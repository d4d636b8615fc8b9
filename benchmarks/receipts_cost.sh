#!/usr/bin/env bash
# What receipts and tracing cost, in images/s on the digits model's unary raw-tensor scenarios.
#
#   benchmarks/receipts_cost.sh BEFORE_TREE MODELS OUT.md [ROUNDS]
#
# BEFORE_TREE is a checkout of the commit before receipts (git worktree add /tmp/before 43444f9); the
# commit measured is this checkout. Three servers with the bench's flags, one port each:
#   before   BEFORE_TREE's server (no receipts)
#   after    this checkout's (receipts always on)
#   traced   this checkout's with tracing on, its spans to an in-memory exporter (traced_server.py)
# then benchmarks/ab_servers.py twice, before/after and after/traced, in alternating rounds.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
before=$(realpath "$1") models=$(realpath "$2") out=$(realpath -m "$3") rounds=${4:-12}
python=${PYTHON:-$here/.venv/bin/python}
flags=(--models "$models" --host 127.0.0.1 --device cpu --max-batch-size 32 --max-delay-ms 2
  --log-level WARNING --http-port 0 --metrics-port 0)
pids=()
trap 'kill -INT "${pids[@]}" 2>/dev/null; wait' EXIT

serve() {  # TREE PORT COMMAND...: a server in TREE, once it answers health
  local tree=$1 port=$2
  shift 2
  (cd "$tree" && exec "$python" "$@" "${flags[@]}" --port "$port") >"$out.$port.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 120); do
    (cd "$here" && "$python" -m serving health --server "127.0.0.1:$port" >/dev/null 2>&1) && return
    sleep 0.5
  done
  echo "the server on $port did not start: $out.$port.log" >&2
  return 1
}

serve "$before" 18571 -m serving serve
serve "$here" 18572 -m serving serve
serve "$here" 18573 benchmarks/traced_server.py
cd "$here"
{
  echo "# What receipts and tracing cost"
  echo
  echo "Made by \`benchmarks/receipts_cost.sh $*\` on $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores,"
  echo "before = $(git -C "$before" log -1 --format='%h %s'), after = $(git log -1 --format='%h %s')."
  echo
  echo "## Receipts (always on): before → after"
  echo
  "$python" benchmarks/ab_servers.py before=127.0.0.1:18571 after=127.0.0.1:18572 --rounds "$rounds"
  echo "## Tracing (spans to an in-memory exporter): after → traced"
  echo
  "$python" benchmarks/ab_servers.py after=127.0.0.1:18572 traced=127.0.0.1:18573 --rounds "$rounds"
} >"$out"
cat "$out"
