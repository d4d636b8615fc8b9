"""SIGTERM under continuous HTTP load: nothing admitted is lost, every refusal is a 503 that closes its
connection, health turns 503 at once, and the server exits within its grace period."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.slow
CLIENTS = 16
GRACE_S = 5.0


def infer_body(metadata: dict, pixels: np.ndarray) -> dict:
    """An Open Inference Protocol JSON request for the model's own input tensor, from its metadata."""
    (spec,) = [i for i in metadata["inputs"] if i["name"] != "image_bytes"]
    rows = pixels.astype(np.float32) / 255
    data = rows.ravel().tolist()
    return {"inputs": [{"name": spec["name"], "datatype": "FP32", "shape": list(rows.shape), "data": data}]}


def top_classes(answer: dict) -> list[int]:
    (output,) = answer["outputs"]
    return np.asarray(output["data"]).reshape(output["shape"]).argmax(axis=1).tolist()


@dataclass
class Outcome:
    sent: float
    answered: float
    status: int | None  # None: no HTTP answer
    error: str = ""  # the exception's name when there was no answer
    closes: bool = False  # the answer said `Connection: close`
    right: bool = True
    fresh: bool = False  # sent on a new connection (the last answer closed the one before)


@pytest.mark.parametrize("repetition", range(5))
def test_sigterm_under_continuous_http_load(repetition, model_repo, digit_samples, server_factory) -> None:
    server = server_factory(model_repo, "--grace-s", str(GRACE_S), http=True)
    base = server.http_url
    with httpx.Client(base_url=base, timeout=10) as probe:
        body = infer_body(probe.get("/v2/models/digits").json(), digit_samples[0][:8])
        first = probe.post("/v2/models/digits/infer", json=body)
        assert first.status_code == 200, first.text
        expected = top_classes(first.json())
    outcomes: list[Outcome] = []
    stop = threading.Event()
    unready_at: list[float] = []

    def client() -> None:
        # One keep-alive connection per client, no retries: every outcome is seen.
        with httpx.Client(base_url=base, timeout=10, transport=httpx.HTTPTransport(retries=0)) as http:
            fresh = True
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    answer = http.post("/v2/models/digits/infer", json=body)
                except httpx.HTTPError as exc:
                    outcomes.append(Outcome(sent, time.monotonic(), None, type(exc).__name__, fresh=fresh))
                    fresh = True
                    time.sleep(0.01)  # the port is closed: don't spin
                    continue
                right = answer.status_code != 200 or top_classes(answer.json()) == expected
                closes = answer.headers.get("connection", "").lower() == "close"
                outcomes.append(Outcome(sent, time.monotonic(), answer.status_code, "", closes, right, fresh))
                fresh = closes

    def watch_health() -> None:
        with httpx.Client(base_url=base, timeout=2) as http:
            while not stop.is_set():
                try:
                    status = http.get("/v2/health/ready").status_code
                except httpx.HTTPError:
                    status = None
                if status != 200:
                    unready_at.append(time.monotonic())
                    return
                time.sleep(0.02)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    threads.append(threading.Thread(target=watch_health))
    for thread in threads:
        thread.start()
    try:
        while len(outcomes) < 300:  # the load is on
            time.sleep(0.01)
        signalled = time.monotonic()
        server.process.send_signal(15)
        assert server.process.wait(GRACE_S + 5) == 0
        exited = time.monotonic()
        time.sleep(0.2)  # clients see the closed port too
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)

    statuses = Counter(o.status if o.status is not None else o.error for o in outcomes)
    print(f"repetition {repetition}: {dict(statuses)}")
    assert all(o.right for o in outcomes), "a request got someone else's answer"
    # Every answer is 200 or a 503 that closes its connection; before the signal, all are 200.
    assert {o.status for o in outcomes if o.status is not None} <= {200, 503}, statuses
    assert all(o.closes for o in outcomes if o.status == 503), "a 503 kept its connection open"
    assert all(o.status == 200 for o in outcomes if o.answered < signalled), statuses

    # No request lost without an answer, except connections refused once the port is closed.
    def refused(o: Outcome) -> bool:
        return o.error == "ConnectError" and o.sent > signalled

    lost = [o for o in outcomes if o.status is None and not refused(o)]
    assert not lost, [(o.error, f"sent {o.sent - signalled:.3f}s after SIGTERM", o.fresh) for o in lost]
    # Health went 503 at once, and every request sent after that was refused.
    assert unready_at and unready_at[0] - signalled < 1
    assert all(o.status != 200 for o in outcomes if o.sent > unready_at[0])
    stopped = re.search(r"stopped after ([0-9.]+)s", server.log())
    assert stopped and float(stopped.group(1)) <= GRACE_S, server.log()[-2000:]
    assert exited - signalled < GRACE_S + 3
    assert "Traceback" not in server.log()
