"""The gateway through real HTTP (uvicorn) in front of a real gRPC server."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from protoserve.gateway._app import build_gateway
from tests._threads import UvicornThread
from tests.gateway.conftest import Stack
from tests.server.models_for_tests import Scripted, Slow

GENERATE = "/v1/models/{}:generate"
STREAM = "/v1/models/{}:generateStream"


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Events as a browser parses them: fields until a blank line; comments skipped."""
    event: dict[str, Any] = {}
    for line in lines:
        if not line:
            if event:
                yield event
            event = {}
        elif line.startswith(":"):
            event.setdefault("comments", []).append(line)
        else:
            key, _, value = line.partition(":")
            event[key] = value.removeprefix(" ")
    if event:
        yield event


def status_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) >= {"code", "message", "details"}, body
    return body


def detail(body: dict[str, Any], kind: str) -> dict[str, Any]:
    found = [d for d in body["details"] if d["@type"].endswith(kind)]
    assert found, body
    return found[0]


def test_generate_returns_json_with_proto_field_names(http: httpx.Client) -> None:
    response = http.post(
        GENERATE.format("bytelm"),
        json={"inputs": "def ", "parameters": {"max_new_tokens": 8, "seed": 1}},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["finish_reason"] == "FINISH_REASON_LENGTH"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12}
    assert isinstance(body["generated_text"], str) and len(body["token_ids"]) == 8
    assert len(response.headers["x-request-id"]) == 32
    again = http.post(
        GENERATE.format("bytelm"),
        json={"inputs": "def ", "parameters": {"maxNewTokens": 8, "seed": "1"}},
    )
    assert again.json()["generated_text"] == body["generated_text"]


def test_request_id_is_passed_through(http: httpx.Client) -> None:
    response = http.get("/v1/models/bytelm", headers={"X-Request-Id": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"


def test_list_and_get_models(http: httpx.Client) -> None:
    models = http.get("/v1/models").json()["models"]
    assert "bytelm" in [m["name"] for m in models]
    model = http.get("/v1/models/bytelm").json()["model"]
    assert model["state"] == "MODEL_STATE_READY"
    assert {p["name"] for p in model["parameters"]} >= {"max_new_tokens", "seed"}


def test_unknown_model_is_404_with_typed_details(http: httpx.Client) -> None:
    response = http.get("/v1/models/gpt-9")
    assert response.status_code == 404
    body = status_of(response)
    assert body["code"] == 5 and "gpt-9" in body["message"]
    assert detail(body, "google.rpc.ResourceInfo")["resourceName"] == "gpt-9"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"inputs": "x", "parameters": {"temperature": -1}}, "parameters.temperature"),
        ({"inputs": "x", "parameters": {"max_new_tokens": 0}}, "parameters.max_new_tokens"),
    ],
)
def test_invalid_parameters_are_400_with_field_violations(
    http: httpx.Client, body: Any, field: str
) -> None:
    response = http.post(GENERATE.format("bytelm"), json=body)
    assert response.status_code == 400
    violations = detail(status_of(response), "google.rpc.BadRequest")["fieldViolations"]
    assert field in [v["field"] for v in violations]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b'{"inputs": "x",', "JSON"),
        (b'{"inputs": "x", "bogus": 1}', "bogus"),
        (b'{"inputs": 5}', "inputs"),
        (b'{"inputs": "x", "parameters": {"max_new_tokens": "many"}}', "max_new_tokens"),
        (b"[1, 2]", ""),
        (b'{"inputs": "\xff"}', ""),
    ],
)
def test_malformed_bodies_are_400_naming_the_field(
    http: httpx.Client, content: bytes, needle: str
) -> None:
    response = http.post(
        GENERATE.format("bytelm"), content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert needle in status_of(response)["message"]


def test_body_over_the_limit_is_413(http: httpx.Client) -> None:
    response = http.post(GENERATE.format("bytelm"), json={"inputs": "x" * 100_000})
    assert response.status_code == 413
    assert status_of(response)["code"] == 8


def test_unknown_route_404_and_wrong_verb_405_with_allow(http: httpx.Client) -> None:
    missing = http.get("/v2/nothing/here")
    assert missing.status_code == 404 and status_of(missing)["code"] == 5
    wrong = http.delete(GENERATE.format("bytelm"))
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"
    status_of(wrong)


def test_content_type_is_not_in_the_way_of_json_but_multipart_is_415(http: httpx.Client) -> None:
    # curl -d says application/x-www-form-urlencoded: the body is JSON all the same.
    body = b'{"parameters": {"max_new_tokens": 1}}'
    curlish = http.post(
        GENERATE.format("scripted"),
        content=body,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert curlish.status_code == 200
    for kind in ("multipart/form-data; boundary=x", "application/x-protobuf"):
        response = http.post(
            GENERATE.format("scripted"), content=body, headers={"content-type": kind}
        )
        assert response.status_code == 415
        assert status_of(response)["code"] == 3


def test_sse_streams_every_message_then_done(http: httpx.Client) -> None:
    with http.stream(
        "POST",
        STREAM.format("scripted"),
        json={"inputs": ""},
        headers={"Accept": "text/event-stream"},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["cache-control"] == "no-cache"
        events = list(sse_events(response.iter_lines()))
    messages = [e for e in events if e.get("event") == "message"]
    assert [int(e["id"]) for e in messages] == list(range(1, len(messages) + 1))
    assert len(messages) == len(Scripted.script) + 1
    text = "".join(json.loads(e["data"])["text"] for e in messages)
    assert text == Scripted.script.decode()
    assert json.loads(messages[-1]["data"])["finish_reason"] == "FINISH_REASON_END_OF_TEXT"
    assert events[-1]["event"] == "done"


def test_sse_get_binding_takes_query_parameters(http: httpx.Client) -> None:
    with http.stream(
        "GET",
        STREAM.format("scripted"),
        params={
            "inputs": "",
            "parameters.max_new_tokens": "5",
            "parameters.stop_sequences": ["zz", "yy"],
        },
        headers={"Accept": "text/event-stream"},
    ) as response:
        events = list(sse_events(response.iter_lines()))
    messages = [json.loads(e["data"]) for e in events if e.get("event") == "message"]
    assert len(messages) == 5 and messages[-1]["usage"]["completion_tokens"] == 5
    assert events[-1]["event"] == "done"


def test_events_arrive_as_they_are_produced(http: httpx.Client) -> None:
    """The first event comes long before the stream could have finished: no buffering."""
    started = time.monotonic()
    with http.stream(
        "POST",
        STREAM.format("slow"),
        json={"parameters": {"max_new_tokens": 150}},
        headers={"Accept": "text/event-stream"},
    ) as response:
        events = sse_events(response.iter_lines())
        first = next(e for e in events if e.get("event") == "message")
        first_at = time.monotonic() - started
        rest = list(events)
    total = time.monotonic() - started
    assert json.loads(first["data"])["text"] == "x"
    assert rest[-1]["event"] == "done"
    assert first_at < total / 2, (first_at, total)  # 150 steps of 20 ms: ~3 s in all


def test_keepalive_comments_while_the_upstream_is_silent(http: httpx.Client) -> None:
    # keepalive is 0.5 s in this stack; the model is silent for 1.2 s mid-stream.
    with http.stream(
        "POST", STREAM.format("pausing"), json={}, headers={"Accept": "text/event-stream"}
    ) as response:
        events = list(sse_events(response.iter_lines()))
    kinds = [e.get("event", "comment") for e in events]
    assert kinds[0] == "message" and kinds[-1] == "done"
    between = kinds[1 : kinds.index("message", 1)]
    assert between and set(between) == {"comment"}, kinds
    assert events[1]["comments"] == [": keep-alive"]


def test_eventsource_reconnect_is_told_to_stop(http: httpx.Client) -> None:
    response = http.get(
        STREAM.format("scripted"),
        params={"inputs": "x"},
        headers={"Accept": "text/event-stream", "Last-Event-ID": "31"},
    )
    assert response.status_code == 204 and response.content == b""


def test_ndjson_without_event_stream_accept(http: httpx.Client) -> None:
    response = http.post(STREAM.format("scripted"), json={"parameters": {"max_new_tokens": 3}})
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert len(lines) == 3 and lines[-1]["finish_reason"] == "FINISH_REASON_LENGTH"


def test_error_after_the_stream_started_is_an_error_event(http: httpx.Client) -> None:
    with http.stream(
        "POST", STREAM.format("exploding"), json={}, headers={"Accept": "text/event-stream"}
    ) as response:
        assert response.status_code == 200
        events = list(sse_events(response.iter_lines()))
    assert [e["event"] for e in events] == ["message", "error"]
    status = json.loads(events[-1]["data"])
    assert status["code"] == 13 and "request id" in status["message"]
    ndjson = http.post(STREAM.format("exploding"), json={})
    last = json.loads(ndjson.text.splitlines()[-1])
    assert last["error"]["code"] == 13


def test_error_before_the_stream_started_gets_its_http_status(http: httpx.Client) -> None:
    response = http.post(STREAM.format("nope"), json={}, headers={"Accept": "text/event-stream"})
    assert response.status_code == 404
    assert status_of(response)["code"] == 5


def test_deadline_headers_become_grpc_deadlines(http: httpx.Client) -> None:
    body = {"parameters": {"max_new_tokens": 500}}
    for headers in ({"X-Request-Timeout": "0.2"}, {"Grpc-Timeout": "200m"}):
        started = time.monotonic()
        response = http.post(GENERATE.format("slow"), json=body, headers=headers)
        assert response.status_code == 504, response.text
        assert status_of(response)["code"] == 4
        assert time.monotonic() - started < 3
    bad = http.post(GENERATE.format("slow"), json=body, headers={"Grpc-Timeout": "soon"})
    assert bad.status_code == 400


def test_full_queue_is_429_with_retry_after(stack: Stack, http: httpx.Client) -> None:
    # max_active=2, max_queue=2: four slow streams fill the model.
    import grpc

    from protoserve.inference.v1 import inference_service_pb2 as pb
    from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(stack.grpc_target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        streams = [
            stub.GenerateStream(
                pb.GenerateStreamRequest(
                    model="slow", parameters=pb.GenerationParameters(max_new_tokens=1000)
                ),
                timeout=30,
            )
            for _ in range(4)
        ]
        try:
            entry = stack.server.runtime.get_model("slow")
            deadline = time.monotonic() + 10
            while entry.scheduler.depth + entry.scheduler.active < 4:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            response = http.post(GENERATE.format("slow"), json={})
            assert response.status_code == 429
            assert response.headers["retry-after"] == "1"
            assert detail(status_of(response), "google.rpc.RetryInfo")
        finally:
            for s in streams:
                s.cancel()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_upstream_is_503_not_a_hang() -> None:
    gateway = UvicornThread(build_gateway(f"127.0.0.1:{closed_port()}"))
    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            started = time.monotonic()
            response = client.post(GENERATE.format("bytelm"), json={"inputs": "x"})
            assert response.status_code == 503
            assert status_of(response)["code"] == 14
            assert time.monotonic() - started < 10
            assert client.get("/readyz").status_code == 503
            assert client.get("/healthz").status_code == 200
    finally:
        gateway.stop()


def test_health_endpoints(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    for path in ("/healthz", "/openapi.json", "/docs"):
        assert len(http.get(path).headers["x-request-id"]) == 32
    assert http.get("/docs", headers={"X-Request-Id": "mine"}).headers["x-request-id"] == "mine"
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "SERVING"}


def test_closing_the_connection_mid_stream_cancels_the_generation(stack: Stack) -> None:
    Slow.closed.clear()
    entry = stack.server.runtime.get_model("slow")
    with (
        httpx.Client(base_url=stack.url, timeout=30) as client,
        client.stream(
            "POST",
            STREAM.format("slow"),
            json={"parameters": {"max_new_tokens": 1000}},
            headers={"Accept": "text/event-stream"},
        ) as response,
    ):
        lines = response.iter_lines()
        next(e for e in sse_events(lines) if e.get("event") == "message")
    closed_at = time.monotonic()  # leaving both blocks closed the connection
    assert Slow.closed.wait(5), "the server kept generating after the client left"
    assert time.monotonic() - closed_at < 3
    steps = Slow.steps
    time.sleep(0.2)
    assert Slow.steps == steps and entry.scheduler.active == 0


def test_closing_the_connection_during_a_unary_call_cancels_it(stack: Stack) -> None:
    Slow.closed.clear()
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=stack.url) as client:
        client.post(
            GENERATE.format("slow"), json={"parameters": {"max_new_tokens": 1000}}, timeout=0.5
        )
    assert Slow.closed.wait(5), "the server kept generating after the client left"


def test_served_openapi_validates_and_lists_every_rpc_with_its_comment(
    http: httpx.Client,
) -> None:
    from openapi_spec_validator import validate

    from protoserve.inference.v1 import inference_service_pb2 as pb

    document = http.get("/openapi.json").json()
    validate(document)
    assert document["openapi"].startswith("3.1")
    operations = {
        op["operationId"]: op
        for item in document["paths"].values()
        for op in item.values()
        if isinstance(op, dict) and "operationId" in op
    }
    for method in pb.DESCRIPTOR.services_by_name["InferenceService"].methods:
        operation = operations[f"InferenceService_{method.name}"]
        text = operation.get("summary", "") + operation.get("description", "")
        assert text.startswith(method.name), (method.name, text)
    docs = http.get("/docs")
    assert docs.status_code == 200 and "openapi.json" in docs.text
