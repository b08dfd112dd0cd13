"""No input, however malformed, takes the server down or leaks a traceback."""

from __future__ import annotations

import random

import grpc
import pytest

from protoserve.inference.v1 import inference_service_pb2 as pb
from tests.server.conftest import Running

METHODS = ["ListModels", "GetModel", "Generate", "GenerateStream", "Embed", "Predict"]
SERVICE = "/protoserve.inference.v1.InferenceService/"


def garbage(seed: int) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))


@pytest.mark.parametrize("method", METHODS)
def test_random_bytes_get_a_status_and_the_server_lives(running: Running, method: str) -> None:
    streaming = method == "GenerateStream"
    make = running.channel.unary_stream if streaming else running.channel.unary_unary
    call = make(SERVICE + method)  # no serializers: raw bytes on the wire
    codes = set()
    for seed in range(40):
        try:
            result = call(garbage(seed), timeout=10)
            if streaming:
                list(result)
            codes.add(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            codes.add(err.code())
            assert "Traceback" not in (err.details() or "")
    # Unparseable bytes are INVALID_ARGUMENT; bytes that happen to parse get a normal answer.
    assert grpc.StatusCode.INVALID_ARGUMENT in codes
    assert codes <= {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
    }
    assert running.stub.GetModel(pb.GetModelRequest(name="bytelm"), timeout=10).model.name


def test_invalid_utf8_in_a_string_field_is_refused(running: Running) -> None:
    # GenerateRequest.inputs (field 2, length-delimited) holding bytes that are not UTF-8.
    raw = b"\x0a\x06bytelm" + b"\x12\x02\xff\xfe"
    call = running.channel.unary_unary(SERVICE + "Generate")
    with pytest.raises(grpc.RpcError) as info:
        call(raw, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "protoserve.inference.v1.GenerateRequest" in (info.value.details() or "")
    assert running.stub.GetModel(pb.GetModelRequest(name="bytelm"), timeout=10).model.name


def test_unknown_method_is_unimplemented(running: Running) -> None:
    with pytest.raises(grpc.RpcError) as info:
        running.channel.unary_unary(SERVICE + "Train")(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
