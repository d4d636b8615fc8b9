#!/bin/sh
# Renders docker/nginx.conf.template and runs nginx in the foreground. The resolver is the
# container's own DNS server (Docker's 127.0.0.11, podman's network gateway), read from resolv.conf,
# so that nginx asks it again for the replicas' addresses while it runs.
#
# gRPC on CONVSERVE_LB_PORT (8600) to CONVSERVE_LB_UPSTREAM (replica:8500); the HTTP API on
# CONVSERVE_LB_HTTP_PORT (8601) to CONVSERVE_LB_HTTP_UPSTREAM (replica:8501).
#
# Plaintext unless CONVSERVE_LB_TLS_CERT is set. Then nginx terminates TLS from clients with that
# certificate (and CONVSERVE_LB_TLS_KEY; with CONVSERVE_LB_CLIENT_CA it requires client certificates
# that CA signed) and re-encrypts every call to the replicas (grpcs://), verifying their certificates
# against CONVSERVE_LB_UPSTREAM_CA for the name CONVSERVE_LB_UPSTREAM_NAME (default: the upstream's
# host), presenting CONVSERVE_LB_UPSTREAM_CERT/KEY when the replicas require client certificates.
# Bearer tokens pass through untouched: the replicas check them.
set -eu
resolver=$(awk '$1 == "nameserver" { print $2; exit }' /etc/resolv.conf)
case "$resolver" in *:*) resolver="[$resolver]" ;; esac
export CONVSERVE_LB_RESOLVER="${CONVSERVE_LB_RESOLVER:-${resolver:?no nameserver in /etc/resolv.conf}}"
export CONVSERVE_LB_UPSTREAM="${CONVSERVE_LB_UPSTREAM:-replica:8500}"
export CONVSERVE_LB_PORT="${CONVSERVE_LB_PORT:-8600}"
export CONVSERVE_LB_HTTP_UPSTREAM="${CONVSERVE_LB_HTTP_UPSTREAM:-replica:8501}"
export CONVSERVE_LB_HTTP_PORT="${CONVSERVE_LB_HTTP_PORT:-8601}"
export CONVSERVE_LB_RESOLVE_S="${CONVSERVE_LB_RESOLVE_S:-2}"
template="${CONVSERVE_LB_TEMPLATE:-/etc/convserve/nginx.conf.template}"
prefix="${CONVSERVE_LB_PREFIX:-/tmp/nginx}"

if [ -n "${CONVSERVE_LB_TLS_CERT:-}" ]; then
  mode="TLS, re-encrypted to the replicas"
  export CONVSERVE_LB_LISTEN_TLS=" ssl"
  export CONVSERVE_LB_SCHEME=grpcs CONVSERVE_LB_HTTP_SCHEME=https
  server_tls="ssl_certificate $CONVSERVE_LB_TLS_CERT; ssl_certificate_key ${CONVSERVE_LB_TLS_KEY:?CONVSERVE_LB_TLS_KEY must go with CONVSERVE_LB_TLS_CERT};"
  if [ -n "${CONVSERVE_LB_CLIENT_CA:-}" ]; then
    mode="mTLS, re-encrypted to the replicas"
    server_tls="$server_tls ssl_client_certificate $CONVSERVE_LB_CLIENT_CA; ssl_verify_client on;"
  fi
  # The same settings for both ports: grpc_ssl_* directives for gRPC, proxy_ssl_* for HTTP.
  upstream_tls() {
    p=$1
    tls="${p}_ssl_trusted_certificate ${CONVSERVE_LB_UPSTREAM_CA:?CONVSERVE_LB_UPSTREAM_CA (the CA of the replicas' certificates) is needed with TLS};"
    tls="$tls ${p}_ssl_verify on; ${p}_ssl_server_name on; ${p}_ssl_name ${CONVSERVE_LB_UPSTREAM_NAME:-${CONVSERVE_LB_UPSTREAM%:*}};"
    if [ -n "${CONVSERVE_LB_UPSTREAM_CERT:-}" ]; then
      tls="$tls ${p}_ssl_certificate $CONVSERVE_LB_UPSTREAM_CERT; ${p}_ssl_certificate_key ${CONVSERVE_LB_UPSTREAM_KEY:?CONVSERVE_LB_UPSTREAM_KEY must go with CONVSERVE_LB_UPSTREAM_CERT};"
    fi
    printf '%s' "$tls"
  }
  grpc_tls=$(upstream_tls grpc)
  http_tls=$(upstream_tls proxy)
  export CONVSERVE_LB_SERVER_TLS="$server_tls" CONVSERVE_LB_UPSTREAM_TLS="$grpc_tls" CONVSERVE_LB_HTTP_UPSTREAM_TLS="$http_tls"
else
  mode="plaintext"
  export CONVSERVE_LB_LISTEN_TLS="" CONVSERVE_LB_SCHEME=grpc CONVSERVE_LB_HTTP_SCHEME=http CONVSERVE_LB_SERVER_TLS=""
  export CONVSERVE_LB_UPSTREAM_TLS="" CONVSERVE_LB_HTTP_UPSTREAM_TLS=""
fi

mkdir -p "$prefix"
envsubst '${CONVSERVE_LB_RESOLVER} ${CONVSERVE_LB_UPSTREAM} ${CONVSERVE_LB_PORT} ${CONVSERVE_LB_RESOLVE_S}
  ${CONVSERVE_LB_LISTEN_TLS} ${CONVSERVE_LB_SCHEME} ${CONVSERVE_LB_SERVER_TLS} ${CONVSERVE_LB_UPSTREAM_TLS}
  ${CONVSERVE_LB_HTTP_UPSTREAM} ${CONVSERVE_LB_HTTP_PORT} ${CONVSERVE_LB_HTTP_SCHEME} ${CONVSERVE_LB_HTTP_UPSTREAM_TLS}' \
  <"$template" >"$prefix/nginx.conf"
echo "convserve-lb: gRPC :$CONVSERVE_LB_PORT -> $CONVSERVE_LB_UPSTREAM, HTTP :$CONVSERVE_LB_HTTP_PORT -> $CONVSERVE_LB_HTTP_UPSTREAM, $mode (resolver $CONVSERVE_LB_RESOLVER, every ${CONVSERVE_LB_RESOLVE_S}s)"
exec nginx -p "$prefix" -c "$prefix/nginx.conf" -g 'daemon off;'
