"""Bad input never gets a 5xx or a plain-text answer from the gateway (issue 16, item 7), and
its own pages are a choice (item 4): real server, real gateway, real ports.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from protoserve.common.logs import JsonFormatter, RequestIdFilter, TextFormatter
from protoserve.gateway import build_gateway
from protoserve.gateway.cli import build_parser
from tests._observe import wait_until
from tests._threads import UvicornThread
from tests.gateway.conftest import Stack

FORGED = "/v1/models/x%0AFORGED%20INFO%20hello"


def assert_status_body(response: httpx.Response, status: int, code: int) -> dict[str, object]:
    """A ``google.rpc.Status`` JSON answer with its request id, as every error is."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    body = response.json()
    assert (body["code"], isinstance(body["message"], str), body["details"]) == (
        code,
        True,
        body["details"],
    )
    return dict(body)


# Every 404 (and Starlette's 405) is a Status body.
def test_a_path_holding_a_newline_gets_a_status_404(http: httpx.Client) -> None:
    body = assert_status_body(http.get(FORGED), 404, 5)
    # The model looked for, as the server names it (quoted, escaped).
    assert "'x\\nFORGED INFO hello' not found" in str(body["message"])


def test_a_verb_starlette_does_not_know_gets_a_status_405(http: httpx.Client) -> None:
    assert_status_body(http.request("BREW", "/v1/models/doubler"), 405, 12)


# Control characters in forwarded headers are the client's 400.
@pytest.mark.parametrize(
    "header", ["Grpc-Metadata-x", "Authorization", "traceparent", "Grpc-Metadata-y"]
)
@pytest.mark.parametrize("value", ["a\x01b", "a\x7fb", "a\tb"])
def test_a_control_character_in_a_forwarded_header_is_a_400(
    http: httpx.Client, header: str, value: str
) -> None:
    body = assert_status_body(http.get("/v1/models/doubler", headers={header: value}), 400, 3)
    assert repr(header.lower().removeprefix("grpc-metadata-")) in str(body["message"])
    # The connection is still good.
    assert http.get("/v1/models/doubler").status_code == 200


def test_a_metadata_key_grpc_cannot_carry_is_a_400(http: httpx.Client) -> None:
    response = http.get("/v1/models/doubler", headers={"Grpc-Metadata-a!b": "1"})
    assert_status_body(response, 400, 3)


# Echoed names are bounded: the upstream's answer fits its trailers.
def test_a_very_long_model_name_is_a_404_not_a_429(http: httpx.Client) -> None:
    for _ in range(3):  # over grpc's soft metadata limit, a refusal is only likely
        body = assert_status_body(http.get("/v1/models/" + "x" * 4_500), 404, 5)
        assert "x" * 128 + "…" in str(body["message"])


# Text logs escape control characters; JSON logs are safe as they are.
@pytest.fixture
def access_lines() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    logger = logging.getLogger("protoserve.gateway.access")
    handlers = []
    outs = []
    for formatter in (TextFormatter(), JsonFormatter()):
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(formatter)
        handler.addFilter(RequestIdFilter())
        logger.addHandler(handler)
        handlers.append(handler)
        outs.append(out)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield outs[0], outs[1]
    finally:
        logger.setLevel(level)
        for handler in handlers:
            logger.removeHandler(handler)


def test_a_newline_in_the_path_writes_no_forged_log_line(
    http: httpx.Client, access_lines: tuple[io.StringIO, io.StringIO]
) -> None:
    text, json_out = access_lines
    response = http.get(FORGED)
    rid = response.headers["x-request-id"]
    # The access line is written once the response has ended: after the client has it.
    wait_until(lambda: rid in json_out.getvalue() and rid in text.getvalue(), "the access line")
    lines = text.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith(
        f"GET /v1/models/x\\nFORGED INFO hello 404 {lines[0].split()[-2]} [request_id={rid}]"
    )
    records = [json.loads(line) for line in json_out.getvalue().splitlines()]
    assert [r["path"] for r in records] == ["/v1/models/x\nFORGED INFO hello"]


def test_text_lines_escape_control_characters_in_message_and_logger() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("protoserve.test\nforged")
    logger.addHandler(handler)
    try:
        logger.warning("a\nb\r\x1b[31m\u2028%s", "c\x00")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed\nhere")
    finally:
        logger.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("WARNING protoserve.test\\nforged: a\\nb\\r\\x1b[31m\\u2028c\\x00")
    # A traceback still spans lines, after the message's one line.
    assert lines[1].endswith("ERROR protoserve.test\\nforged: failed\\nhere")
    assert lines[2] == "Traceback (most recent call last):"


# Exposure is a choice.
def test_docs_openapi_metrics_and_playground_are_served_by_default(http: httpx.Client) -> None:
    for path in ("/docs", "/openapi.json", "/metrics", "/"):
        assert http.get(path).status_code == 200, path


def test_each_page_can_be_turned_off(stack: Stack) -> None:
    app = build_gateway(stack.grpc_target, docs=False, metrics=False, playground=False)
    gateway = UvicornThread(app)
    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            for path in ("/docs", "/openapi.json", "/metrics", "/"):
                assert_status_body(http.get(path), 404, 5)
            assert http.get("/healthz").status_code == 200
            assert http.get("/v1/models/doubler").status_code == 200
    finally:
        gateway.stop()


def test_the_gateway_flags_turn_pages_off(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args([])
    assert (args.docs, args.playground, args.metrics) == (True, None, True)
    args = build_parser().parse_args(["--no-docs", "--no-playground", "--no-metrics"])
    assert (args.docs, args.playground, args.metrics) == (False, False, False)
    for name in ("DOCS", "PLAYGROUND", "METRICS"):
        monkeypatch.setenv(f"PROTOSERVE_GATEWAY_{name}", "off")
    args = build_parser().parse_args([])
    assert (args.docs, args.playground, args.metrics) == (False, False, False)
    args = build_parser().parse_args(["--docs", "--playground", "--metrics"])
    assert (args.docs, args.playground, args.metrics) == (True, True, True)
