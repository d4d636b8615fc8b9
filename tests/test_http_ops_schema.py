"""The HTTP API against its own OpenAPI schema (`GET /openapi.json`), property-based, on a real server.

schemathesis generates requests for every operation the schema lists, valid ones and ones that break
it (wrong types, missing fields, odd strings), well over 1,000 in all, and sends them to a server
process. Every answer must be a documented status with a documented content type and a body that
matches the schema, no answer may be a 5xx, and the server's log must hold no traceback. Failures are
collected across all operations and reported together, each with the request that caused it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from serving.tools.launch import LaunchedServer
from tests.conftest import start_server

pytestmark = pytest.mark.slow
REQUESTS = 1000  # at least this many generated requests
BUDGET_S = 150.0  # and at most about this long: it stops topping up once spent


@schemathesis.check
def no_internal_error(ctx, response, case) -> bool:
    """No 500, nor a 5xx the error table does not give: 503 (draining, overloaded, not ready) and 504
    (the request's own deadline, e.g. a tiny `Timeout-Ms`) are answers, if the schema documents them."""
    if response.status_code >= 500 and response.status_code not in (503, 504):
        raise AssertionError(f"server error {response.status_code}: {response.text[:500]}")
    return True


CHECKS = [
    no_internal_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaunchedServer]:
    launched = start_server(model_repo, tmp_path_factory.mktemp("schema"), "--max-delay-ms", "1", http=True)
    yield launched
    launched.stop()


def exercise(
    operation,
    mode: GenerationMode,
    examples: int,
    base: str,
    session,
    failures: dict,
    seen: set | None = None,
) -> int:
    """Up to `examples` generated requests for one operation; returns how many were sent. The statuses
    answered go into `seen` when given."""
    sent = 0

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # no shrinking: the failing request is reported as sent
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        nonlocal sent
        response = case.call(base_url=base, session=session, timeout=30)
        sent += 1
        if seen is not None:
            seen.add(response.status_code)
        case.validate_response(response, checks=CHECKS)

    try:
        check()
    except Unsatisfiable:  # nothing to break (no parameters, or only path strings): nothing to send
        pass
    except (Exception, BaseExceptionGroup) as failure:  # every operation's failure is reported
        key = f"{operation.method.upper()} {operation.path} ({mode.value})"
        failures.setdefault(key, str(failure)[:3000])
    return sent


def test_every_generated_request_gets_a_documented_answer(server: LaunchedServer) -> None:
    base = server.http_url
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json", timeout=10)
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert "/v2/models/{model_name}/infer" in paths or any(p.endswith("/infer") for p in paths), paths
    assert any(":classify" in p for p in paths) and "/v2/health/ready" in paths, paths

    failures: dict[str, str] = {}
    sent, passes, started = 0, 0, time.monotonic()
    per_operation = max(10, REQUESTS // (2 * len(operations)) + 5)
    with requests.Session() as session:
        while sent < REQUESTS * 1.1 and time.monotonic() - started < BUDGET_S:
            for operation in operations:
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                    sent += exercise(operation, mode, per_operation, base, session, failures)
            passes += 1
    elapsed = time.monotonic() - started
    print(f"{sent} requests over {len(operations)} operations in {passes} passes, {elapsed:.0f}s")
    report = "\n\n".join(f"{key}:\n{text}" for key, text in sorted(failures.items()))
    assert not failures, f"{len(failures)} operations failed:\n\n{report}"
    assert sent >= REQUESTS, f"only {sent} requests in {elapsed:.0f}s"
    log = server.log()
    assert "Traceback" not in log, log[-5000:]


OPEN_PATHS = {"/v2/health/live", "/v2/health/ready", "/", "/web/{name}"}  # the probes and the page's files
DESCRIBING = {"/openapi.json", "/docs"}  # the API's own description: open or guarded, as documented


def test_without_a_token_every_guarded_operation_answers_a_documented_401(
    model_repo: Path, server_factory, tmp_path: Path
) -> None:
    """With --auth-token-file, generated requests that carry no token: the probes still answer, every
    other operation answers 401 (documented, as the rest is). The schema is fetched with the token."""
    tokens = tmp_path / "tokens"
    tokens.write_text("schema-test-token\n")
    server = server_factory(model_repo, "--auth-token-file", str(tokens), http=True)
    base = server.http_url
    token = {"Authorization": "Bearer schema-test-token"}
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json", timeout=10, headers=token)
    operations = [result.ok() for result in schema.get_all_operations()]
    failures: dict[str, str] = {}
    statuses: dict[str, set[int]] = {}
    sent = 0
    with requests.Session() as session:
        for operation in operations:
            seen = statuses.setdefault(f"{operation.method.upper()} {operation.path}", set())
            sent += exercise(operation, GenerationMode.POSITIVE, 8, base, session, failures, seen)
    report = "\n\n".join(f"{key}:\n{text}" for key, text in sorted(failures.items()))
    assert not failures, f"{len(failures)} operations failed:\n\n{report}"
    path_of = {key: key.split(" ", 1)[1] for key in statuses}
    guarded = {key: seen for key, seen in statuses.items() if path_of[key] not in OPEN_PATHS | DESCRIBING}
    assert guarded and all(seen == {401} for seen in guarded.values()), guarded
    assert all(401 not in seen for key, seen in statuses.items() if path_of[key] in OPEN_PATHS), statuses
    print(f"{sent} requests without a token over {len(operations)} operations")
    assert "Traceback" not in server.log()
