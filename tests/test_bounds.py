"""Every advertised bound of a generation parameter, over every way in.

For each bound a model advertises (``GetModel``'s ``ParameterSpec.minimum`` and
``maximum``, and the documented 256 characters of a stop sequence), a value at the
bound is served and the value one step past it is INVALID_ARGUMENT naming the
field. One step: the next float32 for float fields (v1 carries float32, the Open
Inference Protocol doubles; the next float32 past a bound is past it as a double
too), one for integers. Five ways in, all real: v1 gRPC unary and streaming, v1
through the gateway (JSON), the Open Inference Protocol over gRPC and through the
gateway (its JSON). Values a way in cannot carry (a negative number in a uint32
field over gRPC) are left out; through JSON they are sent and refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from protoserve.gateway import build_gateway
from protoserve.inference.v1 import inference_service_pb2 as v1
from protoserve.inference.v1 import inference_service_pb2_grpc as v1_grpc
from protoserve.oip.v2 import grpc_service_pb2 as oip
from protoserve.oip.v2 import grpc_service_pb2_grpc as oip_grpc
from tests._threads import UvicornThread, start_grpc_server, stop_grpc_server

MODEL = "bytelm"
PROMPT = "def "
#: The longest stop sequence, in characters (README, "The API"; ParameterSpec's description).
STOP_CHARS = 256
#: Fields of v1's GenerationParameters that are unsigned: gRPC cannot carry a negative.
UNSIGNED = {"max_new_tokens", "top_k", "seed"}


@dataclass
class Ways:
    v1: v1_grpc.InferenceServiceStub
    oip: oip_grpc.GRPCInferenceServiceStub
    http: httpx.Client


@pytest.fixture(scope="module")
def ways() -> Iterator[Ways]:
    thread, server = start_grpc_server([MODEL, "tests.server.models_for_tests:Scripted"])
    gateway = UvicornThread(build_gateway(f"127.0.0.1:{server.port}"))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        yield Ways(
            v1_grpc.InferenceServiceStub(channel), oip_grpc.GRPCInferenceServiceStub(channel), http
        )
    channel.close()
    gateway.stop()
    stop_grpc_server(thread, server)


@pytest.fixture(scope="module")
def specs(ways: Ways) -> dict[str, v1.ParameterSpec]:
    model = ways.v1.GetModel(v1.GetModelRequest(name=MODEL), timeout=30).model
    return {p.name: p for p in model.parameters}


@dataclass(frozen=True)
class Outcome:
    """What a caller saw: the generated text, or the fields an INVALID_ARGUMENT named."""

    text: str | None = None
    refused: frozenset[str] = frozenset()


# ----------------------------------------------------------------------------- five ways in


def _v1_message(params: dict[str, Any]) -> v1.GenerationParameters:
    return v1.GenerationParameters(**params)


def _grpc_refusal(err: grpc.RpcError) -> Outcome:
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status details on the error"
    fields = set()
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields |= {v.field for v in bad.field_violations}
    return Outcome(refused=frozenset(fields))


def v1_unary(ways: Ways, params: dict[str, Any]) -> Outcome:
    request = v1.GenerateRequest(model=MODEL, inputs=PROMPT, parameters=_v1_message(params))
    try:
        return Outcome(text=ways.v1.Generate(request, timeout=60).generated_text)
    except grpc.RpcError as err:
        return _grpc_refusal(err)


def v1_stream(ways: Ways, params: dict[str, Any]) -> Outcome:
    request = v1.GenerateStreamRequest(model=MODEL, inputs=PROMPT, parameters=_v1_message(params))
    try:
        messages = list(ways.v1.GenerateStream(request, timeout=60))
    except grpc.RpcError as err:
        return _grpc_refusal(err)
    assert messages[-1].finish_reason != v1.FINISH_REASON_UNSPECIFIED
    return Outcome(text="".join(m.text for m in messages))


def _json_params(params: dict[str, Any]) -> dict[str, Any]:
    # proto3 JSON writes 64-bit integers as strings; both forms parse.
    return {k: str(v) if k == "seed" else v for k, v in params.items()}


def v1_http(ways: Ways, params: dict[str, Any]) -> Outcome:
    response = ways.http.post(
        f"/v1/models/{MODEL}:generate",
        json={"inputs": PROMPT, "parameters": _json_params(params)},
    )
    body = response.json()
    if response.status_code == 200:
        return Outcome(text=body["generated_text"])
    assert (response.status_code, body["code"]) == (400, grpc.StatusCode.INVALID_ARGUMENT.value[0])
    fields = {
        v["field"]
        for d in body["details"]
        if d["@type"].endswith("google.rpc.BadRequest")
        for v in d["fieldViolations"]
    }
    return Outcome(refused=frozenset(fields))


def _oip_parameter(value: Any) -> oip.InferParameter:
    if isinstance(value, list):
        return oip.InferParameter(string_param=json.dumps(value))
    if isinstance(value, float):
        return oip.InferParameter(double_param=value)
    if value > 2**63 - 1:
        return oip.InferParameter(uint64_param=value)
    return oip.InferParameter(int64_param=value)


def _text_of(data: bytes) -> str:
    (size,) = np.frombuffer(data[:4], "<u4")
    return data[4 : 4 + int(size)].decode()


def oip_grpc_infer(ways: Ways, params: dict[str, Any]) -> Outcome:
    request = oip.ModelInferRequest(
        model_name=MODEL,
        inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name="text_input",
                datatype="BYTES",
                shape=[1],
                contents=oip.InferTensorContents(bytes_contents=[PROMPT.encode()]),
            )
        ],
        parameters={k: _oip_parameter(v) for k, v in params.items()},
    )
    try:
        response = ways.oip.ModelInfer(request, timeout=60)
    except grpc.RpcError as err:
        return _grpc_refusal(err)
    return Outcome(text=_text_of(response.raw_output_contents[0]))


def oip_http_infer(ways: Ways, params: dict[str, Any]) -> Outcome:
    parameters = {k: json.dumps(v) if isinstance(v, list) else v for k, v in params.items()}
    response = ways.http.post(
        f"/v2/models/{MODEL}/infer",
        json={
            "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [PROMPT]}],
            "parameters": parameters,
        },
    )
    body = response.json()
    if response.status_code == 200:
        (output,) = body["outputs"]
        return Outcome(text=output["data"][0])
    # The protocol's REST error is {"error": message}; the message names each field.
    assert response.status_code == 400, body
    assert set(body) == {"error"}, body
    named = {f"parameters.{name}" for name in params if f"parameters.{name} " in body["error"]}
    return Outcome(refused=frozenset(named))


WAYS: dict[str, Callable[[Ways, dict[str, Any]], Outcome]] = {
    "v1-grpc": v1_unary,
    "v1-grpc-stream": v1_stream,
    "v1-http": v1_http,
    "oip-grpc": oip_grpc_infer,
    "oip-http": oip_http_infer,
}
GRPC_WAYS = {"v1-grpc", "v1-grpc-stream"}


# ----------------------------------------------------------------------------- the bounds


def _step(value: float, toward: float) -> float:
    """The float32 next to ``value`` in the direction of ``toward``, as a Python float."""
    return float(np.nextafter(np.float32(value), np.float32(toward)))


@dataclass(frozen=True)
class Bound:
    """One side of one parameter's range: a value on it and the value one step past."""

    name: str
    side: str  # "minimum" or "maximum"

    def values(self, spec: v1.ParameterSpec) -> tuple[Any, Any]:
        limit = getattr(spec, self.side)
        outward = -math.inf if self.side == "minimum" else math.inf
        if spec.type == v1.PARAMETER_TYPE_FLOAT:
            return limit, _step(limit, outward)
        on = int(limit) if abs(limit) < 2**53 else 2**63 - 1  # a double cannot hold 2**63 - 1
        return on, on - 1 if self.side == "minimum" else on + 1


def _bounds() -> list[Bound]:
    sides = {
        "max_new_tokens": ("minimum", "maximum"),
        "temperature": ("minimum", "maximum"),
        "top_k": ("minimum",),  # no maximum: any k is served
        "top_p": ("minimum", "maximum"),
        "seed": ("minimum", "maximum"),
    }
    return [Bound(name, side) for name, both in sides.items() for side in both]


def test_every_numeric_bound_is_covered_here(specs: dict[str, v1.ParameterSpec]) -> None:
    """A bound the model starts to advertise fails this until it is in _bounds()."""
    advertised = {
        (name, side)
        for name, spec in specs.items()
        if spec.type != v1.PARAMETER_TYPE_STRING_LIST
        for side in ("minimum", "maximum")
        if spec.HasField(side)
    }
    assert advertised == {(b.name, b.side) for b in _bounds()}


def _settle(params: dict[str, Any], greedy_first: str) -> dict[str, Any]:
    """Parameters that make a served call cheap: one token, unless max_new_tokens is the
    value under test; then a stop sequence on the first greedy character ends it."""
    settled = {"temperature": 0.0, "seed": 1, **params}
    if "max_new_tokens" not in params:
        settled["max_new_tokens"] = 1
    elif params["max_new_tokens"] > 1:
        settled["stop_sequences"] = [greedy_first]
    return settled


@pytest.fixture(scope="module")
def greedy_first(ways: Ways) -> str:
    """The first character bytelm generates from PROMPT, greedily."""
    text = v1_unary(ways, {"max_new_tokens": 1, "temperature": 0.0}).text
    assert text, "the greedy first token is not a whole character"
    return text


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("bound", _bounds(), ids=lambda b: f"{b.name}-{b.side}")
def test_a_value_on_the_bound_is_served_and_one_step_past_is_refused(
    ways: Ways, specs: dict[str, v1.ParameterSpec], greedy_first: str, bound: Bound, way: str
) -> None:
    on, past = bound.values(specs[bound.name])
    call = WAYS[way]
    served = call(ways, _settle({bound.name: on}, greedy_first))
    assert served.text is not None, f"{bound.name}={on!r} was refused: {served.refused}"
    if way in GRPC_WAYS and bound.name in UNSIGNED and past < 0:
        # The field is unsigned: the message itself refuses the value, before any call.
        with pytest.raises(ValueError):
            v1.GenerationParameters(**{bound.name: past})
    else:
        refused = call(ways, _settle({bound.name: past}, greedy_first))
        assert refused.refused == {f"parameters.{bound.name}"}, f"{bound.name}={past!r}"


@pytest.mark.parametrize("way", WAYS)
def test_max_new_tokens_at_its_limit_runs_to_the_stop(
    ways: Ways, specs: dict[str, v1.ParameterSpec], greedy_first: str, way: str
) -> None:
    """The limit is served as a generation, not only validated: it ends on its stop."""
    limit = int(specs["max_new_tokens"].maximum)
    outcome = WAYS[way](ways, _settle({"max_new_tokens": limit}, greedy_first))
    assert outcome.text == ""  # the stop sequence is the first character; the text ends before it


@pytest.mark.parametrize("way", WAYS)
def test_stop_sequence_count_and_length_bounds(
    ways: Ways, specs: dict[str, v1.ParameterSpec], way: str
) -> None:
    most = int(specs["stop_sequences"].maximum)
    assert most == 8  # README, "The API"
    call = WAYS[way]
    cases = {
        "count": ([f"<{i}>" for i in range(most)], [f"<{i}>" for i in range(most + 1)]),
        "length": (["x" * STOP_CHARS], ["x" * (STOP_CHARS + 1)]),
        "empty": (["\n\n"], ["\n\n", ""]),
    }
    for case, (fine, bad) in cases.items():
        served = call(ways, {"max_new_tokens": 1, "stop_sequences": fine})
        assert served.text is not None, f"{case}: {served.refused}"
        refused = call(ways, {"max_new_tokens": 1, "stop_sequences": bad})
        assert refused.refused == {"parameters.stop_sequences"}, case


def test_a_multibyte_stop_sequence_counts_characters_not_bytes(ways: Ways) -> None:
    """256 characters of four UTF-8 bytes each are 1,024 bytes, and still within the limit."""
    assert (
        v1_unary(ways, {"max_new_tokens": 1, "stop_sequences": ["🙂" * STOP_CHARS]}).text
        is not None
    )
    refused = v1_unary(ways, {"max_new_tokens": 1, "stop_sequences": ["🙂" * (STOP_CHARS + 1)]})
    assert refused.refused == {"parameters.stop_sequences"}


def test_top_p_zero_keeps_only_the_most_likely_token(ways: Ways) -> None:
    """top_p 0 is greedy decoding at any temperature and seed (OpenAI's reading of it)."""
    greedy = v1_unary(ways, {"max_new_tokens": 16, "temperature": 0.0}).text
    for seed in (1, 2, 3):
        nucleus = v1_unary(
            ways, {"max_new_tokens": 16, "temperature": 2.0, "top_p": 0.0, "seed": seed}
        )
        assert nucleus.text == greedy, seed
    # The same parameters without top_p 0 sample: some seed differs from greedy.
    sampled = {
        v1_unary(ways, {"max_new_tokens": 16, "temperature": 2.0, "seed": seed}).text
        for seed in (1, 2, 3)
    }
    assert sampled != {greedy}


# The stop sequence against the length limit, over the wire: Scripted says
# "héllo wörld. STOP here. 🙂 end" a byte a token.
SCRIPT_TO_STOP = "héllo wörld. STOP here. 🙂"


@pytest.mark.parametrize(
    ("limit", "text", "finish"),
    [
        # The last allowed token completes the stop (🙂's fourth byte): the stop wins.
        (len(SCRIPT_TO_STOP.encode()), "héllo wörld. STOP here", "STOP_SEQUENCE"),
        # The limit falls inside 🙂: no stop, the held-back ". " is text, the cut byte U+FFFD.
        (len(SCRIPT_TO_STOP.encode()) - 1, "héllo wörld. STOP here. \ufffd", "LENGTH"),
    ],
    ids=["stop-on-the-last-token", "limit-inside-the-character"],
)
def test_a_stop_sequence_against_the_length_limit(
    ways: Ways, limit: int, text: str, finish: str
) -> None:
    params = v1.GenerationParameters(max_new_tokens=limit, stop_sequences=[". 🙂"])
    unary = ways.v1.Generate(
        v1.GenerateRequest(model="scripted", inputs="", parameters=params), timeout=30
    )
    assert (unary.generated_text, v1.FinishReason.Name(unary.finish_reason)) == (
        text,
        f"FINISH_REASON_{finish}",
    )
    assert unary.usage.completion_tokens == limit
    stream = list(
        ways.v1.GenerateStream(
            v1.GenerateStreamRequest(model="scripted", inputs="", parameters=params), timeout=30
        )
    )
    assert "".join(m.text for m in stream) == text
    assert stream[-1].finish_reason == unary.finish_reason
    response = ways.http.post(
        "/v1/models/scripted:generate",
        json={"inputs": "", "parameters": {"max_new_tokens": limit, "stop_sequences": [". 🙂"]}},
    )
    assert response.json()["generated_text"] == text
    assert response.json()["finish_reason"] == f"FINISH_REASON_{finish}"
