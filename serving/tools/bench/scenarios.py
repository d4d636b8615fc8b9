"""The server scenarios the bench runs, and the load generator's command for each."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from serving.client.connection import PLAINTEXT, Connection

METRICS_OFF = " (metrics off)"


def variant(name: str, metrics: str) -> str:
    """A scenario's name in the report: as is with metrics on (the server's default), marked when off."""
    return name if metrics == "on" else name + METRICS_OFF


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # unary | stream | kserve | echo | http | http-json | http-classify
    payload: str = "png"  # png | tensor
    concurrency: int = 1
    images: int = 1
    server: str = "batching"  # batching | no-batching

    def command(
        self,
        target: str,
        model: str,
        duration: float,
        connection: Connection = PLAINTEXT,
        image_size: tuple[int, int] | None = None,
        http_target: str | None = None,
        channels: int = 1,
    ) -> dict:
        return {
            "channels": channels,
            "image_size": list(image_size) if image_size else None,
            "target": target,
            "http_target": http_target,
            "connection": connection.to_json(),
            "kind": self.kind,
            "payload": self.payload,
            "concurrency": self.concurrency,
            "images": self.images,
            "model": model,
            "duration": duration,
            "streams": 2,
            "inflight": 512,
        }


def scenarios() -> list[Scenario]:
    found = []
    for payload in ("png", "tensor"):
        for concurrency in (1, 16, 64):
            found.append(Scenario(f"unary c{concurrency} {payload}", "unary", payload, concurrency))
        found.append(Scenario(f"unary 32-image c4 {payload}", "unary", payload, 4, 32))
        found.append(Scenario(f"stream 32/msg {payload}", "stream", payload, images=32))
        found.append(Scenario(f"no-batching unary c64 {payload}", "unary", payload, 64, server="no-batching"))
        # The Open Inference Protocol on the same server: png is its BYTES input, tensor its FP32 one.
        for concurrency in (1, 64):
            found.append(Scenario(f"kserve c{concurrency} {payload}", "kserve", payload, concurrency))
        # The same over HTTP: binary tensor data, as tritonclient.http sends it.
        for concurrency in (1, 64):
            found.append(Scenario(f"http c{concurrency} {payload}", "http", payload, concurrency))
    found.append(Scenario("http-json c1 tensor", "http-json", "tensor", 1))
    found.append(Scenario("http-json c64 tensor", "http-json", "tensor", 64))
    found.append(Scenario("http-classify c1 png", "http-classify", "png", 1))
    found.append(Scenario("http-classify c64 png", "http-classify", "png", 64))
    found.append(Scenario("echo c1", "echo", concurrency=1))
    found.append(Scenario("echo c64", "echo", concurrency=64))
    return found


def chosen_scenarios(args: argparse.Namespace) -> list[Scenario]:
    return [s for s in scenarios() if not args.scenario or s.name in args.scenario]
