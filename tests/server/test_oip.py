"""The Open Inference Protocol (``inference.GRPCInferenceService``) over real gRPC.

Two servers: ``running`` (conftest: bytelm, a model that fails to load, one that
explodes) for comparisons with the v1 API on the same runtime, and ``served``
(this module: small test models, all ready, metrics on) for the tensor format.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from protoserve.inference.v1 import inference_service_pb2 as v1
from protoserve.inference.v1 import inference_service_pb2_grpc as v1_grpc
from protoserve.oip.v2 import grpc_service_pb2 as pb
from protoserve.oip.v2 import grpc_service_pb2_grpc as pb_grpc
from protoserve.server import InferenceServer
from protoserve.server.runtime.errors import FailedPrecondition
from tests._observe import wait_until
from tests._threads import start_grpc_server, stop_grpc_server
from tests.server.conftest import Running

SERVICE = "inference.GRPCInferenceService"
Tensor = pb.ModelInferRequest.InferInputTensor
Contents = pb.InferTensorContents
MODELS = (
    "tests.server.models_for_tests:EchoTensors",
    "tests.server.models_for_tests:EchoText",
    "tests.server.models_for_tests:Rows",
    "tests.server.models_for_tests:Doubler",
    "tests.server.models_for_tests:Slow",
)


@dataclass
class Served:
    server: InferenceServer
    channel: grpc.Channel
    stub: pb_grpc.GRPCInferenceServiceStub

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    # Capacity 4 per model: generations of up to 4 texts fit, a fifth is refused.
    thread, server = start_grpc_server(MODELS, max_queue=2, max_active=2, metrics_port=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield Served(server, channel, pb_grpc.GRPCInferenceServiceStub(channel))
    channel.close()
    stop_grpc_server(thread, server)


@pytest.fixture
def stub(served: Served) -> pb_grpc.GRPCInferenceServiceStub:
    return served.stub


@pytest.fixture
def oip(running: Running) -> pb_grpc.GRPCInferenceServiceStub:
    """The OIP stub of the conftest server (bytelm, broken, exploding ...)."""
    return pb_grpc.GRPCInferenceServiceStub(running.channel)


def infer(
    stub: pb_grpc.GRPCInferenceServiceStub,
    model: str,
    inputs: Sequence[Tensor],
    *,
    raw: Sequence[bytes] = (),
    outputs: Sequence[str] = (),
    parameters: dict[str, pb.InferParameter] | None = None,
    **fields: Any,
) -> pb.ModelInferResponse:
    request = pb.ModelInferRequest(
        model_name=model,
        inputs=inputs,
        raw_input_contents=raw,
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs],
        parameters=parameters or {},
        **fields,
    )
    response: pb.ModelInferResponse = stub.ModelInfer(request, timeout=60)
    return response


def error(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    """The error ``call(*args, **kwargs)`` raised."""
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def violations(err: grpc.RpcError) -> list[tuple[str, str]]:
    """The BadRequest field violations of an error's google.rpc status."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    found = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            found += [(v.field, v.description) for v in bad.field_violations]
    return found


def outputs_of(response: pb.ModelInferResponse) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (datatype, shape, raw bytes); every output travels raw."""
    assert len(response.raw_output_contents) == len(response.outputs)
    for o in response.outputs:
        assert not o.contents.ListFields()
    return {
        o.name: (o.datatype, list(o.shape), data)
        for o, data in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def frame(elements: Sequence[bytes]) -> bytes:
    """BYTES raw contents: a 4-byte little-endian length before each element."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def unframe(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def tensor(name: str, datatype: str, shape: Sequence[int], **contents: Any) -> Tensor:
    """An input; keywords are its typed contents (``fp32_contents=[...]``), none for raw."""
    return Tensor(name=name, datatype=datatype, shape=shape, contents=Contents(**contents))


def text(*elements: bytes, name: str = "text_input", shape: Sequence[int] = ()) -> Tensor:
    """A BYTES input holding ``elements`` (shape [N] unless given)."""
    return tensor(name, "BYTES", shape or [len(elements)], bytes_contents=elements)


def fp32(
    name: str = "x", shape: Sequence[int] = (3,), values: Sequence[float] = (1, 2, 3)
) -> Tensor:
    return tensor(name, "FP32", shape, fp32_contents=values)


def p(value: bool | int | float | str) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=value)


# Server-level RPCs.
def test_server_is_live_ready_and_names_itself_with_its_extensions(stub) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live is True
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready is True
    meta = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5)
    assert meta.name == "protoserve"
    assert meta.version == metadata.version("protoserve")
    assert list(meta.extensions) == ["model_repository", "model_configuration", "parameters"]


def test_a_server_with_a_failed_model_is_live_but_not_ready(oip) -> None:
    assert oip.ServerLive(pb.ServerLiveRequest(), timeout=5).live is True
    assert oip.ServerReady(pb.ServerReadyRequest(), timeout=5).ready is False
    assert oip.ModelReady(pb.ModelReadyRequest(name="broken"), timeout=5).ready is False
    assert oip.ModelReady(pb.ModelReadyRequest(name="bytelm"), timeout=5).ready is True


def test_model_ready_is_false_for_unknown_models_and_versions_not_an_error(stub) -> None:
    def ready(name: str, version: str = "") -> bool:
        request = pb.ModelReadyRequest(name=name, version=version)
        return bool(stub.ModelReady(request, timeout=5).ready)

    assert ready("doubler") and ready("doubler", "1")
    assert not ready("doubler", "2")
    assert not ready("no-such-model")
    assert not ready("")


def test_health_and_reflection_report_the_service(served: Served) -> None:
    health = health_pb2_grpc.HealthStub(served.channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    database = ProtoReflectionDescriptorDatabase(served.channel)
    assert SERVICE in database.get_services()
    file = database.FindFileContainingSymbol(SERVICE)
    assert file.package == "inference"
    methods = {m.name for s in file.service if s.name == "GRPCInferenceService" for m in s.method}
    assert {"ModelInfer", "ModelConfig", "RepositoryIndex"} <= methods


# Metadata and configuration.
def test_model_metadata_lists_every_task_of_bytelm(oip) -> None:
    meta = oip.ModelMetadata(pb.ModelMetadataRequest(name="bytelm"), timeout=5)
    assert (meta.name, list(meta.versions), meta.platform) == ("bytelm", ["1"], "pytorch")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("text_input", "BYTES", [-1]),
        ("text", "BYTES", [-1]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("text_output", "BYTES", [-1]),
        ("embedding", "FP32", [-1, -1]),
    ]


def test_model_metadata_of_a_tensor_model_is_its_declared_tensors(stub) -> None:
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="rows", version="1"), timeout=5)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("y", "FP32", [-1, 4])]


def test_unknown_model_or_version_is_not_found_for_every_model_rpc(stub) -> None:
    calls = [
        lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=5),
        lambda: stub.ModelConfig(pb.ModelConfigRequest(name="nope"), timeout=5),
        lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="rows", version="9"), timeout=5),
        lambda: infer(stub, "nope", [tensor("x", "FP32", [0])]),
        lambda: infer(stub, "rows", [], model_version="9"),
    ]
    for call in calls:
        err = error(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
        assert status is not None
        info = error_details_pb2.ResourceInfo()
        assert any(d.Unpack(info) for d in status.details)
        assert info.resource_name in ("nope", "rows/9")
    err = error(lambda: stub.ModelConfig(pb.ModelConfigRequest(name=""), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_config_of_a_multi_task_model_marks_its_inputs_optional(oip) -> None:
    config = oip.ModelConfig(pb.ModelConfigRequest(name="bytelm"), timeout=5).config
    assert (config.name, config.platform, config.backend) == ("bytelm", "pytorch", "protoserve")
    assert config.max_batch_size == 0
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input] == [
        ("text_input", pb.TYPE_STRING, [-1], True),
        ("text", pb.TYPE_STRING, [-1], True),
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("text_output", pb.TYPE_STRING, [-1]),
        ("embedding", pb.TYPE_FP32, [-1, -1]),
    ]
    # Embeddings batch (bytelm runs what is queued, with no wait); generations decode together.
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert config.HasField("model_transaction_policy")
    assert config.model_transaction_policy.decoupled is False
    # How generations decode, as GetModel's decoding says (the server's default).
    assert dict(config.parameters) == {"decoding": pb.ModelParameter(string_value="batched")}


def test_config_of_a_row_batching_model_leaves_out_the_batch_dimension(stub) -> None:
    config = stub.ModelConfig(pb.ModelConfigRequest(name="rows"), timeout=5).config
    assert config.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input] == [
        ("x", pb.TYPE_FP32, [4], False)
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("y", pb.TYPE_FP32, [4])
    ]
    assert config.dynamic_batching.max_queue_delay_microseconds == 1000
    # Doubler batches nothing: full dims, no batch size, no dynamic batching.
    config = stub.ModelConfig(pb.ModelConfigRequest(name="doubler"), timeout=5).config
    assert config.max_batch_size == 0
    assert [list(i.dims) for i in config.input] == [[-1]]
    assert config.WhichOneof("scheduling_choice") is None


CONFIG_DATATYPES = {
    pb.TYPE_BOOL: "BOOL",
    pb.TYPE_UINT8: "UINT8",
    pb.TYPE_UINT16: "UINT16",
    pb.TYPE_UINT32: "UINT32",
    pb.TYPE_UINT64: "UINT64",
    pb.TYPE_INT8: "INT8",
    pb.TYPE_INT16: "INT16",
    pb.TYPE_INT32: "INT32",
    pb.TYPE_INT64: "INT64",
    pb.TYPE_FP16: "FP16",
    pb.TYPE_FP32: "FP32",
    pb.TYPE_FP64: "FP64",
    pb.TYPE_STRING: "BYTES",
    pb.TYPE_BF16: "BF16",
}


def _perf_analyzer_request(config: pb.ModelConfig, batch: int) -> list[Tensor]:
    """The inputs perf_analyzer would send from a configuration alone: every input that
    is not optional (or, when all are, the first one, as --input-data would name),
    batch size prepended when the model batches, variable dimensions as 1."""
    chosen = [i for i in config.input if not i.optional] or list(config.input[:1])
    tensors = []
    for spec in chosen:
        shape = [d if d > 0 else 1 for d in spec.dims]
        if config.max_batch_size > 0:
            shape = [batch, *shape]
        count = math.prod(shape)
        datatype = CONFIG_DATATYPES[spec.data_type]
        contents = (
            Contents(bytes_contents=[b"x"] * count)
            if datatype == "BYTES"
            else Contents(fp32_contents=[0.5] * count)
        )
        tensors.append(Tensor(name=spec.name, datatype=datatype, shape=shape, contents=contents))
    return tensors


#: Each server's models.
MODELS_OF = {
    "served": ["echo-tensors", "echo-text", "rows", "doubler", "slow"],
    "running": ["bytelm", "doubler", "scripted", "exploding", "broken"],
}
#: The outputs a request built from a model's configuration alone gets: those of the
#: task its inputs pick. Not asked: echo-tensors declares no tensors to build one from,
#: exploding fails on purpose, broken never loaded.
OUTPUTS_BY_CONFIG = {
    "served": {
        "echo-text": ["text_output"],
        "rows": ["y"],
        "doubler": ["y"],
        "slow": ["text_output"],
    },
    "running": {"bytelm": ["text_output"], "doubler": ["y"], "scripted": ["text_output"]},
}


@pytest.mark.parametrize("server", ["served", "running"])
def test_config_agrees_with_metadata_and_its_requests_are_served(
    server: str, request: pytest.FixtureRequest
) -> None:
    stub = request.getfixturevalue("stub" if server == "served" else "oip")
    for name in MODELS_OF[server]:
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=5)
        config = stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=5).config
        batch = [-1] if config.max_batch_size > 0 else []
        assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [
            (i.name, CONFIG_DATATYPES[i.data_type], batch + list(i.dims)) for i in config.input
        ], name
        assert [(o.name, o.datatype, list(o.shape)) for o in meta.outputs] == [
            (o.name, CONFIG_DATATYPES[o.data_type], batch + list(o.dims)) for o in config.output
        ], name
    for name, outputs in OUTPUTS_BY_CONFIG[server].items():
        config = stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=5).config
        # As perf_analyzer asks: every output of the configuration, and its own parameter.
        parameters = {"triton_enable_empty_final_response": p(False)}
        if outputs == ["text_output"]:
            parameters["max_new_tokens"] = p(2)
        response = infer(
            stub,
            name,
            _perf_analyzer_request(config, 2),
            outputs=[o.name for o in config.output],
            parameters=parameters,
        )
        assert [o.name for o in response.outputs] == outputs, name


# Tensors: every datatype, typed contents and raw, both ways.
@dataclass(frozen=True)
class Case:
    datatype: str
    dtype: Any
    values: list[Any]
    field: str | None  # the contents field; None: raw only


CASES = [
    Case("FP32", np.float32, [1.5, -2.25, 3.0e38, 0.0], "fp32_contents"),
    Case("FP64", np.float64, [1e-300, -2.5, 1 / 3, 2.0**70], "fp64_contents"),
    Case("INT64", np.int64, [2**60 + 1, -(2**62), 7, 0], "int64_contents"),
    Case("INT32", np.int32, [-(2**31), 2**31 - 1], "int_contents"),
    Case("INT16", np.int16, [-(2**15), 2**15 - 1], "int_contents"),
    Case("INT8", np.int8, [-128, 127, 0, 5], "int_contents"),
    Case("UINT8", np.uint8, [0, 255, 9, 1], "uint_contents"),
    Case("UINT16", np.uint16, [65535, 1], "uint_contents"),
    Case("UINT32", np.uint32, [2**32 - 1, 0], "uint_contents"),
    Case("UINT64", np.uint64, [2**64 - 1, 5], "uint64_contents"),
    Case("BOOL", np.bool_, [True, False, True, True], "bool_contents"),
    Case("FP16", np.float16, [0.5, -65504.0, 1e-4, 3.0], None),
]


def _shape_and_bytes(case: Case) -> tuple[list[int], bytes]:
    shape = [2, len(case.values) // 2]
    return shape, np.array(case.values, dtype=case.dtype).astype(case.dtype).tobytes()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.datatype)
def test_tensors_round_trip_raw(stub, case: Case) -> None:
    shape, expected = _shape_and_bytes(case)
    raw = infer(stub, "echo-tensors", [tensor("t", case.datatype, shape)], raw=[expected])
    assert outputs_of(raw) == {"t": (case.datatype, shape, expected)}


@pytest.mark.parametrize("case", [c for c in CASES if c.field], ids=lambda c: c.datatype)
def test_typed_tensors_arrive_as_their_raw_bytes(stub, case: Case) -> None:
    shape, expected = _shape_and_bytes(case)
    assert case.field is not None
    contents = {case.field: case.values}
    typed = infer(stub, "echo-tensors", [tensor("t", case.datatype, shape, **contents)])
    assert outputs_of(typed) == {"t": (case.datatype, shape, expected)}


def test_bf16_travels_raw_as_its_own_bits(stub) -> None:
    values = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
    data = values.view(torch.int16).numpy().astype("<i2").tobytes()
    assert data == bytes.fromhex("803f20c04940")
    response = infer(stub, "echo-tensors", [tensor("b", "BF16", [3])], raw=[data])
    assert outputs_of(response) == {"b": ("BF16", [3], data)}


def test_a_model_computes_on_typed_and_raw_inputs_alike(stub) -> None:
    x = [1.5, -2.0, 3.0]
    typed = infer(
        stub,
        "doubler",
        [tensor("x", "FP32", [3], fp32_contents=x)],
    )
    raw = infer(
        stub,
        "doubler",
        [tensor("x", "FP32", [3])],
        raw=[np.array(x, "<f4").tobytes()],
    )
    assert outputs_of(typed) == outputs_of(raw)
    datatype, shape, data = outputs_of(typed)["y"]
    assert (datatype, shape) == ("FP32", [3])
    assert np.frombuffer(data, "<f4").tolist() == [3.0, -4.0, 6.0]
    # Request parameters reach the model as v1's Predict parameters do.
    tripled = infer(
        stub,
        "doubler",
        [tensor("x", "FP32", [3], fp32_contents=x)],
        parameters={"factor": p(3.0)},
    )
    assert np.frombuffer(outputs_of(tripled)["y"][2], "<f4").tolist() == [4.5, -6.0, 9.0]


def test_the_response_echoes_the_id_names_the_version_and_orders_outputs_as_asked(stub) -> None:
    a = np.arange(3, dtype="<i8").tobytes()
    b = np.array([0.5], "<f8").tobytes()
    tensors = [
        tensor("a", "INT64", [3]),
        tensor("b", "FP64", [1]),
    ]
    response = infer(stub, "echo-tensors", tensors, raw=[a, b], id="req-42")
    assert (response.model_name, response.model_version, response.id) == (
        "echo-tensors",
        "1",
        "req-42",
    )
    assert [o.name for o in response.outputs] == ["a", "b"]
    only_b = infer(stub, "echo-tensors", tensors, raw=[a, b], outputs=["b"])
    assert outputs_of(only_b) == {"b": ("FP64", [1], b)}
    swapped = infer(stub, "echo-tensors", tensors, raw=[a, b], outputs=["b", "a"])
    assert [o.name for o in swapped.outputs] == ["b", "a"]
    assert list(swapped.raw_output_contents) == [b, a]


def test_rows_of_a_batching_model_come_back_computed(stub) -> None:
    x = np.arange(8, dtype="<f4").reshape(2, 4)
    response = infer(stub, "rows", [tensor("x", "FP32", [2, 4])], raw=[x.tobytes()])
    datatype, shape, data = outputs_of(response)["y"]
    assert (datatype, shape) == ("FP32", [2, 4])
    assert np.array_equal(np.frombuffer(data, "<f4").reshape(2, 4), x + 1)


@pytest.mark.parametrize("shape", [[3], [3, 1]])
def test_text_round_trips_as_bytes_typed_and_raw(stub, shape: list[int]) -> None:
    texts = ["héllo wörld", "", "🙂 and 中文"]
    elements = [t.encode() for t in texts]
    params = {"max_new_tokens": p(100)}
    typed = infer(
        stub,
        "echo-text",
        [text(*elements, shape=shape)],
        parameters=params,
    )
    raw = infer(
        stub,
        "echo-text",
        [tensor("text_input", "BYTES", shape)],
        raw=[frame(elements)],
        parameters=params,
    )
    assert outputs_of(typed) == outputs_of(raw)
    datatype, out_shape, data = outputs_of(typed)["text_output"]
    assert (datatype, out_shape) == ("BYTES", shape)
    assert [e.decode() for e in unframe(data)] == texts


@pytest.fixture(scope="module")
def invariant() -> Iterator[tuple[v1_grpc.InferenceServiceStub, pb_grpc.GRPCInferenceServiceStub]]:
    """bytelm with --batch-invariant: texts decoded together are bit for bit their lone texts."""
    thread, server = start_grpc_server(["bytelm"], max_active=2, batch_invariant=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield v1_grpc.InferenceServiceStub(channel), pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()
    stop_grpc_server(thread, server)


# The same answers as the v1 API, on the same runtime. An OIP request's texts decode
# together; the v1 calls one at a time: equal bit for bit with batch invariance.
def test_generation_equals_v1_for_each_text_of_a_batch(invariant) -> None:
    v1_stub, oip = invariant
    prompts = ["def main(", "import os\n", "class Foo:"]
    # Values exact in float32, which v1's fields are; OIP's are doubles.
    settings = {"max_new_tokens": 24, "seed": 7, "temperature": 0.75, "top_k": 20, "top_p": 0.875}
    stops = ["\n\n"]
    want = [
        v1_stub.Generate(
            v1.GenerateRequest(
                model="bytelm",
                inputs=prompt,
                parameters=v1.GenerationParameters(stop_sequences=stops, **settings),
            ),
            timeout=60,
        ).generated_text
        for prompt in prompts
    ]
    parameters = {name: p(value) for name, value in settings.items()}
    parameters["stop_sequences"] = p(json.dumps(stops))
    response = infer(
        oip,
        "bytelm",
        [text(*(t.encode() for t in prompts))],
        parameters=parameters,
    )
    datatype, shape, data = outputs_of(response)["text_output"]
    assert (datatype, shape) == ("BYTES", [3])
    assert [e.decode() for e in unframe(data)] == want
    assert any(want)  # the model said something


@pytest.mark.parametrize("normalize", [None, False])
def test_embedding_equals_v1(running: Running, oip, normalize: bool | None) -> None:
    texts = ["def f(x):\n    return x", "import sys", ""]
    v1_params = v1.EmbedParameters() if normalize is None else v1.EmbedParameters(normalize=False)
    want = running.stub.Embed(
        v1.EmbedRequest(model="bytelm", inputs=texts, parameters=v1_params), timeout=60
    )
    rows = np.array([e.values for e in want.embeddings], dtype="<f4")
    response = infer(
        oip,
        "bytelm",
        [tensor("text", "BYTES", [3])],
        raw=[frame([t.encode() for t in texts])],
        parameters=None if normalize is None else {"normalize": p(False)},
    )
    datatype, shape, data = outputs_of(response)["embedding"]
    assert (datatype, shape) == ("FP32", list(rows.shape))
    assert np.array_equal(np.frombuffer(data, "<f4").reshape(rows.shape), rows)
    norms = np.linalg.norm(rows, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5) == (normalize is None)


def test_runtime_errors_are_the_same_statuses_as_v1(running: Running, oip) -> None:
    a = [text(b"a", name="text")]
    # A model that failed to load: UNAVAILABLE, with the same message.
    v1_err = error(running.stub.Embed, v1.EmbedRequest(model="broken", inputs=["a"]), timeout=10)
    err = error(infer, oip, "broken", a)
    assert (err.code(), err.details()) == (v1_err.code(), v1_err.details())
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    # A model that fails inside: INTERNAL with the request id, never the model's words.
    err = error(infer, oip, "exploding", a)
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in err.details()
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.RequestInfo()
    assert any(d.Unpack(info) for d in status.details) and info.request_id in err.details()
    # A task the model does not serve, picked by input name: generation on doubler.
    err = error(infer, oip, "doubler", [text(b"a")])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown input 'text_input'" in err.details()


def test_overload_is_resource_exhausted_with_retry_info(served: Served, stub) -> None:
    # slow holds 4 requests (2 running, 2 queued); five texts in one request: one too many.
    five = [text(b"a", b"b", b"c", b"d", b"e")]
    err = error(infer, stub, "slow", five, parameters={"max_new_tokens": p(20)})
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in status.details)
    assert retry.retry_delay.seconds == 1
    # The other four were cancelled with it: they leave the model, which serves on.
    scheduler = served.server.runtime.get_model("slow").scheduler
    wait_until(lambda: scheduler.depth + scheduler.active == 0, "the cancelled generations left")
    one = infer(stub, "slow", [text(b"a")], parameters={"max_new_tokens": p(3)})
    assert unframe(outputs_of(one)["text_output"][2]) == [b"xxx"]


# Bad requests.
BAD_REQUESTS: dict[str, tuple[dict[str, Any], str, str]] = {
    # name: (infer() arguments on doubler, field, text in the description)
    "typed count": ({"inputs": [fp32(shape=[4])]}, "inputs[0].contents", "shape [4] needs 4"),
    "raw byte count": (
        {"inputs": [tensor("x", "FP32", [3])], "raw": [b"\0" * 11]},
        "raw_input_contents[0]",
        "needs 12 bytes, got 11",
    ),
    "raw and typed mixed": (
        {
            "inputs": [fp32(), tensor("z", "FP32", [1])],
            "raw": [b"\0" * 12, b"\0" * 4],
        },
        "inputs[0].contents",
        "must be empty when the request carries raw_input_contents",
    ),
    "raw entries per input": (
        {"inputs": [tensor("x", "FP32", [3])], "raw": [b"\0" * 12, b""]},
        "raw_input_contents",
        "holds 2 entries for 1 inputs",
    ),
    "wrong contents field": (
        {"inputs": [tensor("x", "FP32", [1], fp64_contents=[1])]},
        "inputs[0].contents",
        "FP32 elements go in fp32_contents, not fp64_contents",
    ),
    "FP16 typed": (
        {"inputs": [tensor("x", "FP16", [1], fp32_contents=[1])]},
        "inputs[0].contents",
        "FP16 elements travel only as raw_input_contents",
    ),
    "out of range": (
        {"inputs": [tensor("x", "INT8", [1], int_contents=[300])]},
        "inputs[0].contents",
        "holds 300, outside the range of INT8",
    ),
    "unknown datatype": (
        {"inputs": [tensor("x", "FLOAT", [1])]},
        "inputs[0].datatype",
        "'FLOAT' is not a datatype of the protocol",
    ),
    "negative dimension": (
        {"inputs": [tensor("x", "FP32", [-1])]},
        "inputs[0].shape",
        "must not be negative",
    ),
    "declared datatype": (
        {"inputs": [tensor("x", "INT64", [1], int64_contents=[1])]},
        "inputs[0].datatype",
        "must be FP32, got INT64",
    ),
    "declared shape": ({"inputs": [fp32(shape=[1, 3])]}, "inputs[x].shape", "must match [-1]"),
    "unknown input": ({"inputs": [fp32(name="w")]}, "inputs[0].name", "unknown input 'w'"),
    "unknown output": (
        {"inputs": [fp32()], "outputs": ["z"]},
        "outputs[0].name",
        "unknown output 'z'",
    ),
    "shared memory": (
        {"inputs": [Tensor(name="x", datatype="FP32", shape=[1], parameters={"shm": p("r")})]},
        "inputs[0].parameters",
        "'shm' is not supported",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=str)
def test_bad_tensors_are_invalid_argument_naming_the_field(stub, case: str) -> None:
    arguments, field, words = BAD_REQUESTS[case]
    err = error(infer, stub, "doubler", **arguments)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    found = violations(err)
    assert any(f == field and words in d for f, d in found), found
    assert words in err.details()


def test_an_undeclared_output_is_invalid_once_the_model_has_run(stub) -> None:
    raw = np.zeros(1, "<f4").tobytes()
    err = error(infer, stub, "echo-tensors", [tensor("t", "FP32", [1])], raw=[raw], outputs=["u"])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown output 'u'" in err.details()


BAD_TEXT: dict[str, tuple[Tensor, list[bytes], dict[str, pb.InferParameter], str]] = {
    # name: (input, raw contents, parameters, text of the error)
    "not UTF-8": (
        text(b"ok", b"\xff\xfe"),
        [],
        {},
        "element 1 is not UTF-8 text",
    ),
    "bad framing": (
        tensor("text_input", "BYTES", [1]),
        [struct.pack("<I", 10) + b"short"],
        {},
        "element 0 needs 10 bytes, 5 are left",
    ),
    "framing count": (
        tensor("text_input", "BYTES", [2]),
        [frame([b"one"])],
        {},
        "holds 1 BYTES elements, the shape needs 2",
    ),
    "not BYTES": (
        tensor("text_input", "UINT8", [2], uint_contents=[1, 2]),
        [],
        {},
        "text_input must be BYTES, got UINT8",
    ),
    "matrix": (
        text(b"a", b"b", shape=[1, 2]),
        [],
        {},
        "must be [N] or [N, 1] with N >= 1, got [1, 2]",
    ),
    "empty": (
        tensor("text_input", "BYTES", [0]),
        [],
        {},
        "must be [N] or [N, 1] with N >= 1, got [0]",
    ),
    "parameter type": (
        text(b"a"),
        [],
        {"temperature": p("hot")},
        "parameters.temperature must be a number",
    ),
    "unknown parameter": (
        text(b"a"),
        [],
        {"normalize": p(True)},
        "parameters.normalize is not a parameter of this model",
    ),
    "stop sequences": (
        text(b"a"),
        [],
        {"stop_sequences": p("\n")},
        "must be a string holding a JSON array of strings",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TEXT), ids=str)
def test_bad_text_requests_are_invalid_argument(stub, case: str) -> None:
    given, raw, parameters, words = BAD_TEXT[case]
    err = error(infer, stub, "echo-text", [given], raw=raw, parameters=parameters)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.details()


def test_inputs_of_two_tasks_in_one_request_are_invalid(oip) -> None:
    err = error(infer, oip, "bytelm", [text(b"a"), text(b"a", name="text")])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err) == [
        (
            "inputs[1].name",
            "'text_input' is an input of text generation, 'text' is an input of embedding; "
            "one request runs one task, so send the inputs of one",
        )
    ]
    parameters = {"max_new_tokens": p(3)}
    err = error(infer, oip, "bytelm", [text(b"a", name="text")], parameters=parameters)
    assert "parameters.max_new_tokens is not a parameter of embedding" in err.details()
    err = error(infer, oip, "bytelm", [])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "text_input (BYTES) (text generation); or text (BYTES) (embedding)" in err.details()


def test_outputs_of_another_task_are_left_out_unless_they_are_all_asked_for(oip) -> None:
    both = infer(
        oip,
        "bytelm",
        [text(b"def ")],
        outputs=["embedding", "text_output"],
        parameters={"max_new_tokens": p(2)},
    )
    assert [o.name for o in both.outputs] == ["text_output"]
    err = error(infer, oip, "bytelm", [text(b"def ")], outputs=["embedding"])
    assert violations(err) == [
        (
            "outputs",
            "'embedding' is not an output of text generation, which this request's inputs "
            "run; its outputs: ['text_output']",
        )
    ]
    err = error(infer, oip, "bytelm", [text(b"def ")], outputs=["logits"])
    assert violations(err) == [
        ("outputs[0].name", "unknown output 'logits'; outputs: ['embedding', 'text_output']")
    ]


def test_client_parameters_are_dropped_or_refused_never_passed_to_the_model(stub) -> None:
    # Generation refuses any parameter it does not know; these never reach it.
    dropped = {"triton_enable_empty_final_response": p(True), "priority": p(1), "headers": p("")}
    response = infer(stub, "echo-text", [text(b"hi")], parameters=dropped)
    assert unframe(outputs_of(response)["text_output"][2]) == [b"hi"]
    for name in ("sequence_id", "timeout"):
        err = error(infer, stub, "echo-text", [text(b"hi")], parameters={name: p(5)})
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        ((field, description),) = violations(err)
        assert field == f"parameters.{name}" and "which this server does not" in description


def test_a_request_that_does_not_parse_is_invalid_argument(served: Served) -> None:
    call = served.channel.unary_unary(f"/{SERVICE}/ModelInfer")
    err = error(call, b"\xff\xff\xff", timeout=5)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid inference.ModelInferRequest" in err.details()


# The model repository RPCs.
def test_repository_rpcs_answer_as_the_runtime_does(served: Served, stub) -> None:
    # This server has no model repository: the runtime refuses, and the RPCs say so alike.
    with pytest.raises(FailedPrecondition) as refused:
        served.server.runtime.repository_index()
    assert refused.value.message == "the server has no model repository (--model-repository)"
    err = error(stub.RepositoryIndex, pb.RepositoryIndexRequest(), timeout=5)
    assert (err.code(), err.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        refused.value.message,
    )
    err = error(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="x"), timeout=5)
    assert (err.code(), err.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        refused.value.message,
    )


def test_repository_rpcs_refuse_other_repositories_and_parameters(stub) -> None:
    err = error(stub.RepositoryIndex, pb.RepositoryIndexRequest(repository_name="o"), timeout=5)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    for rpc, message in (
        (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest),
        (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest),
    ):
        err = error(rpc, message(model_name="rows", repository_name="other"), timeout=5)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        parameters = {"config": pb.ModelRepositoryParameter(string_param="{}")}
        err = error(rpc, message(model_name="rows", parameters=parameters), timeout=5)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(err) == [("parameters.config", "is not supported")]
        err = error(rpc, message(model_name=""), timeout=5)
        assert violations(err) == [("model_name", "must name a model")]
    # unload_dependents is understood by unload only, and only as a bool.
    text = {"unload_dependents": pb.ModelRepositoryParameter(string_param="no")}
    err = error(
        stub.RepositoryModelUnload,
        pb.RepositoryModelUnloadRequest(model_name="rows", parameters=text),
        timeout=5,
    )
    assert violations(err) == [("parameters.unload_dependents", "must be a bool")]
    flag = {"unload_dependents": pb.ModelRepositoryParameter(bool_param=False)}
    err = error(
        stub.RepositoryModelLoad,
        pb.RepositoryModelLoadRequest(model_name="rows", parameters=flag),
        timeout=5,
    )
    assert violations(err) == [("parameters.unload_dependents", "is not supported")]
    assert stub.ModelReady(pb.ModelReadyRequest(name="rows"), timeout=5).ready


# The call frame: metrics, request ids, access lines.
def _requests(url: str) -> dict[tuple[str, str], float]:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    return {
        (s.labels["method"], s.labels["code"]): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
        if s.name == "protoserve_requests_total"
    }


def test_metrics_count_model_infer_calls_by_code(served: Served, stub) -> None:
    before = _requests(served.metrics_url)
    x = [fp32()]
    infer(stub, "doubler", x)
    infer(stub, "doubler", x)
    error(infer, stub, "doubler", [fp32(shape=[7])])
    stub.ServerLive(pb.ServerLiveRequest(), timeout=5)
    after = _requests(served.metrics_url)

    def delta(method: str, code: str) -> float:
        return after.get((method, code), 0) - before.get((method, code), 0)

    assert delta("ModelInfer", "OK") == 2
    assert delta("ModelInfer", "INVALID_ARGUMENT") == 1
    assert delta("ServerLive", "OK") == 1


def test_calls_carry_a_request_id_and_end_with_an_access_line(stub, caplog) -> None:
    caplog.set_level(logging.INFO, logger="protoserve.server.access")
    _, call = stub.ModelInfer.with_call(
        pb.ModelInferRequest(model_name="doubler", inputs=[fp32()]),
        metadata=(("x-request-id", "oip-trace-1"),),
        timeout=10,
    )
    assert ("x-request-id", "oip-trace-1") in call.initial_metadata()
    lines = [r for r in caplog.records if getattr(r, "request_id", None) == "oip-trace-1"]
    assert [(r.method, r.code) for r in lines] == [("ModelInfer", "OK")]  # type: ignore[attr-defined]


def test_repository_versions_load_and_unload_through_the_protocol(tmp_path) -> None:
    folder = tmp_path / "rows"
    for version in ("1", "2"):
        (folder / version).mkdir(parents=True)
    (folder / "model.toml").write_text(
        'source = "tests.server.models_for_tests:Rows"\nversions = "all"\n'
    )
    # --model-control: load and unload without tokens, as on a developer's machine.
    thread, server = start_grpc_server((), model_repository=str(tmp_path), model_control=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    x = [tensor("x", "FP32", [1, 4], fp32_contents=[1, 2, 3, 4])]
    try:
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=5)
        assert [(m.name, m.version, m.state) for m in index.models] == [
            ("rows", "1", "READY"),
            ("rows", "2", "READY"),
        ]
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="rows"), timeout=5)
        assert list(meta.versions) == ["1", "2"]
        assert infer(stub, "rows", x).model_version == "2"  # the latest
        assert infer(stub, "rows", x, model_version="1").model_version == "1"

        # As tritonclient sends it: unload_dependents=false on every unload.
        no_dependents = {"unload_dependents": pb.ModelRepositoryParameter(bool_param=False)}
        stub.RepositoryModelUnload(
            pb.RepositoryModelUnloadRequest(model_name="rows", parameters=no_dependents),
            timeout=30,
        )
        assert not stub.ModelReady(pb.ModelReadyRequest(name="rows"), timeout=5).ready
        assert error(infer, stub, "rows", x).code() in (
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.UNAVAILABLE,
        )
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5)
        assert {m.state for m in index.models} == {"UNAVAILABLE"}

        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="rows"), timeout=30)
        assert stub.ModelReady(pb.ModelReadyRequest(name="rows", version="1"), timeout=5).ready
        data = outputs_of(infer(stub, "rows", x))["y"][2]
        assert np.frombuffer(data, "<f4").tolist() == [2, 3, 4, 5]
        err = error(
            stub.RepositoryModelLoad,
            pb.RepositoryModelLoadRequest(model_name="nope"),
            timeout=5,
        )
        assert err.code() == grpc.StatusCode.NOT_FOUND
    finally:
        channel.close()
        stop_grpc_server(thread, server)
