"""`protoserve gateway --from-reflection` (and `--descriptor-set`) in front of a service it
was never given."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import _sse
from tests.gateway.echo_server import running, stop, wait_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


# The echo service has no stubs to compile in: a gateway learns it from the upstream's
# reflection or from a descriptor-set file, and must serve it the same either way.
@pytest.fixture(scope="module", params=["reflection", "descriptor-set"])
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("reflection")
    with running(tmp) as (upstream, descriptor_set):
        source = (
            ["--from-reflection"]
            if request.param == "reflection"
            else ["--descriptor-set", str(descriptor_set)]
        )
        command = [
            sys.executable,
            "-m",
            "protoserve.clients.cli",
            "gateway",
            "--upstream",
            upstream,
            *source,
            "--port",
            "0",
            "--port-file",
            str(tmp / "gateway.port"),
        ]
        with (tmp / "gateway.log").open("wb") as log:
            gateway = subprocess.Popen(command, cwd=tmp, stderr=log)
        try:
            yield f"http://127.0.0.1:{wait_port(gateway, tmp / 'gateway.port')}"
        finally:
            assert stop(gateway) == 0, (tmp / "gateway.log").read_text()


@pytest.fixture
def http(gateway: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway, timeout=30) as client:
        yield client


def test_body_field_path_pattern_and_query_parameters(http: httpx.Client) -> None:
    response = http.post(
        "/v1/rooms/lobby/messages?tags=a&tags=b&count=5", json={"text": "hi", "mood": "MOOD_HAPPY"}
    )
    assert response.status_code == 200, response.text
    request = response.json()["request"]
    assert request["room"] == {"name": "rooms/lobby"}
    assert request["message"]["text"] == "hi" and request["message"]["mood"] == "MOOD_HAPPY"
    assert request["tags"] == ["a", "b"] and request["count"] == "5"


def test_additional_binding_with_nested_path_fields(http: httpx.Client) -> None:
    request = http.get("/v1/rooms/attic/messages/hello%20there").json()["request"]
    assert request["room"]["name"] == "rooms/attic"
    assert request["message"]["text"] == "hello there"


def test_headers_become_metadata_and_metadata_comes_back(http: httpx.Client) -> None:
    response = http.post(
        "/v1/rooms/lobby/messages",
        json={"text": "x"},
        headers={
            "Authorization": "Bearer t0ken",
            "traceparent": "00-abc-def-01",
            "Grpc-Metadata-Tenant": "blue",
            "Cookie": "secret=1",
            "X-Other": "no",
            "X-Request-Id": "req-7",
            "X-Request-Timeout": "5",
        },
    )
    body = response.json()
    seen = body["metadata"]
    assert {
        "authorization=Bearer t0ken",
        "traceparent=00-abc-def-01",
        "tenant=blue",
        "x-request-id=req-7",
    } <= set(seen)
    assert not any(m.startswith(("cookie", "x-other")) for m in seen)
    assert body["has_deadline"] is True
    assert response.headers["grpc-metadata-x-echo"] == "yes"
    assert response.headers["grpc-trailer-x-echo-trailer"] == "done"
    assert response.headers["x-request-id"] == "req-7"
    assert http.post("/v1/rooms/lobby/messages", json={}).json()["has_deadline"] is False


def test_streaming_method_with_custom_verb_over_sse(http: httpx.Client) -> None:
    with http.stream(
        "GET", "/v1/chant/ho:chant", params={"times": 3}, headers={"Accept": "text/event-stream"}
    ) as response:
        events = list(_sse.events(response.iter_bytes()))
    assert [e.event for e in events] == ["message"] * 3 + ["done"]
    assert [json.loads(e.data) for e in events[:3]] == [
        {"text": "ho", "index": i} for i in range(3)
    ]


def test_method_without_a_rule_is_served_at_its_grpc_path(http: httpx.Client) -> None:
    response = http.post("/protoserve.testing.echo.v1.EchoService/Plain", json={"value": "v"})
    assert response.json() == {"value": "v"}


# Every row of the gRPC -> HTTP table, through real HTTP from a real upstream status.
TABLE = {
    1: 499,
    2: 500,
    3: 400,
    4: 504,
    5: 404,
    6: 409,
    7: 403,
    8: 429,
    9: 400,
    10: 409,
    11: 400,
    12: 501,
    13: 500,
    14: 503,
    15: 500,
    16: 401,
}


@pytest.mark.parametrize(("code", "status"), sorted(TABLE.items()))
def test_error_table(http: httpx.Client, code: int, status: int) -> None:
    response = http.delete(f"/v1/failures/{code}")
    assert response.status_code == status
    body = response.json()
    assert body["code"] == code and body["message"] == "failing as asked"


def test_error_details_are_typed_and_the_request_id_comes_back(http: httpx.Client) -> None:
    response = http.delete("/v1/failures/5", headers={"X-Request-Id": "fail-1"})
    assert response.status_code == 404
    assert response.headers["x-request-id"] == "fail-1"
    assert response.json()["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "FAILING_AS_ASKED",
            "domain": "echo.testing",
        }
    ]
    # The connection stays usable: the next request on it is answered.
    assert http.get("/v1/rooms/attic/messages/again").status_code == 200


def test_bad_path_value_names_the_field(http: httpx.Client) -> None:
    response = http.delete("/v1/failures/three")
    assert response.status_code == 400
    assert "code" in response.json()["message"]


def test_openapi_from_reflection_lists_every_rpc(http: httpx.Client) -> None:
    document = http.get("/openapi.json").json()
    operations = {
        op["operationId"]
        for item in document["paths"].values()
        for op in item.values()
        if isinstance(op, dict) and "operationId" in op
    }
    assert {
        "EchoService_Echo",
        "EchoService_Chant",
        "EchoService_Fail",
        "EchoService_Plain",
    } <= operations
