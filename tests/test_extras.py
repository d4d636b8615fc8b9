"""The extras say what they hold and write each pin once: `serve` and `gpu` share `serve-common` (an
extra naming convserve itself, which pip resolves to this project) and differ only in ONNX Runtime's
build. tests/test_coinstall.py installs them for real."""

from __future__ import annotations

import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

EXTRAS: dict[str, list[str]] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
    "optional-dependencies"
]


def parts(extra: str) -> list[str]:
    """The extra and every extra it pulls in through `convserve[...]`, depth first."""
    found = [extra]
    for line in EXTRAS[extra]:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) == "convserve":
            for inner in sorted(requirement.extras):
                assert inner in EXTRAS, f"{extra} names convserve[{inner}], which is no extra"
                found += [name for name in parts(inner) if name not in found]
    return found


def expanded(extra: str) -> dict[str, str]:
    """Package -> its requirement, over the extra and those it pulls in; a package pinned twice fails."""
    pins: dict[str, str] = {}
    for part in parts(extra):
        for line in EXTRAS[part]:
            requirement = Requirement(line)
            name = canonicalize_name(requirement.name)
            if name == "convserve":
                continue
            assert name not in pins, f"{name} is pinned twice in {extra}: {pins[name]!r} and {line!r}"
            pins[name] = str(requirement)
    return pins


def test_serve_and_gpu_differ_only_in_onnx_runtime() -> None:
    serve, gpu = expanded("serve"), expanded("gpu")
    assert serve.pop("onnxruntime").startswith("onnxruntime>=")
    assert gpu.pop("onnxruntime-gpu").startswith("onnxruntime-gpu>=")
    assert serve == gpu
    assert {"grpcio", "protobuf", "pillow", "pydantic-settings", "starlette", "uvicorn"} <= set(serve)


def test_serve_and_gpu_write_no_pin_of_their_own_but_onnx_runtime() -> None:
    for extra, runtime in (("serve", "onnxruntime"), ("gpu", "onnxruntime-gpu")):
        own = {canonicalize_name(Requirement(line).name) for line in EXTRAS[extra]}
        assert own == {"convserve", runtime}, extra


def test_the_client_extra_is_grpc_and_protobuf_alone_and_the_server_s_are_its_pins() -> None:
    client = expanded("client")
    assert set(client) == {"grpcio", "protobuf"}
    for name, pin in client.items():
        assert expanded("serve")[name] == pin
    assert not {"onnxruntime", "pillow", "torch"} & set(client)
