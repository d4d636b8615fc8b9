#!/bin/sh
# Renders docker/nginx.conf.template and runs nginx in the foreground. The resolver is the
# container's own DNS server (Docker's 127.0.0.11, podman's network gateway), read from resolv.conf,
# so that nginx asks it again for the replicas' addresses while it runs.
set -eu
resolver=$(awk '$1 == "nameserver" { print $2; exit }' /etc/resolv.conf)
case "$resolver" in *:*) resolver="[$resolver]" ;; esac
export CONVSERVE_LB_RESOLVER="${CONVSERVE_LB_RESOLVER:-${resolver:?no nameserver in /etc/resolv.conf}}"
export CONVSERVE_LB_UPSTREAM="${CONVSERVE_LB_UPSTREAM:-replica:8500}"
export CONVSERVE_LB_PORT="${CONVSERVE_LB_PORT:-8600}"
export CONVSERVE_LB_RESOLVE_S="${CONVSERVE_LB_RESOLVE_S:-2}"
mkdir -p /tmp/nginx
envsubst '${CONVSERVE_LB_RESOLVER} ${CONVSERVE_LB_UPSTREAM} ${CONVSERVE_LB_PORT} ${CONVSERVE_LB_RESOLVE_S}' \
  </etc/convserve/nginx.conf.template >/tmp/nginx/nginx.conf
echo "convserve-lb: :$CONVSERVE_LB_PORT -> $CONVSERVE_LB_UPSTREAM (resolver $CONVSERVE_LB_RESOLVER, every ${CONVSERVE_LB_RESOLVE_S}s)"
exec nginx -p /tmp/nginx -c /tmp/nginx/nginx.conf -g 'daemon off;'
