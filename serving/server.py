"""The composition root and lifecycle: build the rooms, serve gRPC and HTTP, shut down gracefully.

gRPC (--port) and HTTP (--http-port, `http_server`) run on one event loop over one data plane, one
set of batchers, one admission/drain and one request ledger.

Health (`grpc.health.v1`) is NOT_SERVING while the models load and warm up, SERVING while any
version is ready (a version that fails to load is UNAVAILABLE with its reason; the others serve;
with --model-control poll or explicit, versions come and go: `models.lifecycle`),
and NOT_SERVING again from the moment SIGTERM/SIGINT arrives. Then (see `protocols.admission`):
admitted calls finish with their results; new calls are parked and refused with UNAVAILABLE once
the server has stopped accepting; open streams end with UNAVAILABLE; what is left (health
watchers) is cancelled; the batchers close. All of it within `--grace-s`, and the process exits 0.

Security and connection limits come from `transport` (TLS/mTLS credentials, keepalive, streams per
connection) and `protocols.auth` (bearer tokens: checked by `protocols.gate.CallGate`, the
step every call goes through, before parsing and admission).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from protos.convserve.v1 import convserve_pb2_grpc as pb_grpc
from protos.inference import grpc_service_pb2_grpc as kserve_grpc
from serving import access_log
from serving.config import ServerConfig
from serving.core.batch_settings import BatchingConfig
from serving.core.budget import MIB, InputBudget
from serving.core.dataplane import DataPlane, Limits
from serving.core.runtime import RuntimeOptions
from serving.http_server import HttpServer
from serving.memory import configure_malloc, freeze_imports, trim_when_quiet
from serving.metrics import MetricsEndpoint, ServerCollector
from serving.models.lifecycle import ModelLifecycle
from serving.models.registry import ModelRegistry
from serving.models.settings import LoadOptions
from serving.protocols import convserve_v1, kserve_v2
from serving.protocols.admission import Admission
from serving.protocols.auth import TokenCheck, TokenFile
from serving.protocols.calls import CallStats
from serving.protocols.gate import CallGate
from serving.protocols.grpc_logs import quiet_client_gone
from serving.protocols.http_edge import HttpEdge
from serving.transport import connection_options, describe_security, server_credentials

log = logging.getLogger(__name__)

SERVICES = (convserve_v1.SERVICE_NAME, kserve_v2.SERVICE_NAME)
DATA_METHODS = (*convserve_v1.DATA_METHODS, *kserve_v2.DATA_METHODS)
COUNTED = {**convserve_v1.COUNTED, **kserve_v2.COUNTED}  # the metrics' request counts, per method
DRAIN_SHARE = 0.6  # of the grace period, at most, for admitted work; the rest is for stopping


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    size = config.max_message_mb * 1024 * 1024
    options = [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.so_reuseport", 1 if config.reuse_port else 0),  # --workers share the port
        *connection_options(config),  # keepalive, ping policy, streams per connection
    ]
    if config.max_connection_age_s:  # GOAWAY after this age: clients reconnect and rebalance
        options += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.grace_s * 1000)),
        ]
    return options


def batching_of(config: ServerConfig) -> BatchingConfig:
    return BatchingConfig(
        config.max_batch_size,
        config.max_delay_ms / 1000.0,
        config.max_queue_size,
        inline_below_s=config.inline_below_ms / 1000.0,
        low_max_wait_s=config.explain_max_wait_ms / 1000.0,
    )


def runtime_of(config: ServerConfig) -> RuntimeOptions:
    return RuntimeOptions(
        device=config.device,
        intra_op_threads=config.intra_op_threads,
        instances=config.instances,
        allow_preprocessing_drift=config.allow_preprocessing_drift,
    )


def limits_of(config: ServerConfig) -> Limits:
    return Limits(
        config.max_images,
        config.max_pixels,
        config.max_request_pixels,
        max_explain_copies=config.max_explain_copies,
    )


def install_uvloop() -> bool:
    """uvloop when installed: a faster event loop for the same code."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def set_health(servicer: health.aio.HealthServicer, status: int) -> None:
    for name in ("", *SERVICES):
        await servicer.set(name, status)


class Server:
    """Every room wired together: registry, data plane, servicers, the call gate, health, reflection."""

    def __init__(self, config: ServerConfig, registry: ModelRegistry | None = None) -> None:
        self.config = config
        quiet_client_gone()  # a client gone before its answer: no traceback from gRPC's own logger
        self.registry = registry or ModelRegistry()
        self.decode_pool = ThreadPoolExecutor(config.resolved_decode_threads, thread_name_prefix="decode")
        self.dataplane = DataPlane(
            self.registry, self.decode_pool, limits_of(config), InputBudget(config.input_budget_mb * MIB)
        )
        self.admission = Admission()
        # One gate does what every call needs (see `gate`): every data-plane request is counted in
        # the request ledger (refusals for a missing or wrong token included), which the metrics,
        # GetModel and ModelStatistics all read; a call without a valid token is refused before it
        # is parsed or admitted.
        self.calls = CallStats(self.registry)
        tokens = TokenFile(config.auth_token_file) if config.auth_token_file else None
        gate = CallGate(
            self.admission,
            DATA_METHODS,
            self.calls,
            COUNTED,
            TokenCheck(tokens) if tokens is not None else None,
        )
        self.grpc = grpc.aio.server(options=grpc_options(config))
        self.grpc.add_generic_rpc_handlers((gate,))
        self.metrics: MetricsEndpoint | None = None
        # The services are added to the gate, which serves them (see `gate`).
        self.health = health.aio.HealthServicer()
        # The gate stands in for the server (it takes the generic handlers); the stub asks for a Server.
        health_pb2_grpc.add_HealthServicer_to_server(self.health, gate)  # type: ignore[arg-type]
        pb_grpc.add_ClassifierServicer_to_server(
            convserve_v1.ClassifierServicer(self.dataplane, self.registry, self.admission, self.calls),
            gate,
        )
        # What --model-control says: load at start, poll the repository, or load/unload on request.
        self.lifecycle = ModelLifecycle(
            self.registry,
            config.models,
            LoadOptions(runtime_of(config), batching_of(config)),
            config.model_control,
            config.poll_s,
            on_change=self._update_health,
        )
        # The Open Inference Protocol on the same port, over the same data plane and batchers; its REST
        # form (--http-port) shares them, and the request ledger its statistics report.
        kserve_grpc.add_GRPCInferenceServiceServicer_to_server(
            kserve_v2.InferenceServicer(
                self.dataplane, self.registry, self.admission, self.lifecycle, self.calls
            ),
            gate,
        )
        self.http: HttpServer | None = None
        if config.http_port:
            edge = HttpEdge(
                self.dataplane,
                self.registry,
                self.admission,
                self.lifecycle,
                self.calls,
                config.max_message_mb * MIB,
                tokens,
            )
            self.http = HttpServer(config, edge)
        services = list(SERVICES)
        if config.bench_service:
            pb_grpc.add_BenchServicer_to_server(convserve_v1.BenchServicer(), gate)
            services.append(convserve_v1.BENCH_SERVICE_NAME)
        if config.reflection:
            health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
                reflection.aio.ReflectionServicer((*services, health_name, reflection.SERVICE_NAME)),
                gate,
            )
        self.port = 0
        self.http_port = 0
        self._trimmer: asyncio.Task | None = None
        self._tracing: Any = None  # serving.tracing.Tracing, with --otlp-endpoint
        self._arrivals_seen = 0
        self._started = False
        self._serving = False

    def _busy(self) -> bool:
        """Whether calls arrived since the last look."""
        arrivals = self.admission.arrivals
        busy = arrivals != self._arrivals_seen or self.admission.active > 0
        self._arrivals_seen = arrivals
        return busy

    async def start(self) -> int:
        """Listens (NOT_SERVING), loads and warms every model, turns SERVING; returns the bound port."""
        config = self.config
        self._observe()
        await set_health(self.health, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{config.host}:{config.port}"
        credentials = server_credentials(config)
        if credentials is None:
            self.port = self.grpc.add_insecure_port(address)
        else:
            self.port = self.grpc.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {config.host}:{config.port}")
        await self.grpc.start()  # health answers NOT_SERVING (and Classify UNAVAILABLE) while models load
        log.info(
            "listening on %s:%d, %s (NOT_SERVING until the models are loaded)",
            config.host,
            self.port,
            describe_security(config),
        )
        if self.http is not None:
            try:
                self.http_port = await self.http.start()
            except OSError:
                await self.grpc.stop(None)
                raise
            scheme = "https" if config.tls_cert else "http"
            log.info("HTTP on %s://%s:%d", scheme, config.host, self.http_port)
        if config.metrics_port:
            collector = ServerCollector(
                asyncio.get_running_loop(), self.registry, self.dataplane.budget, self.calls
            )
            self.metrics = MetricsEndpoint(collector)
            try:
                port = self.metrics.start(config.host, config.metrics_port)
            except OSError:
                await self.grpc.stop(None)
                if self.http is not None:
                    await self.http.stop(0)
                raise
            log.info("metrics on http://%s:%d/metrics", config.host, port)
        await self.lifecycle.start()
        if not self.registry.entries():
            log.error(
                "no models under %s (expected %s/<name>/<version>/model.onnx)", config.models, config.models
            )
        for model in self.registry.ready():
            batching = model.batcher.config
            log.info(
                "serving %s version %d: batching max_batch_size=%d max_delay=%.1fms max_queue=%d; "
                "%d decode thread(s); input budget %d MiB",
                model.name,
                model.version,
                batching.max_batch_size,
                batching.max_delay_s * 1000,
                batching.max_queue_rows,
                config.resolved_decode_threads,
                config.input_budget_mb,
            )
        self._trimmer = asyncio.create_task(trim_when_quiet(self._busy))
        self._started = True
        await self._update_health()
        if not self._serving:
            log.error("no model version could be loaded: health stays NOT_SERVING")
        return self.port

    def _observe(self) -> None:
        """The receipts' listeners this server's flags ask for: the access log, the OTLP spans."""
        if self.config.access_log:
            access_log.install()
        if self.config.otlp_endpoint:
            from serving import tracing

            self._tracing = tracing.install(tracing.otlp_processor(self.config.otlp_endpoint))
            log.info("tracing: OTLP spans to %s", self.config.otlp_endpoint)

    async def _unobserve(self, timeout_s: float) -> None:
        """Listeners off (an in-process server leaves none behind); the spans still queued are sent."""
        if self.config.access_log:
            access_log.uninstall()
        if self._tracing is not None:
            from serving import tracing

            await asyncio.to_thread(tracing.uninstall, self._tracing, max(0.1, timeout_s))
            self._tracing = None

    async def _update_health(self) -> None:
        """SERVING while any version is READY (models come and go with --model-control poll/explicit)."""
        if not self._started or self.admission.draining:
            return
        serving = bool(self.registry.ready())
        if serving == self._serving:
            return
        self._serving = serving
        status = health_pb2.HealthCheckResponse
        await set_health(self.health, status.SERVING if serving else status.NOT_SERVING)
        if serving:
            log.info("SERVING on %s:%d", self.config.host, self.port)
        else:
            log.warning("no model version is ready: NOT_SERVING")

    async def shut_down(self) -> None:
        """Drains, stops and closes everything within the grace period (see the module's docstring)."""
        config, admission = self.config, self.admission
        started = time.monotonic()
        end = started + config.grace_s
        log.info("shutting down: NOT_SERVING, refusing new calls, %.1fs grace", config.grace_s)
        admission.begin_drain()
        if self._trimmer is not None:
            self._trimmer.cancel()
        await self.lifecycle.stop_polling()
        await self.health.enter_graceful_shutdown()
        await admission.wait_drained(started + DRAIN_SHARE * config.grace_s)
        log.info(
            "drained after %.2fs: %d call(s) still working, %d parked",
            time.monotonic() - started,
            admission.active,
            admission.parked,
        )
        # Stop accepting (GOAWAY, listeners closed) while the parked calls are still matched to handlers,
        # so that the clients they belong to see the refusal and then a closed port.
        if self.http is not None:
            self.http.stop_accepting()
        stopping = asyncio.create_task(self.grpc.stop(max(0.0, end - time.monotonic())))
        # HTTP: each response in flight ends with `Connection: close`, idle connections close.
        http_stopping = (
            asyncio.create_task(self.http.stop(max(0.0, 0.8 * (end - time.monotonic()))))
            if self.http is not None
            else None
        )
        await asyncio.sleep(0.05)
        admission.release()  # parked calls get UNAVAILABLE, open streams end
        await admission.wait_idle(end - 0.2 * (end - time.monotonic()))
        await self.grpc.stop(None)  # what is left (health watchers) is cancelled now, not at the grace's end
        await stopping
        if http_stopping is not None:
            await http_stopping
        await self.lifecycle.wait_drained(max(0.0, end - time.monotonic()))
        await self.registry.close()
        self.decode_pool.shutdown(wait=True)
        if self.metrics is not None:  # scraped until the end: the versions show UNLOADED last
            await asyncio.to_thread(self.metrics.stop)
        await self._unobserve(end - time.monotonic())
        log.info("stopped after %.2fs", time.monotonic() - started)


async def serve(config: ServerConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = Server(config)
    try:
        port = await server.start()
    except OSError as exc:  # a port taken: one line, no traceback
        log.error("%s", exc)
        return 1
    if config.port_file:
        config.port_file.write_text(str(port))
    await stop.wait()
    await server.shut_down()
    return 0


def run_server(config: ServerConfig) -> int:
    configure_malloc()
    frozen = freeze_imports()
    uvloop = install_uvloop()
    log.info(
        "convserve server config: %s; event loop: %s; %d objects of the imports left out of the cycle "
        "collector",
        config.describe(),
        "uvloop" if uvloop else "asyncio",
        frozen,
    )
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(serve(config))
    return 0
