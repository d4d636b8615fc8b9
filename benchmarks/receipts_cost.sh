#!/usr/bin/env bash
# What receipts and tracing cost, in images/s on the digits model's unary raw-tensor scenarios.
#
#   benchmarks/receipts_cost.sh MODELS OUT.md [ROUNDS]
#
# Three servers of this checkout with the bench's flags, one port each:
#   bare      receipts taken out (receiptless_server.py): the baseline
#   receipts  `convserve serve` as it is (receipts always on, tracing off)
#   traced    tracing on, its spans to an in-memory exporter (traced_server.py)
# then benchmarks/ab_servers.py twice, bare/receipts and receipts/traced, in alternating rounds, with
# the servers' CPU time per image beside their images/s (the traced pair waits 1.2 s after each run, so
# that the spans its export thread still has to make, every second at most, count for the traced side),
# and, where py-spy is installed, the receipt's share of the receipts server's event loop
# (benchmarks/sampled_share.py) at concurrency 1 and 64.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
models=$(realpath "$1") out=$(realpath -m "$2") rounds=${3:-12}
python=${PYTHON:-$here/.venv/bin/python}
flags=(--models "$models" --host 127.0.0.1 --device cpu --max-batch-size 32 --max-delay-ms 2
  --log-level WARNING --http-port 0 --metrics-port 0)
logs=$(mktemp -d)  # the servers' logs: kept for a look after a failed start, out of the repository
pids=()
trap 'kill -INT "${pids[@]}" 2>/dev/null; wait' EXIT

serve() {  # PORT COMMAND...: a server, once it answers health
  local port=$1
  shift
  "$python" "$@" "${flags[@]}" --port "$port" >"$logs/$port.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 120); do
    (cd "$here" && "$python" -m serving health --server "127.0.0.1:$port" >/dev/null 2>&1) && return
    sleep 0.5
  done
  echo "the server on $port did not start: $logs/$port.log" >&2
  return 1
}

cd "$here"
serve 18571 benchmarks/receiptless_server.py
serve 18572 -m serving serve
serve 18573 benchmarks/traced_server.py
{
  echo "# What receipts and tracing cost"
  echo
  echo "Made by \`benchmarks/receipts_cost.sh $*\` on $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores,"
  echo "commit $(git log -1 --format='%h %s')$(git diff --quiet HEAD || echo ' (with changes not committed)')."
  echo
  echo "## Receipts (always on): bare → receipts"
  echo
  "$python" benchmarks/ab_servers.py bare=127.0.0.1:18571@"${pids[0]}" receipts=127.0.0.1:18572@"${pids[1]}" --rounds "$rounds"
  echo "## Tracing (spans to an in-memory exporter): receipts → traced"
  echo
  "$python" benchmarks/ab_servers.py receipts=127.0.0.1:18572@"${pids[1]}" traced=127.0.0.1:18573@"${pids[2]}" --rounds "$rounds" \
    --settle 1.2
  echo "## The receipt's share of the event loop, sampled in the server"
  echo
  if PATH="$(dirname "$python"):$PATH" command -v py-spy >/dev/null; then
    for scenario in "unary c1 tensor" "unary c64 tensor"; do
      PATH="$(dirname "$python"):$PATH" "$python" benchmarks/sampled_share.py 127.0.0.1:18572@"${pids[1]}" \
        --scenario "$scenario" --duration 20
    done
  else
    echo "(py-spy is not installed: \`pip install py-spy\` to sample the receipts server.)"
    echo
  fi
} >"$out"
cat "$out"
