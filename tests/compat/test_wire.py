"""protoserve's Open Inference Protocol proto against tritonclient's own, field by field.

Both sides are read as descriptors: ours from the descriptor set `nox -s protos`
generates (gen/), theirs from the modules tritonclient ships. Whatever has the
same full name must mean the same bytes on the wire: field names, numbers,
types, labels and message types, enum values, and the methods' types.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2, service_pb2

from tests.compat._processes import ROOT

DESCRIPTOR_SET = ROOT / "gen" / "protoserve" / "oip" / "v2" / "descriptor_set.binpb"
SERVICE = "GRPCInferenceService"
#: Triton's model configuration is large; ours carries the subset perf_analyzer reads.
CONFIG_SUBSET = {
    ".inference.ModelConfig",
    ".inference.ModelInput",
    ".inference.ModelOutput",
    ".inference.ModelDynamicBatching",
    ".inference.ModelTransactionPolicy",
    ".inference.ModelInstanceGroup",
}
Messages = dict[str, descriptor_pb2.DescriptorProto]


def _ours() -> descriptor_pb2.FileDescriptorProto:
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes()).file
    [ours] = [f for f in files if f.name == "protoserve/oip/v2/grpc_service.proto"]
    return ours


def _theirs() -> list[descriptor_pb2.FileDescriptorProto]:
    out = []
    for module in (service_pb2, model_config_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        out.append(proto)
    return out


def _walk(
    prefix: str, messages: list[descriptor_pb2.DescriptorProto]
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    for message in messages:
        name = f"{prefix}.{message.name}"
        yield name, message
        yield from _walk(name, list(message.nested_type))


def _messages(files: list[descriptor_pb2.FileDescriptorProto]) -> Messages:
    return {
        name: message
        for f in files
        for name, message in _walk(f".{f.package}", list(f.message_type))
    }


def _enums(files: list[descriptor_pb2.FileDescriptorProto]) -> dict[str, dict[str, int]]:
    return {
        f".{f.package}.{e.name}": {v.name: v.number for v in e.value}
        for f in files
        for e in f.enum_type
    }


OURS = _ours()
OUR_MESSAGES = _messages([OURS])
THEIR_MESSAGES = _messages(_theirs())


def _field(
    field: descriptor_pb2.FieldDescriptorProto, message: descriptor_pb2.DescriptorProto
) -> dict[str, object]:
    """What decides a field's bytes on the wire and its meaning, in words a failure can show."""
    oneof = message.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None
    return {
        "name": field.name,
        "type": descriptor_pb2.FieldDescriptorProto.Type.Name(field.type),
        "label": descriptor_pb2.FieldDescriptorProto.Label.Name(field.label),
        "type_name": field.type_name,
        "oneof": oneof,
    }


def test_the_file_is_the_protocols_package() -> None:
    assert OURS.package == "inference"
    assert OURS.syntax == "proto3"


@pytest.mark.parametrize("name", sorted(OUR_MESSAGES))
def test_message_matches_tritonclients(name: str) -> None:
    ours = OUR_MESSAGES[name]
    assert name in THEIR_MESSAGES, f"tritonclient has no message {name}"
    theirs = THEIR_MESSAGES[name]
    assert ours.options.map_entry == theirs.options.map_entry
    their_fields = {f.number: f for f in theirs.field}
    for field in ours.field:
        assert field.number in their_fields, f"{name}: tritonclient has no field {field.number}"
        assert _field(field, ours) == _field(their_fields[field.number], theirs), (
            f"{name} field {field.number}"
        )
    missing = sorted(f.name for f in theirs.field if f.number not in {g.number for g in ours.field})
    if name not in CONFIG_SUBSET:
        # A field we lacked would be dropped unread when a Triton client sends it.
        assert not missing, f"{name} lacks tritonclient's fields {missing}"


def test_enums_match_tritonclients() -> None:
    ours, theirs = _enums([OURS]), _enums(_theirs())
    assert ours, "the proto defines no enum (DataType)"
    for name, values in ours.items():
        assert name in theirs, f"tritonclient has no enum {name}"
        assert values == {k: theirs[name][k] for k in values if k in theirs[name]}, name
        assert set(values) <= set(theirs[name]), f"{name}: {set(values) - set(theirs[name])}"


def test_service_methods_match_tritonclients() -> None:
    [ours] = [s for s in OURS.service if s.name == SERVICE]
    [theirs] = [s for f in _theirs() for s in f.service if s.name == SERVICE]
    their_methods = {m.name: m for m in theirs.method}
    for method in ours.method:
        assert method.name in their_methods, f"tritonclient has no method {method.name}"
        other = their_methods[method.name]
        shape = lambda m: (m.input_type, m.output_type, m.client_streaming, m.server_streaming)  # noqa: E731
        assert shape(method) == shape(other), method.name
    # Everything tritonclient's calls in these tests and perf_analyzer use.
    assert {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelConfig",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
    } <= {m.name for m in ours.method}
