"""The server process: load and warm the models, serve gRPC, shut down gracefully.

Health (`grpc.health.v1`) is NOT_SERVING until every model is loaded and warmed up, SERVING after,
and NOT_SERVING again from the moment SIGTERM/SIGINT arrives. On that signal new calls are refused
(UNAVAILABLE), calls in flight get `grace_s` to finish, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.convserve.v1 import convserve_pb2 as pb
from protos.convserve.v1 import convserve_pb2_grpc as pb_grpc
from serving.config import ServerConfig
from serving.repository import ModelRepository
from serving.service import ClassifierService, Limits

log = logging.getLogger(__name__)

DRAIN_QUIET_S = 0.2
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    size = config.max_message_mb * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.so_reuseport", 0),
    ]


def install_uvloop() -> bool:
    """uvloop when installed: a faster event loop for the same code."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def serve(config: ServerConfig) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    health_servicer = health.aio.HealthServicer()
    server = grpc.aio.server(options=grpc_options(config))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    decode_pool = ThreadPoolExecutor(config.resolved_decode_threads, thread_name_prefix="decode")
    service = ClassifierService(None, decode_pool, Limits(config.max_images, config.max_pixels))
    pb_grpc.add_ClassifierServicer_to_server(service, server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}")
    await server.start()  # health answers NOT_SERVING (and Classify UNAVAILABLE) while the models load
    log.info("listening on %s:%d (NOT_SERVING until the models are loaded)", config.host, port)

    repository = await asyncio.to_thread(ModelRepository.load, config.models, config.runtime, config.batching)
    await asyncio.to_thread(repository.warm_up)
    service.repository = repository
    for model in repository.all():
        log.info(
            "serving %s version %d: %s; batching max_batch_size=%d max_delay=%.1fms max_queue=%d; "
            "%d decode thread(s)",
            model.name,
            model.version,
            model.runtime.describe(),
            config.max_batch_size,
            config.max_delay_ms,
            config.max_queue_size,
            config.resolved_decode_threads,
        )
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if config.port_file:
        config.port_file.write_text(str(port))
    log.info("SERVING on %s:%d", config.host, port)

    await stop.wait()
    log.info(
        "shutting down: NOT_SERVING, refusing new calls, %.1fs grace for calls in flight", config.grace_s
    )
    service.shutting_down = True
    await health_servicer.enter_graceful_shutdown()
    started = time.monotonic()
    await drain(service, config.grace_s)
    log.info("drained after %.2fs: %d calls active", time.monotonic() - started, service.active_calls)
    await server.stop(max(0.0, config.grace_s - (time.monotonic() - started)))
    await repository.close()
    decode_pool.shutdown(wait=True)
    log.info("stopped")


async def drain(service: ClassifierService, grace_s: float) -> None:
    """Keeps the server open until no call is active and none started for DRAIN_QUIET_S (at most grace/2).

    gRPC core cancels calls it has received but not yet handed to a handler when the server stops
    (grpc/grpc#41785). While calls are running or arriving, the server stays fully open, so every call
    a client has sent reaches its handler before `server.stop` (new ones get UNAVAILABLE after it).
    """
    deadline = time.monotonic() + grace_s / 2
    while time.monotonic() < deadline and (
        service.active_calls > 0 or time.monotonic() - service.last_call_at < DRAIN_QUIET_S
    ):
        await asyncio.sleep(DRAIN_QUIET_S / 4)


def run_server(config: ServerConfig) -> int:
    uvloop = install_uvloop()
    log.info(
        "convserve server config: %s; event loop: %s", config.describe(), "uvloop" if uvloop else "asyncio"
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config))
    return 0
