"""The gateway's logs, and one request id followed from the gateway through the server.

In process: the JSON format, and the access line of each request (with the
:mod:`tests.gateway.conftest` stack). End to end: real ``protoserve serve`` and
``protoserve gateway`` processes logging JSON, whose lines name the same request ids.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from protoserve.common.logs import REQUEST_ID, JsonFormatter, RequestIdFilter, TextFormatter
from tests._observe import wait_until
from tests.e2e.conftest import start_server, stop_server
from tests.gateway.test_http2 import start_gateway

GENERATE = "/v1/models/bytelm:generate"
BODY = {"inputs": "def ", "parameters": {"max_new_tokens": 4, "seed": 1}}


def _handler(formatter: logging.Formatter) -> tuple[logging.Handler, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    handler.addFilter(RequestIdFilter())
    return handler, out


def test_json_and_text_lines() -> None:
    logger = logging.getLogger("protoserve.gateway.test_logs")
    logger.setLevel(logging.DEBUG)
    json_handler, json_out = _handler(JsonFormatter())
    text_handler, text_out = _handler(TextFormatter())
    logger.addHandler(json_handler)
    logger.addHandler(text_handler)
    before = datetime.now(UTC)
    try:
        logger.info("outside", extra={"status": 200})
        token = REQUEST_ID.set("abc-123")
        try:
            logger.debug("inside %d", 1, extra={"path": "/x"})
        finally:
            REQUEST_ID.reset(token)
    finally:
        logger.removeHandler(json_handler)
        logger.removeHandler(text_handler)
        logger.setLevel(logging.NOTSET)
    after = datetime.now(UTC)
    outside, inside = (json.loads(line) for line in json_out.getvalue().splitlines())
    assert list(outside) == ["time", "level", "logger", "message", "status"]
    assert outside["level"] == "INFO" and outside["status"] == 200
    assert outside["logger"] == "protoserve.gateway.test_logs"
    time_ = datetime.fromisoformat(outside["time"])
    assert outside["time"].endswith("Z") and time_.utcoffset() == timedelta(0)
    # When it was logged, to the millisecond (the line's precision, truncated).
    assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= time_ <= after
    assert inside == {
        "time": inside["time"],
        "level": "DEBUG",
        "logger": "protoserve.gateway.test_logs",
        "message": "inside 1",
        "request_id": "abc-123",
        "path": "/x",
    }
    text_outside, text_inside = text_out.getvalue().splitlines()
    assert text_outside.endswith(" INFO protoserve.gateway.test_logs: outside")
    assert text_inside.endswith(
        " DEBUG protoserve.gateway.test_logs: inside 1 [request_id=abc-123]"
    )


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The in-process gateway's access lines (DEBUG too) so far, as JSON."""
    caplog.set_level(logging.DEBUG, logger="protoserve.gateway.access")
    handler, out = _handler(JsonFormatter())
    logger = logging.getLogger("protoserve.gateway.access")
    logger.addHandler(handler)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in out.getvalue().splitlines()]

    yield lines
    logger.removeHandler(handler)


def test_one_access_line_per_request(
    http: httpx.Client, access: Callable[[], list[dict[str, Any]]]
) -> None:
    response = http.post(GENERATE, json=BODY, headers={"X-Request-Id": "gw-1"})
    assert response.status_code == 200
    generated = http.post(GENERATE, json={"inputs": "x", "parameters": {"temperature": -1}})
    assert generated.status_code == 400
    with http.stream("GET", "/v1/models/scripted:generateStream") as stream:
        stream.read()
    assert http.get("/no/such/route").status_code == 404
    assert http.get("/healthz").status_code == 200
    assert http.get("/metrics").status_code == 200

    # The line of a request is logged as its response ends: after the client has it.
    wait_until(lambda: len(access()) >= 6, "an access line for each of the six requests")
    lines = access()
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [
        ("POST", GENERATE, 200),
        ("POST", GENERATE, 400),
        ("GET", "/v1/models/scripted:generateStream", 200),
        ("GET", "/no/such/route", 404),
        ("GET", "/healthz", 200),
        ("GET", "/metrics", 200),
    ]
    ok, bad, streamed, unrouted, health, metrics = lines
    assert ok["request_id"] == "gw-1" and ok["level"] == "INFO"
    assert ok["grpc_method"] == "/protoserve.inference.v1.InferenceService/Generate"
    assert ok["client"].startswith("127.0.0.1:") and ok["duration_ms"] > 0
    # A generated id: the same in the line and in the response.
    assert bad["request_id"] == generated.headers["x-request-id"]
    assert streamed["grpc_method"].endswith("/GenerateStream")
    assert "grpc_method" not in unrouted and unrouted["level"] == "INFO"
    # Probes and scrapes are DEBUG, not to drown the rest.
    assert health["level"] == metrics["level"] == "DEBUG"


def _json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of a JSON log, each of which must be JSON."""
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\n{text}")
    return lines


@pytest.mark.e2e
def test_a_request_id_follows_the_request_through_both_processes(tmp_path: Path) -> None:
    (tmp_path / "server").mkdir()
    (tmp_path / "gateway").mkdir()
    server = start_server(tmp_path / "server", "--log-format", "json")
    try:
        gateway = start_gateway(
            tmp_path / "gateway", server.target, "--log-format", "json", "--log-level", "debug"
        )
        try:
            with httpx.Client(base_url=gateway.url, timeout=30) as http:
                given = http.post(GENERATE, json=BODY, headers={"X-Request-Id": "abc-123"})
                made = http.post(GENERATE, json=BODY)
        finally:
            assert gateway.stop() == 0, gateway.output()
    finally:
        stop_server(server)
    assert server.process.returncode == 0, server.output()
    assert given.status_code == made.status_code == 200, (given.text, made.text)
    assert given.headers["x-request-id"] == "abc-123"
    made_id = made.headers["x-request-id"]
    assert len(made_id) == 32

    server_lines = _json_lines(server.output())
    gateway_lines = _json_lines(gateway.output())
    for lines in (server_lines, gateway_lines):
        assert lines and all({"time", "level", "logger", "message"} <= set(x) for x in lines)
    # uvicorn's own lines come through the gateway's handler too.
    assert any(line["logger"].startswith("uvicorn") for line in gateway_lines)

    for rid in ("abc-123", made_id):
        (served,) = [
            x
            for x in server_lines
            if x["logger"] == "protoserve.server.access" and x.get("request_id") == rid
        ]
        assert served["method"] == "Generate" and served["code"] == "OK"
        assert served["duration_ms"] > 0 and served["peer"]
        (passed,) = [
            x
            for x in gateway_lines
            if x["logger"] == "protoserve.gateway.access" and x.get("request_id") == rid
        ]
        assert (passed["method"], passed["path"], passed["status"]) == ("POST", GENERATE, 200)
        assert passed["grpc_method"] == "/protoserve.inference.v1.InferenceService/Generate"
        # The gateway's time includes the server's.
        assert passed["duration_ms"] >= served["duration_ms"]
