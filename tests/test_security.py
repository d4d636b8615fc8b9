"""TLS, mTLS, bearer tokens and connection limits, with certificates made here and real server processes."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.convserve.v1 import convserve_pb2 as pb
from protos.convserve.v1 import convserve_pb2_grpc as pb_grpc
from protos.inference import grpc_service_pb2 as kserve
from protos.inference import grpc_service_pb2_grpc as kserve_grpc
from serving.client import ClassifierClient, Connection
from serving.config import ConfigError, ServerConfig, add_config_arguments, config_from_args
from tests.conftest import ROOT, encode
from tests.pki import Pki, make_pki

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token-4f1c9a77"
OTHER_TOKEN = "another-token-b82e10d5"


# -- certificates -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_flags(pki: Pki, mutual: bool = False) -> list[str]:
    flags = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    return [*flags, "--tls-client-ca", str(pki.ca)] if mutual else flags


def classify_stub(address: str, connection: Connection) -> tuple[grpc.Channel, pb_grpc.ClassifierStub]:
    channel = connection.channel(address)
    return channel, pb_grpc.ClassifierStub(channel)


def classify_call(address: str, connection: Connection, images: list[bytes]) -> pb.ClassifyResponse:
    """One Classify call, no wait_for_ready: a refused connection fails at once, not at the deadline."""
    channel, stub = classify_stub(address, connection)
    with channel:
        return stub.Classify(pb.ClassifyRequest(images=[pb.Image(encoded=i) for i in images]), timeout=10)


def refused_code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


@pytest.fixture(scope="module")
def samples(digit_samples) -> tuple[list[bytes], list[int]]:
    images, labels = digit_samples
    return [encode(p) for p in images[:16]], [int(x) for x in labels[:16]]


def assert_classified(response: pb.ClassifyResponse, labels: list[int]) -> None:
    assert len(response.results) == len(labels)
    predicted = [r.class_index[0] for r in response.results]
    assert sum(p == y for p, y in zip(predicted, labels, strict=True)) >= len(labels) - 2


# -- TLS and mTLS ---------------------------------------------------------------------------------


def test_tls_serves_a_client_trusting_its_ca_and_refuses_plaintext_and_a_wrong_ca(
    model_repo, server_factory, pki, samples
) -> None:
    server = server_factory(model_repo, *tls_flags(pki))
    images, labels = samples
    assert_classified(classify_call(server.address, Connection(tls_ca=pki.ca), images), labels)
    with ClassifierClient(server.address, connection=Connection(tls_ca=pki.ca), timeout=10) as client:
        assert client.health() == "SERVING"
        assert client.classify(images[:2])[0].ok
    plaintext = refused_code(lambda: classify_call(server.address, Connection(), images))
    wrong_ca = refused_code(lambda: classify_call(server.address, Connection(tls_ca=pki.other_ca), images))
    assert plaintext == wrong_ca == grpc.StatusCode.UNAVAILABLE
    assert "Traceback" not in server.log()


def test_mtls_needs_a_client_certificate_its_ca_signed(model_repo, server_factory, pki, samples) -> None:
    server = server_factory(model_repo, *tls_flags(pki, mutual=True))
    images, labels = samples
    good = Connection(tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
    assert_classified(classify_call(server.address, good, images), labels)
    no_certificate = Connection(tls_ca=pki.ca)
    stranger = Connection(tls_ca=pki.ca, tls_cert=pki.other_client_cert, tls_key=pki.other_client_key)
    for refused in (no_certificate, stranger, Connection()):
        assert refused_code(lambda c=refused: classify_call(server.address, c, images)) == (
            grpc.StatusCode.UNAVAILABLE
        )
    assert "Traceback" not in server.log()


# -- tokens ---------------------------------------------------------------------------------------


def token_file(folder: Path, *tokens: str) -> Path:
    path = folder / "tokens"
    path.write_text("# accepted tokens\n\n" + "".join(f"{t}\n" for t in tokens))
    return path


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_tokens_missing_wrong_and_right_on_every_service_with_health_open(
    model_repo, server_factory, tmp_path, samples
) -> None:
    tokens = token_file(tmp_path, TOKEN, OTHER_TOKEN)
    server = server_factory(model_repo, "--auth-token-file", str(tokens))
    images, labels = samples
    request = pb.ClassifyRequest(images=[pb.Image(encoded=i) for i in images])
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        inference = kserve_grpc.GRPCInferenceServiceStub(channel)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        list_services = reflection_pb2.ServerReflectionRequest(list_services="")
        calls: dict[str, Callable[[tuple], object]] = {
            "Classify": lambda md: stub.Classify(request, timeout=10, metadata=md),
            "ClassifyStream": lambda md: list(stub.ClassifyStream(iter([request]), timeout=10, metadata=md)),
            "ListModels": lambda md: stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=md),
            "ServerLive": lambda md: inference.ServerLive(
                kserve.ServerLiveRequest(), timeout=10, metadata=md
            ),
            "ServerReady": lambda md: inference.ServerReady(
                kserve.ServerReadyRequest(), timeout=10, metadata=md
            ),
            "reflection": lambda md: list(
                reflection.ServerReflectionInfo(iter([list_services]), timeout=10, metadata=md)
            ),
        }
        for name, call in calls.items():
            assert refused_code(lambda c=call: c(())) == grpc.StatusCode.UNAUTHENTICATED, name
            assert refused_code(lambda c=call: c(bearer("not-" + TOKEN))) == grpc.StatusCode.PERMISSION_DENIED
            assert refused_code(lambda c=call: c((("authorization", "Basic " + TOKEN),))) == (
                grpc.StatusCode.UNAUTHENTICATED
            ), name
            call(bearer(TOKEN))  # right: OK
            call(bearer(OTHER_TOKEN))  # every token in the file is accepted
        assert_classified(stub.Classify(request, timeout=10, metadata=bearer(TOKEN)), labels)
        answer = list(
            reflection.ServerReflectionInfo(iter([list_services]), timeout=10, metadata=bearer(TOKEN))
        )
        listed = {s.name for s in answer[0].list_services_response.service}
        assert "convserve.v1.Classifier" in listed and "convserve.v1.Bench" not in listed
        # Health stays open for probes, without a token.
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        # The benchmark-only service is not there unless asked for.
        echo = channel.unary_unary("/convserve.v1.Bench/Echo")
        assert refused_code(lambda: echo(b"", timeout=10, metadata=bearer(TOKEN))) == (
            grpc.StatusCode.UNIMPLEMENTED
        )
    # Our channels send the token on every kind of call: unary and streams, sync and asyncio.
    connection = Connection(token_file=tokens)
    with connection.channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        assert len(list(stub.ClassifyStream(iter([request, request]), timeout=10))) == 2
        assert stub.ListModels(pb.ListModelsRequest(), timeout=10).models

    async def over_asyncio() -> None:
        async with connection.aio_channel(server.address) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            assert len((await stub.Classify(request, timeout=10)).results) == len(images)
            call = stub.ClassifyStream()
            await call.write(request)
            assert len((await call.read()).results) == len(images)
            await call.done_writing()
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            async for answer in reflection.ServerReflectionInfo(iter([list_services]), timeout=10):
                assert answer.list_services_response.service

    asyncio.run(over_asyncio())
    log = server.log()
    assert TOKEN not in log and OTHER_TOKEN not in log and "not-" not in log
    assert "refused a call" in log and "Traceback" not in log


def test_token_file_parsing_and_the_bearer_header(tmp_path) -> None:
    from serving.protocols.auth import TokenFile, bearer_token, token_bytes

    assert token_bytes("# comment\n\n  alpha  \nbeta\n#gamma\n") == (b"alpha", b"beta")
    assert bearer_token((("x-other", "1"), ("authorization", "Bearer  abc "))) == b"abc"
    assert bearer_token((("authorization", "bearer abc"),)) == b"abc"  # the scheme is case-insensitive
    for missing in ((), (("authorization", "Basic abc"),), (("authorization", "Bearer "),), None):
        assert bearer_token(missing) is None
    path = tmp_path / "tokens"
    path.write_text("alpha\nbeta\n")
    tokens = TokenFile(path)
    assert tokens.accepts(b"alpha") and tokens.accepts(b"beta")
    assert not tokens.accepts(b"alph") and not tokens.accepts(b"alphaa") and not tokens.accepts(b"")
    path.write_text("# none\n")
    with pytest.raises(ValueError, match="holds no token"):
        TokenFile(path)


def eventually(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Whether `predicate` holds within `timeout` (the server looks at the token file once a second)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_a_changed_token_file_is_read_again_without_a_restart(model_repo, server_factory, tmp_path) -> None:
    tokens = token_file(tmp_path, TOKEN)
    server = server_factory(model_repo, "--auth-token-file", str(tokens))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)

        def status(token: str) -> grpc.StatusCode:
            try:
                stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=bearer(token))
            except grpc.RpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        assert (
            status(TOKEN) == grpc.StatusCode.OK and status(OTHER_TOKEN) == grpc.StatusCode.PERMISSION_DENIED
        )
        # Rotate as docs/guides/security.md says: write a new file beside it, then rename it over the old one.
        staged = tmp_path / "tokens.new"
        staged.write_text(f"{OTHER_TOKEN}\n")
        staged.replace(tokens)
        assert eventually(lambda: status(OTHER_TOKEN) == grpc.StatusCode.OK)
        assert status(TOKEN) == grpc.StatusCode.PERMISSION_DENIED
        # An emptied file keeps the tokens read before, with a warning.
        tokens.write_text("# nothing here\n")
        # (The file is looked at on the request path: each look is a call, accepted all along.)
        warned = "holds no token: keeping the 1 token(s)"
        assert eventually(lambda: status(OTHER_TOKEN) == grpc.StatusCode.OK and warned in server.log())
        tokens.unlink()
        assert eventually(
            lambda: status(OTHER_TOKEN) == grpc.StatusCode.OK and "cannot be read" in server.log()
        )
    log = server.log()
    assert TOKEN not in log and OTHER_TOKEN not in log and "Traceback" not in log
    assert log.count("holds no token") == 1, "one warning per change, not one per look"


def test_classify_and_health_commands_with_tls_and_a_token(
    model_repo, server_factory, tmp_path, pki, samples
) -> None:
    tokens = token_file(tmp_path, TOKEN)
    server = server_factory(model_repo, *tls_flags(pki), "--auth-token-file", str(tokens))
    images, labels = samples
    paths = []
    for i, data in enumerate(images[:3]):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(data)
    command = [sys.executable, "-m", "serving", "classify", *map(str, paths), "--server", server.address]
    command += ["--top-k", "1", "--json", "--tls-ca", str(pki.ca)]
    done = subprocess.run([*command, "--token-file", str(tokens)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert [r["top_k"][0]["index"] for r in answer] == labels[:3]
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    health = [sys.executable, "-m", "serving", "health", "--server", server.address, "--tls-ca", str(pki.ca)]
    done = subprocess.run(health, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "SERVING", done.stderr
    plaintext = subprocess.run(health[:6], cwd=ROOT, capture_output=True, text=True)
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr
    assert TOKEN not in server.log()


# -- config ---------------------------------------------------------------------------------------


def parse(*flags: str) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(list(flags)))


def test_security_settings_are_checked_before_anything_starts(model_repo, pki, tmp_path) -> None:
    empty = tmp_path / "empty-tokens"
    empty.write_text("# no token yet\n\n")
    cert, key = ["--tls-cert", str(pki.server_cert)], ["--tls-key", str(pki.server_key)]
    bad = {
        "--tls-cert and --tls-key go together": cert,
        "--tls-client-ca (mTLS) needs --tls-cert": ["--tls-client-ca", str(pki.ca)],
        "--tls-key: /nonexistent.key is not a readable file": [*cert, "--tls-key", "/nonexistent.key"],
        "are not a PEM certificate and its key": [*cert, "--tls-key", str(pki.client_key)],
        "--tls-client-ca: ": [*cert, *key, "--tls-client-ca", str(empty)],
        "holds no token": ["--auth-token-file", str(empty)],
    }
    for message, flags in bad.items():
        with pytest.raises(ConfigError) as info:
            parse("--models", str(model_repo), *flags)
        assert message in str(info.value) and "\n" not in str(info.value), (message, str(info.value))
    parse("--models", str(model_repo), *cert, *key, "--tls-client-ca", str(pki.ca))
    command = [sys.executable, "-m", "serving", "serve", "--models", str(model_repo), "--port", "0", *cert]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "--tls-cert and --tls-key go together" in line and "listening" not in done.stdout


# -- connection limits ----------------------------------------------------------------------------


def test_connection_limits_become_grpc_options(model_repo) -> None:
    from serving.server import grpc_options

    config = ServerConfig(
        models=model_repo,
        keepalive_time_s=30,
        keepalive_timeout_s=5,
        keepalive_min_ping_interval_s=7,
        keepalive_permit_without_calls=False,
        max_concurrent_streams=9,
    )
    options = dict(grpc_options(config))
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == 5_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 7_000
    assert options["grpc.keepalive_permit_without_calls"] == 0
    assert options["grpc.max_concurrent_streams"] == 9


def test_a_connection_carries_at_most_max_concurrent_streams_calls(
    model_repo, server_factory, samples
) -> None:
    """Two streams open on one connection with --max-concurrent-streams 2: a third call waits in the
    client until one of them ends, then is served."""
    server = server_factory(model_repo, "--max-concurrent-streams", "2")
    image = pb.Image(encoded=samples[0][0])
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        gates = [threading.Event(), threading.Event()]

        def held_open(gate: threading.Event):
            yield pb.ClassifyRequest(id="first", images=[image])
            gate.wait(30)

        streams = [stub.ClassifyStream(held_open(g), timeout=60) for g in gates]
        for stream in streams:
            assert next(stream).id == "first"  # both streams are open and answering
        third = stub.Classify.future(pb.ClassifyRequest(images=[image]), timeout=60)
        with pytest.raises(grpc.FutureTimeoutError):
            third.result(timeout=1.0)  # not served while two streams hold the connection's slots
        gates[0].set()
        assert list(streams[0]) == []
        assert len(third.result(timeout=30).results) == 1
        gates[1].set()
        assert list(streams[1]) == []


def test_a_client_pinging_too_often_is_sent_away(model_repo, server_factory) -> None:
    """A client pinging every 100 ms: a server with --keepalive-min-ping-interval-s 30 sends it GOAWAY
    (too_many_pings) and its channel leaves READY; one allowing a ping every 50 ms keeps it."""
    strict = server_factory(model_repo, "--keepalive-min-ping-interval-s", "30")
    lenient = server_factory(model_repo, "--keepalive-min-ping-interval-s", "0.05")
    options = [
        ("grpc.keepalive_time_ms", 100),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    states: dict[str, list[grpc.ChannelConnectivity]] = {"strict": [], "lenient": []}
    with (
        grpc.insecure_channel(strict.address, options) as to_strict,
        grpc.insecure_channel(lenient.address, options) as to_lenient,
    ):
        for name, channel in (("strict", to_strict), ("lenient", to_lenient)):
            channel.subscribe(states[name].append, try_to_connect=True)
            grpc.channel_ready_future(channel).result(timeout=10)
        assert eventually(lambda: states["strict"][-1] != grpc.ChannelConnectivity.READY)
        time.sleep(0.5)  # pings the lenient server would count as strikes, were it strict
        assert states["lenient"][-1] == grpc.ChannelConnectivity.READY
        assert states["lenient"].count(grpc.ChannelConnectivity.READY) == 1
        for name, channel in (("strict", to_strict), ("lenient", to_lenient)):
            channel.unsubscribe(states[name].append)
    assert "Traceback" not in strict.log() + lenient.log()
