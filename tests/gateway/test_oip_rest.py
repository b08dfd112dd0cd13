"""The Open Inference Protocol's REST API (KServe V2) through the gateway's OIP codec.

A real grpc.aio OIP server (tests/gateway/oip_upstream.py) behind the real gateway
on uvicorn: the tests send what tritonclient.http and curl send and check the
wire: status codes, JSON, binary bodies byte for byte, headers, and what the
upstream received.
"""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from openapi_spec_validator import OpenAPIV31SpecValidator

from protoserve.gateway import Descriptors, build_gateway, from_descriptor_set, from_reflection
from protoserve.gateway.inference import OIP_SERVICE
from protoserve.oip.v2 import grpc_service_pb2 as pb
from tests._threads import LoopThread, UvicornThread
from tests.gateway._sources import SOURCES, protoserve_descriptor_set
from tests.gateway.oip_upstream import State, join_bytes, start

LIMIT = 64 * 1024
HEADER = "Inference-Header-Content-Length"
INFER = "/v2/models/doubler/infer"


def oip_descriptors() -> Descriptors:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    return Descriptors(descriptor_pool.Default(), (service,), {}, "compiled OIP stubs")


@dataclass
class Upstream:
    thread: LoopThread
    server: Any
    port: int
    state: State

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    thread = LoopThread()
    state = State()
    server, port = thread.run(start(state))
    yield Upstream(thread, server, port, state)
    thread.run(server.stop(0))
    thread.stop()


def _client(app: Any) -> Iterator[httpx.Client]:
    served = UvicornThread(app)
    with httpx.Client(base_url=served.url, timeout=30) as client:
        yield client
    served.stop()


@pytest.fixture(scope="module")
def gateway(upstream: Upstream) -> Iterator[httpx.Client]:
    app = build_gateway(upstream.target, descriptors=oip_descriptors(), max_body_bytes=LIMIT)
    yield from _client(app)


@pytest.fixture(scope="module")
def reflected(upstream: Upstream) -> Iterator[httpx.Client]:
    """A gateway that learnt the service from reflection: messages from its own pool."""
    app = build_gateway(upstream.target, descriptors=from_reflection(upstream.target))
    yield from _client(app)


@pytest.fixture(scope="module")
def from_file(upstream: Upstream) -> Iterator[httpx.Client]:
    """A gateway given a descriptor-set file (``--descriptor-set``): a pool of its own."""
    descriptors = from_descriptor_set(protoserve_descriptor_set(), services=[OIP_SERVICE])
    yield from _client(build_gateway(upstream.target, descriptors=descriptors))


@pytest.fixture(params=SOURCES)
def http(request: pytest.FixtureRequest, state: State) -> httpx.Client:
    fixture = {"compiled": "gateway", "descriptor-set": "from_file", "reflection": "reflected"}
    client: httpx.Client = request.getfixturevalue(fixture[request.param])
    return client


@pytest.fixture
def state(upstream: Upstream) -> Iterator[State]:
    upstream.state.live = upstream.state.ready = True
    for calls in (upstream.state.infer_requests, upstream.state.loads, upstream.state.unloads):
        calls.clear()
    yield upstream.state
    upstream.state.live = upstream.state.ready = True


def last_infer(state: State) -> pb.ModelInferRequest:
    assert state.infer_requests, "the upstream got no infer request"
    return state.infer_requests[-1]


def binary_body(document: dict[str, Any], *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(document).encode()
    return head + b"".join(blobs), {HEADER: str(len(head))}


def split_response(response: httpx.Response) -> tuple[dict[str, Any], bytes]:
    length = int(response.headers[HEADER])
    head: dict[str, Any] = json.loads(response.content[:length])
    return head, response.content[length:]


def parameter(value: pb.InferParameter) -> tuple[str | None, Any]:
    which = value.WhichOneof("parameter_choice")
    return which, getattr(value, which) if which else None


# Health ------------------------------------------------------------------------------


def test_health_true_is_200_and_false_is_400(http: httpx.Client, state: State) -> None:
    assert (http.get("/v2/health/live").status_code, http.get("/v2/health/live").json()) == (
        200,
        {"live": True},
    )
    ready = http.get("/v2/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    state.live = state.ready = False
    live = http.get("/v2/health/live")
    assert (live.status_code, live.json()) == (400, {"live": False})
    ready = http.get("/v2/health/ready")
    assert (ready.status_code, ready.json()) == (400, {"ready": False})
    assert ready.headers["content-type"] == "application/json"


def test_model_ready(http: httpx.Client, state: State) -> None:
    for path in ("/v2/models/doubler/ready", "/v2/models/doubler/versions/1/ready"):
        response = http.get(path)
        assert (response.status_code, response.json()) == (200, {"ready": True})
    cold = http.get("/v2/models/cold/ready")
    assert (cold.status_code, cold.json()) == (400, {"ready": False})
    missing = http.get("/v2/models/nope/ready")
    assert (missing.status_code, missing.json()) == (404, {"error": "model 'nope' is not found"})


# Metadata and configuration ----------------------------------------------------------


def test_server_metadata_adds_the_binary_extension(http: httpx.Client, state: State) -> None:
    response = http.get("/v2")
    assert response.status_code == 200
    assert response.json() == {
        "name": "oip-test",
        "version": "0.1",
        "extensions": ["model_repository", "binary_tensor_data"],
    }


def test_model_metadata_shapes_are_numbers(http: httpx.Client, state: State) -> None:
    expected = {
        "name": "doubler",
        "versions": ["1"],
        "platform": "pytorch_libtorch",
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "OUT_INPUT0", "datatype": "FP32", "shape": [-1, 4]}],
    }
    assert http.get("/v2/models/doubler").json() == expected
    assert http.get("/v2/models/doubler/versions/1").json() == expected
    missing = http.get("/v2/models/nope")
    assert (missing.status_code, missing.json()) == (404, {"error": "model 'nope' is not found"})


def test_model_config_is_tritons_json(http: httpx.Client, state: State) -> None:
    response = http.get("/v2/models/doubler/config")
    assert response.status_code == 200
    # The configuration itself, not {"config": ...}; integers as numbers; defaults present.
    assert response.json() == {
        "name": "doubler",
        "platform": "pytorch_libtorch",
        "max_batch_size": 8,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4], "optional": False}],
        "output": [{"name": "OUT_INPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
        "instance_group": [],  # this upstream says none
        "dynamic_batching": {"preferred_batch_size": [4], "max_queue_delay_microseconds": 100},
        "backend": "python",
        "model_transaction_policy": {"decoupled": False},
        "parameters": {},  # a default too: the empty map
    }


# Inference in JSON -------------------------------------------------------------------


def test_infer_json_nested_data_and_parameters(http: httpx.Client, state: State) -> None:
    body = {
        "id": "req-1",
        "parameters": {"flag": True, "count": 3, "scale": 0.5, "note": "hi", "big": 2**63},
        "inputs": [
            {
                "name": "x",
                "shape": [2, 2],
                "datatype": "FP32",
                "parameters": {"tag": "t"},
                "data": [[1, 2.5], [3, 4]],
            }
        ],
    }
    response = http.post(INFER, json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert HEADER not in response.headers
    assert response.json() == {
        "model_name": "doubler",
        "model_version": "1",
        "id": "req-1",
        "parameters": {"flag": True, "count": 3, "scale": 0.5, "note": "hi", "big": 2**63},
        "outputs": [
            {"name": "OUT_x", "datatype": "FP32", "shape": [2, 2], "data": [2.0, 5.0, 6.0, 8.0]}
        ],
    }
    sent = last_infer(state)
    assert (sent.model_name, sent.model_version, sent.id) == ("doubler", "", "req-1")
    assert sent.raw_input_contents == [np.array([1, 2.5, 3, 4], "<f4").tobytes()]
    assert not sent.inputs[0].HasField("contents")
    assert list(sent.inputs[0].shape) == [2, 2]
    assert {k: parameter(v) for k, v in sent.parameters.items()} == {
        "flag": ("bool_param", True),
        "count": ("int64_param", 3),
        "scale": ("double_param", 0.5),
        "note": ("string_param", "hi"),
        "big": ("uint64_param", 2**63),
    }
    assert parameter(sent.inputs[0].parameters["tag"]) == ("string_param", "t")


def test_infer_version_binding(http: httpx.Client, state: State) -> None:
    body = {"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": [21]}]}
    response = http.post("/v2/models/doubler/versions/1/infer", json=body)
    assert response.json()["outputs"][0]["data"] == [42]
    assert last_infer(state).model_version == "1"
    assert "id" not in response.json() and "parameters" not in response.json()


# (datatype, JSON data, raw bytes the upstream must get, JSON data of the doubled output)
DATATYPES = [
    ("BOOL", [True, False], b"\x01\x00", [True, False]),
    ("UINT8", [1, 255], bytes([1, 255]), [2, 254]),
    ("UINT16", [65535], np.array([65535], "<u2").tobytes(), [65534]),
    ("UINT32", [7], np.array([7], "<u4").tobytes(), [14]),
    ("UINT64", [2**63 + 1], np.array([2**63 + 1], "<u8").tobytes(), [2]),
    ("INT8", [-3, 100], np.array([-3, 100], "i1").tobytes(), [-6, -56]),
    ("INT16", [-300], np.array([-300], "<i2").tobytes(), [-600]),
    ("INT32", [-(2**31)], np.array([-(2**31)], "<i4").tobytes(), [0]),
    ("INT64", [2**62 - 1], np.array([2**62 - 1], "<i8").tobytes(), [2**63 - 2]),
    ("FP16", [0.5, -1.5], np.array([0.5, -1.5], "<f2").tobytes(), [1.0, -3.0]),
    ("FP32", [0.25, 1e30], np.array([0.25, 1e30], "<f4").tobytes(), [0.5, float(np.float32(2e30))]),
    ("FP64", [0.1, -2], np.array([0.1, -2], "<f8").tobytes(), [0.2, -4.0]),
    # BF16 is FP32's top half; 1.00390625 is halfway between two BF16 values and
    # rounds to the even one, 1.0, as torch rounds.
    ("BF16", [1.5, -2.25, 1.00390625], b"\xc0\x3f\x10\xc0\x80\x3f", [3.0, -4.5, 2.0]),
    ("BYTES", ["ab", "héllo", ""], join_bytes([b"ab", "héllo".encode(), b""]), ["AB", "HéLLO", ""]),
]


# The upstream answers raw bytes, or typed contents (which FP16 and BF16 do not have).
ANSWERS = [
    pytest.param(*case, typed, id=f"{case[0]}-{'typed' if typed else 'raw'}")
    for case in DATATYPES
    for typed in (False, True)
    if not (typed and case[0] in ("FP16", "BF16"))
]


@pytest.mark.parametrize(("datatype", "data", "raw", "doubled", "typed"), ANSWERS)
def test_every_datatype_in_json(
    gateway: httpx.Client,
    state: State,
    datatype: str,
    data: list[Any],
    raw: bytes,
    doubled: list[Any],
    typed: bool,
) -> None:
    body = {
        "parameters": {"typed_contents": typed},
        "inputs": [{"name": "t", "shape": [len(data)], "datatype": datatype, "data": data}],
    }
    response = gateway.post(INFER, json=body)
    assert response.status_code == 200, response.text
    assert last_infer(state).raw_input_contents == [raw]
    [output] = response.json()["outputs"]
    assert output == {"name": "OUT_t", "datatype": datatype, "shape": [len(data)], "data": doubled}


# Inference with binary data ----------------------------------------------------------


def test_binary_inputs_and_mixed_outputs(http: httpx.Client, state: State) -> None:
    floats = np.arange(6, dtype="<f4")
    texts = join_bytes([b"abc", b"\x00\xffz"])
    document = {
        "id": "bin",
        "inputs": [
            {"name": "f", "shape": [2, 3], "datatype": "FP32",
             "parameters": {"binary_data_size": floats.nbytes}},
            {"name": "s", "shape": [2], "datatype": "BYTES",
             "parameters": {"binary_data_size": len(texts)}},
            {"name": "j", "shape": [1], "datatype": "INT16", "data": [5]},
        ],
        "outputs": [
            {"name": "OUT_f", "parameters": {"binary_data": False}},
            {"name": "OUT_s", "parameters": {"binary_data": True, "classification": 0}},
            {"name": "OUT_j", "parameters": {"binary_data": True}},
        ],
    }  # fmt: skip
    content, headers = binary_body(document, floats.tobytes(), texts)
    response = http.post(INFER, content=content, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    head, blob = split_response(response)
    assert head["outputs"] == [
        {"name": "OUT_f", "datatype": "FP32", "shape": [2, 3],
         "data": [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]},
        {"name": "OUT_s", "datatype": "BYTES", "shape": [2],
         "parameters": {"classification": 0, "binary_data_size": 14}},
        {"name": "OUT_j", "datatype": "INT16", "shape": [1],
         "parameters": {"binary_data_size": 2}},
    ]  # fmt: skip
    # The binary outputs' bytes, in the order of the outputs, byte for byte.
    assert blob == join_bytes([b"ABC", b"\x00\xffZ"]) + struct.pack("<h", 10)
    sent = last_infer(state)
    assert sent.raw_input_contents == [floats.tobytes(), texts, struct.pack("<h", 5)]
    # The extension's parameters are the gateway's: the upstream never sees them.
    assert all(not t.parameters for t in sent.inputs)
    assert [list(o.parameters) for o in sent.outputs] == [[], ["classification"], []]


def test_binary_data_output_sends_every_output_binary(http: httpx.Client, state: State) -> None:
    document = {
        "parameters": {"binary_data_output": True},
        "inputs": [
            {"name": "a", "shape": [2], "datatype": "UINT8", "data": [1, 2]},
            {"name": "b", "shape": [1], "datatype": "FP64", "data": [1.5]},
        ],
    }
    response = http.post(INFER, json=document)
    assert response.headers["content-type"] == "application/octet-stream"
    head, blob = split_response(response)
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    assert sizes == [2, 8] and all("data" not in o for o in head["outputs"])
    assert blob == bytes([2, 4]) + struct.pack("<d", 3.0)
    assert "binary_data_output" not in last_infer(state).parameters
    assert "parameters" not in head  # nothing left to echo


def test_typed_contents_from_the_upstream_go_binary_too(http: httpx.Client, state: State) -> None:
    document = {
        "parameters": {"typed_contents": True, "binary_data_output": True},
        "inputs": [{"name": "a", "shape": [3], "datatype": "INT32", "data": [1, -2, 3]}],
    }
    head, blob = split_response(http.post(INFER, json=document))
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 12}
    assert blob == np.array([2, -4, 6], "<i4").tobytes()


def test_bytes_that_are_not_utf8_need_binary_output(http: httpx.Client, state: State) -> None:
    raw = join_bytes([b"\xff\xfe"])
    document = {
        "inputs": [{"name": "s", "shape": [1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw)}}],
    }  # fmt: skip
    content, headers = binary_body(document, raw)
    response = http.post(INFER, content=content, headers=headers)
    assert response.status_code == 400
    assert "not UTF-8" in response.json()["error"] and "binary_data" in response.json()["error"]
    document["outputs"] = [{"name": "OUT_s", "parameters": {"binary_data": True}}]
    content, headers = binary_body(document, raw)
    _, blob = split_response(http.post(INFER, content=content, headers=headers))
    assert blob == raw


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_request_bodies(http: httpx.Client, state: State, encoding: str) -> None:
    floats = np.array([1.0, 2.0], "<f4")
    document = {
        "inputs": [{"name": "f", "shape": [2], "datatype": "FP32",
                    "parameters": {"binary_data_size": 8}}],
    }  # fmt: skip
    # The header gives the JSON's length before compression, as tritonclient sends it.
    content, headers = binary_body(document, floats.tobytes())
    packed = gzip.compress(content) if encoding == "gzip" else zlib.compress(content)
    response = http.post(INFER, content=packed, headers={**headers, "Content-Encoding": encoding})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [2.0, 4.0]


def test_compressed_bodies_that_do_not_inflate(gateway: httpx.Client, state: State) -> None:
    broken = gateway.post(INFER, content=b"not gzip", headers={"Content-Encoding": "gzip"})
    assert broken.status_code == 400
    assert broken.json() == {"error": broken.json()["error"]}
    assert "not valid gzip" in broken.json()["error"]
    other = gateway.post(INFER, content=b"{}", headers={"Content-Encoding": "br"})
    assert other.status_code == 415 and "'br' is not supported" in other.json()["error"]
    # Inflating past the body limit is refused like a large body.
    bomb = gzip.compress(b" " * (LIMIT + 1))
    too_big = gateway.post(INFER, content=bomb, headers={"Content-Encoding": "gzip"})
    assert too_big.status_code == 413 and "error" in too_big.json()
    assert state.infer_requests == []


# Bad requests ------------------------------------------------------------------------


def _one(datatype: str, shape: list[int], data: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]}


BAD_JSON = [
    (_one("FP32", [4], [1, 2, 3]), "input 'x': data has 3 elements but shape [4] holds 4"),
    (_one("INT8", [1], [300]), "input 'x': 300 does not fit INT8"),
    (_one("UINT32", [1], [-1]), "input 'x': -1 does not fit UINT32"),
    (_one("INT32", [2], [1, 1.5]), "input 'x': INT32 data must be integers, not 1.5"),
    (_one("INT32", [1], [True]), "input 'x': INT32 data must be integers, not true"),
    (_one("BOOL", [1], [1]), "input 'x': BOOL data must be true or false, not 1"),
    (_one("FP32", [1], ["1"]), "input 'x': FP32 data must be numbers, not the string '1'"),
    (_one("FP32", [1], [1e39]), "input 'x': 1e+39 does not fit FP32"),
    (_one("FP16", [1], [70000]), "input 'x': 70000.0 does not fit FP16"),
    (_one("BYTES", [1], [1]), "input 'x': BYTES data must be strings, not 1"),
    (_one("FP8", [1], [1]), "input 'x': datatype 'FP8' is not one of BOOL, UINT8"),
    (_one("FP32", [-1], [1]), "input 'x': shape must be an array of non-negative integers"),
    (_one("FP32", [1], 1), "input 'x': data must be a JSON array"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]},
     "input 'x' has no data: give data or binary_data_size"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1],
                  "parameters": {"shared_memory_region": "r"}}]},
     "input 'x': shared memory is not supported"),
    ({"inputs": {"name": "x"}}, '"inputs" must be a JSON array'),
    ({"id": 7, "inputs": []}, "id must be a string"),
    ({"parameters": {"p": None}, "inputs": []}, "parameters.p must be a boolean, a number"),
    ({"parameters": {"binary_data_output": 1}, "inputs": []},
     "parameters.binary_data_output must be true or false"),
    ({"inputs": [], "outputs": [{"parameters": {}}]}, "outputs[0].name must be a string"),
]  # fmt: skip


@pytest.mark.parametrize(("document", "error"), BAD_JSON)
def test_bad_json_requests_are_400_naming_the_problem(
    gateway: httpx.Client, state: State, document: dict[str, Any], error: str
) -> None:
    response = gateway.post(INFER, json=document)
    assert response.status_code == 400
    assert set(response.json()) == {"error"}
    assert response.json()["error"].startswith(error), response.json()
    assert state.infer_requests == []


def _sized(size: int) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                        "parameters": {"binary_data_size": size}}]}  # fmt: skip


BAD_BINARY = [
    (_sized(7), b"\x00" * 7, None, "input 'x': 7 bytes of FP32 data, but shape [2] needs 8"),
    (_sized(8), b"\x00" * 4, None, "input 'x': binary_data_size 8 goes past the end"),
    (_sized(8), b"\x00" * 9, None, "the body has 1 bytes of binary data that no input"),
    (_sized(8), b"\x00" * 8, "99999", "Inference-Header-Content-Length '99999' must be"),
    (_sized(8), b"\x00" * 8, "-1", "Inference-Header-Content-Length '-1' must be"),
    ({"inputs": [{"name": "s", "shape": [2], "datatype": "BYTES",
                  "parameters": {"binary_data_size": 6}}]},
     b"\x01\x00\x00\x00a\x05", None, "input 's': BYTES data ends inside an element's length"),
    ({"inputs": [{"name": "s", "shape": [2], "datatype": "BYTES",
                  "parameters": {"binary_data_size": 5}}]},
     b"\x01\x00\x00\x00a", None, "input 's': BYTES data holds 1 elements, not 2"),
]  # fmt: skip


@pytest.mark.parametrize(("document", "blob", "length", "error"), BAD_BINARY)
def test_bad_binary_requests_are_400(
    gateway: httpx.Client,
    state: State,
    document: dict[str, Any],
    blob: bytes,
    length: str | None,
    error: str,
) -> None:
    content, headers = binary_body(document, blob)
    if length is not None:
        headers[HEADER] = length
    response = gateway.post(INFER, content=content, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"].startswith(error), response.json()
    assert state.infer_requests == []


def test_bodies_that_are_not_json(gateway: httpx.Client, state: State) -> None:
    for content, error in [
        (b"", 'an infer request needs a JSON body with "inputs"'),
        (b"{", "the inference request is not valid JSON"),
        (b"[1]", "the inference request must be a JSON object"),
        (b"\xff", "the inference request is not valid UTF-8"),
        # Valid JSON, but no text: a lone surrogate cannot name a parameter.
        (b'{"parameters": {"\\ud800": 1}, "inputs": []}', "parameters name '\\ud800' holds"),
        (b'{"inputs": [{"name": "\\udfff"}]}', "inputs[0].name holds a lone UTF-16"),
    ]:
        response = gateway.post(INFER, content=content)
        assert (response.status_code, response.json()["error"][: len(error)]) == (400, error)
    big = gateway.post(INFER, content=b" " * (LIMIT + 1))
    assert big.status_code == 413 and "larger than" in big.json()["error"]


# Errors from the upstream, and the gateway's own ---------------------------------------


@pytest.mark.parametrize(
    ("model", "fail", "status", "error"),
    [
        ("nope", None, 404, "model 'nope' is not found"),
        ("cold", None, 503, "model 'cold' is not ready"),
        ("doubler", "RESOURCE_EXHAUSTED", 429, "failing as asked"),
        ("doubler", "INVALID_ARGUMENT", 400, "failing as asked"),
        ("doubler", "INTERNAL", 500, "failing as asked"),
    ],
)
def test_upstream_errors_are_error_json(
    http: httpx.Client, state: State, model: str, fail: str | None, status: int, error: str
) -> None:
    body = _one("FP32", [1], [1])
    if fail:
        body["parameters"] = {"fail": fail}
    response = http.post(f"/v2/models/{model}/infer", json=body)
    assert (response.status_code, response.json()) == (status, {"error": error})
    assert response.headers["content-type"] == "application/json"


def test_request_id_deadline_and_bad_timeout(gateway: httpx.Client, state: State) -> None:
    response = gateway.get("/v2/health/live", headers={"X-Request-Id": "oip-7"})
    assert response.headers["x-request-id"] == "oip-7"
    body = _one("FP32", [1], [1])
    answered = gateway.post(INFER, json=body, headers={"Grpc-Timeout": "5S", "X-Request-Id": "i"})
    assert answered.status_code == 200 and answered.headers["x-request-id"] == "i"
    bad = gateway.post(INFER, json=body, headers={"Grpc-Timeout": "soon"})
    assert bad.status_code == 400
    assert bad.json() == {"error": "Grpc-Timeout 'soon' is not like '10S' or '250m'"}


def test_unmatched_paths_keep_the_gateways_error(gateway: httpx.Client) -> None:
    # No binding, so no codec: the gateway's google.rpc.Status, as for any path.
    response = gateway.get("/v2/models/doubler/stats")
    assert response.status_code == 404 and response.json()["code"] == 5


# Repository --------------------------------------------------------------------------


def test_repository_index(http: httpx.Client, state: State) -> None:
    everything = [
        {"name": "doubler", "version": "1", "state": "READY"},
        {"name": "cold", "state": "UNAVAILABLE", "reason": "not loaded"},
    ]
    for content in (b"", b"{}"):
        response = http.post("/v2/repository/index", content=content)
        assert (response.status_code, response.json()) == (200, everything)
    ready = http.post("/v2/repository/index", json={"ready": True})
    assert ready.json() == everything[:1]


def test_repository_load_and_unload(http: httpx.Client, state: State) -> None:
    for content in (b"", b"{}"):
        response = http.post("/v2/repository/models/doubler/load", content=content)
        assert (response.status_code, response.json()) == (200, {})
    parameters = {"config": '{"max_batch_size": 4}', "file:1/model.pt": "AAEC", "n": 2}
    response = http.post("/v2/repository/models/doubler/load", json={"parameters": parameters})
    assert response.status_code == 200
    load = state.loads[-1]
    assert load.model_name == "doubler"
    assert load.parameters["config"].string_param == '{"max_batch_size": 4}'
    assert load.parameters["file:1/model.pt"].bytes_param == b"\x00\x01\x02"
    assert load.parameters["n"].int64_param == 2
    unload = http.post(
        "/v2/repository/models/doubler/unload", json={"parameters": {"unload_dependents": False}}
    )
    assert (unload.status_code, unload.json()) == (200, {})
    assert state.unloads[-1].parameters["unload_dependents"].WhichOneof("parameter_choice") == (
        "bool_param"
    )
    missing = http.post("/v2/repository/models/nope/load", content=b"")
    assert (missing.status_code, missing.json()) == (404, {"error": "model 'nope' is not found"})
    bad = http.post(
        "/v2/repository/models/doubler/load", json={"parameters": {"file:x": "not base64!"}}
    )
    assert (bad.status_code, bad.json()) == (400, {"error": "parameters.file:x must be base64"})


# OpenAPI, metrics, and turning the codec off -----------------------------------------


def test_openapi_shows_v2_schemas(gateway: httpx.Client) -> None:
    document = gateway.get("/openapi.json").json()
    OpenAPIV31SpecValidator(document).validate()
    infer = document["paths"]["/v2/models/{model_name}/infer"]["post"]
    assert infer["x-codec"] == "oip"
    assert infer["x-grpc-method"] == "/inference.GRPCInferenceService/ModelInfer"
    content = infer["requestBody"]["content"]
    assert content["application/json"]["schema"] == {
        "$ref": "#/components/schemas/oip.v2.InferenceRequest"
    }
    assert "application/octet-stream" in content
    assert [p["name"] for p in infer["parameters"]] == [
        "model_name",
        "Inference-Header-Content-Length",
    ]
    live = document["paths"]["/v2/health/live"]["get"]["responses"]
    assert set(live) == {"200", "400", "default"}
    schemas = document["components"]["schemas"]
    # No protobuf-mapping schema is advertised for the codec's methods.
    assert "inference.ModelInferRequest" not in schemas
    assert schemas["oip.v2.Error"]["required"] == ["error"]


def test_metrics_count_codec_routes(gateway: httpx.Client, state: State) -> None:
    gateway.post(INFER, json=_one("FP32", [1], [1]))
    text = gateway.get("/metrics").text
    line = (
        'protoserve_gateway_requests_total{method="POST",'
        'route="/v2/models/{model_name}/infer",status="200"}'
    )
    assert line in text


def test_the_codec_can_be_turned_off(upstream: Upstream, state: State) -> None:
    app = build_gateway(
        upstream.target,
        descriptors=oip_descriptors(),
        codecs={"inference.GRPCInferenceService": None},
    )
    for http in _client(app):
        # Protobuf's JSON mapping: false is a 200 like any answer, int64 shapes are strings.
        cold = http.get("/v2/models/cold/ready")
        assert (cold.status_code, cold.json()) == (200, {"ready": False})
        shape = http.get("/v2/models/doubler").json()["inputs"][0]["shape"]
        assert shape == ["-1", "4"]
        assert http.get("/v2").json()["extensions"] == ["model_repository"]
        assert http.get("/v2/models/nope/ready").json()["code"] == 5
