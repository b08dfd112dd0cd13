"""Server reflection sends protoserve's proto comments, and every import as before.

Clients here are the ones people use: grpcio-reflection's own
``ProtoReflectionDescriptorDatabase`` (which the gateway's ``--from-reflection``
uses), raw ``ServerReflectionInfo`` requests, and the gateway itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from importlib.resources import files

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.server import reflection
from tests._threads import start_grpc_server, stop_grpc_server

OURS = pb.DESCRIPTOR.name  # protoserve/inference/v1/inference_service.proto
SERVICE = "protoserve.inference.v1.InferenceService"
#: Source paths (descriptor.proto field numbers): service 0, and its method Generate.
SERVICE_PATH = (6, 0)
GENERATE_PATH = (
    6,
    0,
    2,
    [m.name for m in pb.DESCRIPTOR.services_by_name["InferenceService"].methods].index("Generate"),
)


def shipped() -> descriptor_pb2.FileDescriptorProto:
    data = (files("protoserve.inference.v1") / "descriptor_set.binpb").read_bytes()
    (proto,) = [f for f in descriptor_pb2.FileDescriptorSet.FromString(data).file if f.name == OURS]
    return proto


def compiled(name: str) -> descriptor_pb2.FileDescriptorProto:
    """The file as the default pool has it (and plain grpcio-reflection sends it)."""
    proto = descriptor_pb2.FileDescriptorProto()
    descriptor_pool.Default().FindFileByName(name).CopyToProto(proto)
    return proto


def closure(name: str) -> set[str]:
    """``name`` and every file it imports, transitively, per the default pool."""
    seen: set[str] = set()
    todo = [descriptor_pool.Default().FindFileByName(name)]
    while todo:
        file = todo.pop()
        if file.name not in seen:
            seen.add(file.name)
            todo.extend(file.dependencies)
    return seen


def comment(proto: descriptor_pb2.FileDescriptorProto, path: tuple[int, ...]) -> str:
    for location in proto.source_code_info.location:
        if tuple(location.path) == path:
            return location.leading_comments.strip()
    return ""


def ask(
    target: str, *requests: reflection_pb2.ServerReflectionRequest
) -> list[reflection_pb2.ServerReflectionResponse]:
    """One ServerReflectionInfo stream carrying ``requests``; its responses, in order."""
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        return list(stub.ServerReflectionInfo(iter(requests), timeout=10))


def files_in(
    response: reflection_pb2.ServerReflectionResponse,
) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    parsed = [
        descriptor_pb2.FileDescriptorProto.FromString(data)
        for data in response.file_descriptor_response.file_descriptor_proto
    ]
    return {proto.name: proto for proto in parsed}


def serve() -> Iterator[str]:
    thread, server = start_grpc_server(["bytelm"])
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        stop_grpc_server(thread, server)


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    yield from serve()


# --- what a reflection client gets ---------------------------------------------------------


def test_our_file_comes_with_its_comments(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        proto = ProtoReflectionDescriptorDatabase(channel).FindFileByName(OURS)
    assert proto == shipped()
    assert comment(proto, SERVICE_PATH).startswith("InferenceService serves")
    assert comment(proto, GENERATE_PATH).startswith("Generate continues a text")


def test_imports_are_the_default_pools_and_the_closure_loads(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName(SERVICE)
        # Loading the service loaded every file it imports, through reflection.
        for name in closure(OURS):
            loaded = descriptor_pb2.FileDescriptorProto()
            pool.FindFileByName(name).CopyToProto(loaded)
            assert loaded.name == name
        # The imports are sent as compiled into the default pool.
        for name in closure(OURS) - {OURS}:
            assert database.FindFileByName(name) == compiled(name)
    assert {"google/api/annotations.proto", "google/protobuf/struct.proto"} <= closure(OURS)
    generate = service.methods_by_name["Generate"]
    assert generate.input_type.full_name == "protoserve.inference.v1.GenerateRequest"


def test_file_containing_symbol_sends_the_whole_closure(target: str) -> None:
    (ours,) = ask(target, reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE))
    sent = files_in(ours)
    assert set(sent) == closure(OURS)
    assert sent[OURS] == shipped()
    assert all(sent[name] == compiled(name) for name in sent if name != OURS)

    (health,) = ask(
        target,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"),
    )
    assert set(files_in(health)) == closure(health_pb2.DESCRIPTOR.name)


def test_list_services_extensions_and_not_found(target: str) -> None:
    http_rule = 72295728  # google.api.http, on google.protobuf.MethodOptions
    listed, extension, numbers, unknown_symbol, unknown_file = ask(
        target,
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(
            file_containing_extension=reflection_pb2.ExtensionRequest(
                containing_type="google.protobuf.MethodOptions", extension_number=http_rule
            )
        ),
        reflection_pb2.ServerReflectionRequest(
            all_extension_numbers_of_type="google.protobuf.MethodOptions"
        ),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Service"),
        reflection_pb2.ServerReflectionRequest(file_by_filename="no/such.proto"),
    )
    assert [s.name for s in listed.list_services_response.service] == sorted(
        [
            SERVICE,
            "inference.GRPCInferenceService",
            "protoserve.openai.v1.OpenAIService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
    )
    assert "google/api/annotations.proto" in files_in(extension)
    assert http_rule in numbers.all_extension_numbers_response.extension_number
    for response in (unknown_symbol, unknown_file):
        assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_gateway_from_reflection_gets_the_comments(target: str) -> None:
    from protoserve.gateway import from_compiled, from_reflection

    descriptors = from_reflection(target)
    assert descriptors.comments["protoserve.inference.v1.InferenceService.Generate"].startswith(
        "Generate continues a text"
    )
    # The same comments the gateway shows when it serves the compiled-in stubs.
    assert descriptors.comments == from_compiled().comments


# --- without a usable descriptor set: plain reflection, as before ----------------------------


def _missing() -> bytes:
    raise FileNotFoundError("descriptor_set.binpb")


def _garbage() -> bytes:
    return b"\xff\xff\xff not a descriptor set"


def _stale() -> bytes:
    # A descriptor set from another version of the proto: one field renamed.
    proto = shipped()
    proto.message_type[0].field[0].name = "renamed"
    proto.message_type[0].field[0].json_name = "renamed"
    return descriptor_pb2.FileDescriptorSet(file=[proto]).SerializeToString()


@pytest.mark.parametrize(
    ("read", "logged"),
    [
        (_missing, "no readable descriptor set"),
        (_garbage, "no readable descriptor set"),
        (_stale, "disagrees with the compiled"),
    ],
    ids=["missing", "garbage", "stale"],
)
def test_falls_back_to_the_compiled_descriptors(
    read: Callable[[], bytes],
    logged: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(reflection, "_read_descriptor_set", read)
    caplog.set_level(logging.DEBUG, logger=reflection.__name__)
    for target in serve():
        (response,) = ask(target, reflection_pb2.ServerReflectionRequest(file_by_filename=OURS))
        sent = files_in(response)
        assert set(sent) == closure(OURS)
        assert all(sent[name] == compiled(name) for name in sent)
        assert not sent[OURS].HasField("source_code_info")
    assert any(logged in record.getMessage() for record in caplog.records)
