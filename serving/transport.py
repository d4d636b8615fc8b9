"""What the server's connections are made of: TLS / mTLS credentials and the per-connection limits.

Limits, for load balancers and bad clients:
  * keepalive: the server pings a connection idle for `--keepalive-time-s` and closes it when the
    ping is not answered within `--keepalive-timeout-s` (dead peers and half-open NAT entries go);
  * clients may ping (also with no call open, unless `--no-keepalive-permit-without-calls`), but not
    more often than `--keepalive-min-ping-interval-s`: a client that does gets GOAWAY
    (`too_many_pings`) after gRPC's few strikes;
  * `--max-concurrent-streams` calls open at once per connection (HTTP/2 SETTINGS); more wait in the
    client until one ends;
  * `--max-connection-age-s` (in `server.grpc_options`): GOAWAY after that age, so clients rebalance.
"""

from __future__ import annotations

import grpc

from serving.config import ServerConfig


def connection_options(config: ServerConfig) -> list[tuple[str, int]]:
    min_ping_ms = int(config.keepalive_min_ping_interval_s * 1000)
    return [
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", int(config.keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", 0),  # the server's own pings go on while a connection idles
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_ms),  # the least between pings received
        ("grpc.http2.max_ping_strikes", 2),  # then GOAWAY too_many_pings
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
    ]


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS with --tls-cert/--tls-key, client certificates required with --tls-client-ca; None: plaintext."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def describe_security(config: ServerConfig) -> str:
    transport = "plaintext"
    if config.tls_cert:
        transport = "mTLS (client certificates required)" if config.tls_client_ca else "TLS"
    tokens = "bearer tokens required" if config.auth_token_file else "no token"
    return f"{transport}, {tokens}"
