#!/usr/bin/env bash
# System packages the tests use: nginx (the gRPC load balancer in front of two servers) and Debian's
# docker-compose (validates docker-compose.yml offline; there is no Docker engine here). Installed
# only when missing; needs root (as on CI) or sudo.
set -euo pipefail
missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # loads the run report in tests/test_report.py
# promtool (Debian's prometheus package) checks deploy/prometheus/prometheus.yml in tests/test_metrics.py.
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# libb64: perf_analyzer (Triton's load tool, from the tritonclient 2.41 wheel) links against it.
ls /usr/lib/*/libb64.so.0d >/dev/null 2>&1 || missing+=(libb64-0d)
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
echo "installing ${missing[*]} (apt-get)"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
