"""The committed stubs must be exactly what the generator makes from the .proto sources."""

from __future__ import annotations

from pathlib import Path

from protos.generate import ROOT, generate


def test_committed_stubs_match_the_proto_sources(tmp_path: Path) -> None:
    generated = generate(tmp_path)
    assert generated, "the generator produced nothing"
    for path in generated:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is not committed: run `make protos`"
        assert committed.read_text() == path.read_text(), (
            f"{committed} drifted from its .proto: run `make protos`"
        )


def test_inference_protos_are_the_pinned_tritonclient_release() -> None:
    """protos/inference/README.md says which Triton release the files come from: the one whose
    tritonclient is pinned. Byte-identical descriptors are also what lets both load in one process."""
    from tritonclient.grpc import model_config_pb2 as their_config
    from tritonclient.grpc import service_pb2 as their_service

    from protos.inference import grpc_service_pb2, model_config_pb2

    assert grpc_service_pb2.DESCRIPTOR.serialized_pb == their_service.DESCRIPTOR.serialized_pb
    assert model_config_pb2.DESCRIPTOR.serialized_pb == their_config.DESCRIPTOR.serialized_pb
