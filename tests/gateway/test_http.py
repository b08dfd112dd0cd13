"""The gateway through real HTTP (uvicorn) in front of a real gRPC server."""

from __future__ import annotations

import json
import re
import socket
from typing import Any

import httpx
import pytest

from protoserve.gateway import build_gateway
from tests._observe import SlowCancelled, wait_until
from tests._sse import events
from tests._threads import UvicornThread
from tests.gateway.conftest import Stack
from tests.server.models_for_tests import Held, Scripted

GENERATE = "/v1/models/{}:generate"
STREAM = "/v1/models/{}:generateStream"
SSE = {"Accept": "text/event-stream"}


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
        "POST", STREAM.format("scripted"), json={"inputs": ""}, headers=SSE
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["cache-control"] == "no-cache"
        received = list(events(response.iter_bytes()))
    messages = [e for e in received if e.event == "message"]
    assert [int(e.id) for e in messages] == list(range(1, len(messages) + 1))
    assert len(messages) == len(Scripted.script) + 1
    text = "".join(json.loads(e.data)["text"] for e in messages)
    assert text == Scripted.script.decode()
    assert json.loads(messages[-1].data)["finish_reason"] == "FINISH_REASON_END_OF_TEXT"
    assert received[-1].event == "done"


# The exact bytes of each stream format, for `scripted` and `exploding`, whose output
# is fixed. A frame that changes by a byte (a blank line, a newline) fails here even
# where a lenient reader would still cope: browsers and clients are not lenient.
# Three tokens of `scripted`: "h", then the two bytes of "é" (its first byte alone
# is no whole character: no text yet).
SCRIPTED_SSE = (
    b"id: 1\nevent: message\n"
    b'data: {"text":"h","token_ids":[104],"finish_reason":"FINISH_REASON_UNSPECIFIED"}\n\n'
    b"id: 2\nevent: message\n"
    b'data: {"token_ids":[195],"text":"","finish_reason":"FINISH_REASON_UNSPECIFIED"}\n\n'
    b"id: 3\nevent: message\n"
    b'data: {"text":"\xc3\xa9","token_ids":[169],"finish_reason":"FINISH_REASON_LENGTH",'
    b'"usage":{"completion_tokens":3,"total_tokens":3,"prompt_tokens":0}}\n\n'
    b"event: done\ndata: {}\n\n"
)
SCRIPTED_NDJSON = (
    b'{"text":"h","token_ids":[104],"finish_reason":"FINISH_REASON_UNSPECIFIED"}\n'
    b'{"token_ids":[195],"text":"","finish_reason":"FINISH_REASON_UNSPECIFIED"}\n'
    b'{"text":"\xc3\xa9","token_ids":[169],"finish_reason":"FINISH_REASON_LENGTH",'
    b'"usage":{"completion_tokens":3,"total_tokens":3,"prompt_tokens":0}}\n'
)
# `exploding` says "A", then fails; the status names the request id it was sent.
EXPLODING_STATUS = (
    b'{"code":13,"message":"internal error; the server logged it with request id exact-1",'
    b'"details":[{"@type":"type.googleapis.com/google.rpc.RequestInfo","requestId":"exact-1"}]}'
)
EXPLODING_SSE = (
    b"id: 1\nevent: message\n"
    b'data: {"text":"A","token_ids":[65],"finish_reason":"FINISH_REASON_UNSPECIFIED"}\n\n'
    b"event: error\ndata: " + EXPLODING_STATUS + b"\n\n"
)
EXPLODING_NDJSON = (
    b'{"text":"A","token_ids":[65],"finish_reason":"FINISH_REASON_UNSPECIFIED"}\n'
    b'{"error":' + EXPLODING_STATUS + b"}\n"
)


@pytest.mark.parametrize(
    ("model", "accept", "media_type", "body"),
    [
        ("scripted", "text/event-stream", "text/event-stream; charset=utf-8", SCRIPTED_SSE),
        ("scripted", "*/*", "application/x-ndjson", SCRIPTED_NDJSON),
        ("exploding", "text/event-stream", "text/event-stream; charset=utf-8", EXPLODING_SSE),
        ("exploding", "*/*", "application/x-ndjson", EXPLODING_NDJSON),
    ],
    ids=["sse", "ndjson", "sse-error", "ndjson-error"],
)
def test_stream_bytes_are_exactly_the_framing(
    http: httpx.Client, model: str, accept: str, media_type: str, body: bytes
) -> None:
    response = http.post(
        STREAM.format(model),
        json={"parameters": {"max_new_tokens": 3}},
        headers={"Accept": accept, "X-Request-Id": "exact-1"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type
    assert response.content == body


def test_sse_get_binding_takes_query_parameters(http: httpx.Client) -> None:
    with http.stream(
        "GET",
        STREAM.format("scripted"),
        params={
            "inputs": "",
            "parameters.max_new_tokens": "5",
            "parameters.stop_sequences": ["zz", "yy"],
        },
        headers=SSE,
    ) as response:
        received = list(events(response.iter_bytes()))
    messages = [json.loads(e.data) for e in received if e.event == "message"]
    assert len(messages) == 5 and messages[-1]["usage"]["completion_tokens"] == 5
    assert received[-1].event == "done"


def test_events_arrive_as_they_are_produced(http: httpx.Client) -> None:
    """The first event comes while the model is still held before its second token: a
    gateway that buffered the stream would hand nothing over until the test let go."""
    Held.resume.clear()
    try:
        with http.stream("POST", STREAM.format("held"), json={}, headers=SSE) as response:
            received = events(response.iter_bytes())
            first = next(received)
            assert not Held.resume.is_set()
            Held.resume.set()
            rest = list(received)
    finally:
        Held.resume.set()
    assert first.event == "message" and json.loads(first.data)["text"] == "a"
    assert [e.event for e in rest] == ["message", "message", "done"]


def test_keepalive_comments_while_the_upstream_is_silent(http: httpx.Client) -> None:
    # keepalive is 0.5 s in this stack; `held` is silent between "a" and "b" until the test
    # has seen a keep-alive. How many more come is a matter of timing; where they come,
    # and their bytes, are not.
    frames = [
        b"id: 1\nevent: message\n"
        b'data: {"text":"a","token_ids":[97],"finish_reason":"FINISH_REASON_UNSPECIFIED"}\n\n',
        b"id: 2\nevent: message\n"
        b'data: {"text":"b","token_ids":[98],"finish_reason":"FINISH_REASON_UNSPECIFIED"}\n\n',
        b"id: 3\nevent: message\n"
        b'data: {"finish_reason":"FINISH_REASON_END_OF_TEXT",'
        b'"usage":{"completion_tokens":2,"total_tokens":2,"prompt_tokens":0},'
        b'"text":"","token_ids":[]}\n\n',
        b"event: done\ndata: {}\n\n",
    ]
    keepalive = b": keep-alive\n\n"
    Held.resume.clear()
    body = b""
    try:
        with http.stream("POST", STREAM.format("held"), json={}, headers=SSE) as response:
            chunks = response.iter_bytes()
            for chunk in chunks:
                body += chunk
                if keepalive in body:
                    break
            Held.resume.set()
            body += b"".join(chunks)
    finally:
        Held.resume.set()
    keepalives = b"(?:" + re.escape(keepalive) + b")"
    # At least one in the pause; a loaded machine may add some between the later events.
    expected = re.escape(frames[0]) + keepalives + b"+"
    expected += (keepalives + b"*").join(re.escape(frame) for frame in frames[1:])
    assert re.fullmatch(expected, body), body


def test_eventsource_reconnect_is_told_to_stop(http: httpx.Client) -> None:
    response = http.get(
        STREAM.format("scripted"),
        params={"inputs": "x"},
        headers={**SSE, "Last-Event-ID": "31"},
    )
    assert response.status_code == 204 and response.content == b""


def test_ndjson_without_event_stream_accept(http: httpx.Client) -> None:
    response = http.post(STREAM.format("scripted"), json={"parameters": {"max_new_tokens": 3}})
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert len(lines) == 3 and lines[-1]["finish_reason"] == "FINISH_REASON_LENGTH"


def test_error_after_the_stream_started_is_an_error_event(http: httpx.Client) -> None:
    with http.stream("POST", STREAM.format("exploding"), json={}, headers=SSE) as response:
        assert response.status_code == 200
        received = list(events(response.iter_bytes()))
    assert [e.event for e in received] == ["message", "error"]
    status = json.loads(received[-1].data)
    assert status["code"] == 13 and "request id" in status["message"]
    ndjson = http.post(STREAM.format("exploding"), json={})
    last = json.loads(ndjson.text.splitlines()[-1])
    assert last["error"]["code"] == 13


def test_error_before_the_stream_started_gets_its_http_status(http: httpx.Client) -> None:
    response = http.post(STREAM.format("nope"), json={}, headers=SSE)
    assert response.status_code == 404
    assert status_of(response)["code"] == 5


def test_deadline_headers_become_grpc_deadlines(stack: Stack, http: httpx.Client) -> None:
    body = {"parameters": {"max_new_tokens": 500}}
    # 1 s: long enough that the call reaches the model on a busy machine (the test waits
    # for its cancellation), far short of the 10 s the generation would take.
    for headers in ({"X-Request-Timeout": "1"}, {"Grpc-Timeout": "1000m"}):
        cancelled = SlowCancelled(stack.server)
        response = http.post(GENERATE.format("slow"), json=body, headers=headers)
        assert response.status_code == 504, response.text
        assert status_of(response)["code"] == 4
        # The deadline reached the server: it cancelled the generation short of its 500
        # steps, instead of running it out behind the 504.
        cancelled.wait(asked=500)
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
            wait_until(
                lambda: entry.scheduler.depth + entry.scheduler.active == 4,
                "four streams on the slow model",
            )
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
            # UNAVAILABLE from the refused connection, not a deadline (504) or the
            # client's 30 s timeout: the gateway does not wait for the upstream to appear.
            response = client.post(GENERATE.format("bytelm"), json={"inputs": "x"})
            assert response.status_code == 503
            assert status_of(response)["code"] == 14
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
    cancelled = SlowCancelled(stack.server)
    with (
        httpx.Client(base_url=stack.url, timeout=30) as client,
        client.stream(
            "POST",
            STREAM.format("slow"),
            json={"parameters": {"max_new_tokens": 1000}},
            headers=SSE,
        ) as response,
    ):
        # Held in a variable: a dropped generator would close the response before the
        # blocks do.
        received = events(response.iter_bytes())
        next(received)
    cancelled.wait()  # leaving both blocks closed the connection


def test_closing_the_connection_during_a_unary_call_cancels_it(stack: Stack) -> None:
    cancelled = SlowCancelled(stack.server)
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=stack.url) as client:
        client.post(
            GENERATE.format("slow"), json={"parameters": {"max_new_tokens": 1000}}, timeout=0.5
        )
    cancelled.wait()


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
