"""Bad input never makes the server fail (issue 16, item 7), and what it exposes is a choice
(item 4): broken ``model.toml`` files, a vanished repository, very long names, Health
``List``, and ``--no-reflection``, each against a real server on a real port.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protoserve.inference.v1 import inference_service_pb2 as v1
from protoserve.inference.v1 import inference_service_pb2_grpc as v1_grpc
from protoserve.oip.v2 import grpc_service_pb2 as pb
from protoserve.oip.v2 import grpc_service_pb2_grpc as pb_grpc
from protoserve.server.config import add_arguments, from_arguments
from tests._threads import start_grpc_server, stop_grpc_server
from tests.e2e.conftest import start_server
from tests.server.conftest import Running
from tests.server.test_repository import MODELS, code, details, error, model_folder, serving

SERVING = health_pb2.HealthCheckResponse.SERVING
#: Not UTF-8: "café" saved as Latin-1.
LATIN_1 = 'source = "bytelm"\n# caf\xe9\n'.encode("latin-1")


def broken_repository(root: Path) -> None:
    """A good model, one whose model.toml is Latin-1, one that is not TOML, and a folder
    whose very name is not UTF-8."""
    model_folder(root, "good", f'source = "{MODELS}:Doubler"\n')
    (model_folder(root, "latin", "") / "model.toml").write_bytes(LATIN_1)
    model_folder(root, "nottoml", 'source = "bytelm\n')
    odd = root / os.fsdecode(b"caf\xe9")
    odd.mkdir()
    (odd / "model.toml").write_text('source = "bytelm"\n')
    (odd / "1").mkdir()


def status_details(err: grpc.RpcError) -> status_pb2.Status:
    """The ``google.rpc.Status`` of the error's details trailer."""
    trailers = dict(err.trailing_metadata() or ())  # type: ignore[attr-defined]
    return status_pb2.Status.FromString(trailers["grpc-status-details-bin"])


# A broken model.toml is one broken model.
def test_a_model_toml_not_utf8_or_not_toml_is_one_broken_model(tmp_path: Path) -> None:
    broken_repository(tmp_path)
    with serving(tmp_path) as s:
        index = s.index()
        assert index[("good", "1")] == ("READY", "")
        state, reason = index[("latin", "")]
        assert (state, reason) == (
            "UNAVAILABLE",
            "model.toml is not UTF-8 text (byte 0xe9 at offset 23)",
        )
        assert index[("nottoml", "")][1].startswith("model.toml is not valid TOML")
        assert index[("caf\\xe9", "")][0] == "UNAVAILABLE"
        # Loads of the others, and of the broken one itself, answer as loads do.
        s.load("good")
        err = error(s.load, "latin")
        assert (code(err), "not UTF-8" in details(err)) == (grpc.StatusCode.INVALID_ARGUMENT, True)
        assert s.predict("good", [1]) == [2]
        assert s.index()[("good", "1")] == ("READY", "")


def test_serve_starts_beside_a_model_toml_that_is_not_utf8(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    repository.mkdir()
    broken_repository(repository)
    server = start_server(tmp_path, "--model-repository", str(repository))
    try:
        with grpc.insecure_channel(server.target) as channel:
            oip = pb_grpc.GRPCInferenceServiceStub(channel)
            index = oip.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
            rows = {(m.name, m.version): m.state for m in index.models}
            assert rows[("good", "1")] == "READY"
            assert rows[("latin", "")] == "UNAVAILABLE"
    finally:
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0, server.output()


# Clients never see server paths.
def test_a_vanished_repository_is_unavailable_and_its_path_is_not_told(tmp_path: Path) -> None:
    root = tmp_path / "repository"
    root.mkdir()
    model_folder(root, "good", f'source = "{MODELS}:Doubler"\n')
    with serving(root) as s:
        root.rename(tmp_path / "elsewhere")
        for call in (s.load, s.unload):
            err = error(call, "other")
            assert code(err) == grpc.StatusCode.UNAVAILABLE, details(err)
            assert str(tmp_path) not in details(err)
            assert "cannot read the model repository" in details(err)
            assert str(tmp_path) not in str(status_details(err))
        assert s.index()[("good", "1")] == ("READY", "")  # still answers
        assert s.predict("good", [1]) == [2]


def test_a_load_error_naming_a_file_does_not_tell_where_it_is(tmp_path: Path) -> None:
    model_folder(tmp_path, "files", 'source = "model.pt2"\n', files={1: {"model.pt2": b"junk"}})
    with serving(tmp_path) as s:
        index = s.index()
        _state, reason = index[("files", "1")]
        err = error(s.load, "files")
        assert code(err) == grpc.StatusCode.UNAVAILABLE
        for text in (reason, details(err), str(status_details(err))):
            assert str(tmp_path) not in text


# Echoed names are bounded.
@pytest.mark.parametrize("length", [4_500, 20_000])
def test_a_very_long_model_name_gets_not_found_with_the_name_bounded(
    running: Running, length: int
) -> None:
    name = "x" * length
    oip = pb_grpc.GRPCInferenceServiceStub(running.channel)
    calls = [
        (running.stub.GetModel, v1.GetModelRequest(name=name)),
        (oip.ModelMetadata, pb.ModelMetadataRequest(name=name)),
        (oip.ModelMetadata, pb.ModelMetadataRequest(name="bytelm", version=name)),
    ]
    for call, request in calls:
        err = error(call, request)
        # Not RESOURCE_EXHAUSTED: the trailers fit the client's metadata limit.
        assert code(err) == grpc.StatusCode.NOT_FOUND, details(err)[:200]
        assert "x" * 128 + "…" in details(err)
        assert "x" * 129 not in details(err)
        info = error_details_pb2.ResourceInfo()
        assert status_details(err).details[0].Unpack(info)
        assert len(info.resource_name) <= 128 + len("bytelm/…")


# Health List.
def test_health_list_answers_every_services_status(running: Running) -> None:
    stub = health_pb2_grpc.HealthStub(running.channel)
    answer = stub.List(health_pb2.HealthListRequest(), timeout=10)
    statuses = {name: status.status for name, status in answer.statuses.items()}
    assert {"", "protoserve.inference.v1.InferenceService", "models/broken"} <= set(statuses)
    assert statuses["models/bytelm"] == SERVING
    assert statuses["models/broken"] == health_pb2.HealthCheckResponse.NOT_SERVING
    # What Check says, service by service.
    for name, status in statuses.items():
        check = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert check.status == status


# Reflection is a choice.
def reflected_services(target: str) -> list[str]:
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answer = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
        return [s.name for s in answer.list_services_response.service]


def test_no_reflection_turns_reflection_off_and_serving_goes_on() -> None:
    thread, server = start_grpc_server([f"{MODELS}:Doubler"], reflection=False)
    target = f"127.0.0.1:{server.port}"
    try:
        with pytest.raises(grpc.RpcError) as info:
            reflected_services(target)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
        with grpc.insecure_channel(target) as channel:
            stub = v1_grpc.InferenceServiceStub(channel)
            assert [m.name for m in stub.ListModels(v1.ListModelsRequest(), timeout=10).models] == [
                "doubler"
            ]
    finally:
        stop_grpc_server(thread, server)
    thread, server = start_grpc_server([f"{MODELS}:Doubler"])
    try:
        assert "grpc.health.v1.Health" in reflected_services(f"127.0.0.1:{server.port}")
    finally:
        stop_grpc_server(thread, server)


def test_reflection_is_on_by_default_and_set_by_flag_or_environment() -> None:
    def parse(argv: list[str], env: dict[str, str]) -> bool:
        parser = argparse.ArgumentParser()
        add_arguments(parser, env)
        return from_arguments(parser.parse_args(argv), env).reflection

    assert parse([], {}) is True
    assert parse(["--no-reflection"], {}) is False
    assert parse([], {"PROTOSERVE_REFLECTION": "off"}) is False
    assert parse(["--reflection"], {"PROTOSERVE_REFLECTION": "off"}) is True
