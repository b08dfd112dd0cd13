"""Per-method codecs: a format other than protobuf's JSON, for the methods that register one.

The echo service (tests/gateway/echo_server.py, a real gRPC server in its own
process) behind the real gateway on uvicorn, with codecs written here: one that
speaks plain text, one that changes only the error body, and broken ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf import empty_pb2
from google.protobuf.message import Message
from openapi_spec_validator import OpenAPIV31SpecValidator

from protoserve.gateway import (
    Binding,
    Codec,
    CodecRequest,
    CodecResponse,
    Descriptors,
    ErrorInfo,
    bad_request,
    build_gateway,
    from_descriptor_set,
    load_codec,
)
from protoserve.gateway._assembly import parse_codec_option
from protoserve.gateway.inference._oip import OipCodec
from tests import _sse
from tests._threads import UvicornThread
from tests.gateway.echo_server import running, stop, wait_port

ROOT = Path(__file__).resolve().parents[2]
ECHO = "protoserve.testing.echo.v1.EchoService"
TEXT = "text/plain; charset=utf-8"


class TextCodec(Codec):
    """Echo in plain text: the body (or the path) is the text, the answer lines of key=value."""

    def decode_request(self, request: CodecRequest, message_class: type[Message]) -> Message:
        message: Any = message_class()
        message.room.name = request.path_params["room.name"]
        try:
            text = request.path_params.get("message.text") or request.body.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request("the body must be UTF-8 text", "", "not UTF-8") from None
        message.message.text = text
        message.tags.extend(value for key, value in request.query if key == "tag")
        request.state["shout"] = request.headers.get("x-shout") == "yes"
        result: Message = message
        return result

    def encode_response(self, request: CodecRequest, message: Any) -> CodecResponse:
        text = message.request.message.text
        lines = [
            f"room={message.request.room.name}",
            f"text={text.upper() if request.state['shout'] else text}",
            f"tags={','.join(message.request.tags)}",
            f"deadline={message.has_deadline}",
            *message.metadata,
        ]
        body = "\n".join(lines).encode()
        return CodecResponse(body, status=201, media_type=TEXT, headers={"X-Codec": "text"})

    def encode_error(self, binding: Binding, error: ErrorInfo) -> CodecResponse:
        body = f"{error.code.name}: {error.message}".encode()
        return CodecResponse(body, status=error.status, media_type=TEXT)

    def openapi_operation(self, binding: Binding) -> dict[str, Any] | None:
        lines = {"schema": {"$ref": "#/components/schemas/text.Lines"}}
        return {
            "requestBody": {"content": {"text/plain": {"schema": {"type": "string"}}}},
            "responses": {
                "201": {"description": "key=value lines", "content": {"text/plain": lines}}
            },
        }

    def openapi_schemas(self) -> dict[str, Any]:
        return {"text.Lines": {"type": "string", "description": "Lines of key=value."}}


#: An instance, for ``load_codec``'s module:attribute form.
TEXT_CODEC = TextCodec()


class ErrorsOnly(Codec):
    """Protobuf's JSON mapping (the base class), with an error body of its own."""

    def encode_error(self, binding: Binding, error: ErrorInfo) -> CodecResponse:
        return CodecResponse.json(
            {"oops": error.message, "grpc": error.code.name, "method": binding.method.name},
            status=error.status,
            headers={"X-Oops": "1"},
        )


class Broken(Codec):
    """Fails where it should not: its failures must not reach the client as tracebacks."""

    def __init__(self, where: str) -> None:
        self.where = where

    def decode_request(self, request: CodecRequest, message_class: type[Message]) -> Message:
        if self.where == "decode":
            raise RuntimeError("secret detail")
        if self.where == "wrong type":
            return empty_pb2.Empty()  # not the method's request message
        return super().decode_request(request, message_class)

    def encode_response(self, request: CodecRequest, message: Message) -> CodecResponse:
        raise RuntimeError("secret detail")


class Picky(Codec):
    """Refuses every method at build time."""

    def check(self, method: Any) -> None:
        raise ValueError("I serve nothing")


@dataclass
class Echo:
    target: str
    descriptor_set: Path

    def descriptors(self) -> Descriptors:
        return from_descriptor_set(self.descriptor_set.read_bytes())


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Echo]:
    with running(tmp_path_factory.mktemp("codecs")) as (target, descriptor_set):
        yield Echo(target, descriptor_set)


@contextmanager
def serving(echo: Echo, codecs: dict[str, Codec | None], **options: Any) -> Iterator[httpx.Client]:
    app = build_gateway(echo.target, descriptors=echo.descriptors(), codecs=codecs, **options)
    served = UvicornThread(app)
    try:
        with httpx.Client(base_url=served.url, timeout=30) as client:
            yield client
    finally:
        served.stop()


@pytest.fixture(scope="module")
def text(echo: Echo) -> Iterator[httpx.Client]:
    """A gateway with the text codec on Echo alone."""
    with serving(echo, {f"{ECHO}.Echo": TEXT_CODEC}, max_body_bytes=1024) as client:
        yield client


@pytest.fixture(scope="module")
def service_wide(echo: Echo) -> Iterator[httpx.Client]:
    """ErrorsOnly on the whole service, but Plain turned back to protobuf's mapping."""
    with serving(echo, {ECHO: ErrorsOnly(), f"{ECHO}.Plain": None}) as client:
        yield client


# The codec's format, with the gateway's routing, metadata and deadlines -----------------


def test_a_codec_decides_the_request_and_the_response(text: httpx.Client) -> None:
    response = text.post(
        "/v1/rooms/lobby/messages?tag=a&tag=b",
        content="hello",
        headers={
            "Content-Type": "text/plain",
            "X-Shout": "yes",
            "Grpc-Timeout": "5S",
            "Authorization": "Bearer t",
            "X-Request-Id": "codec-1",
        },
    )
    assert response.status_code == 201
    assert response.headers["content-type"] == TEXT
    assert response.headers["x-codec"] == "text"
    lines = response.text.split("\n")
    assert lines[:4] == ["room=rooms/lobby", "text=HELLO", "tags=a,b", "deadline=True"]
    # What the gateway always does, around the codec: metadata both ways, the request id.
    assert {"authorization=Bearer t", "x-request-id=codec-1"} <= set(lines[4:])
    assert response.headers["x-request-id"] == "codec-1"
    assert response.headers["grpc-metadata-x-echo"] == "yes"
    assert response.headers["grpc-trailer-x-echo-trailer"] == "done"


def test_every_binding_of_the_method_uses_its_codec(text: httpx.Client) -> None:
    response = text.get("/v1/rooms/attic/messages/hi%20there")
    assert response.status_code == 201
    assert response.text.split("\n")[:4] == [
        "room=rooms/attic",
        "text=hi there",
        "tags=",
        "deadline=False",
    ]


def test_methods_without_a_codec_are_unchanged(text: httpx.Client) -> None:
    response = text.post(f"/{ECHO}/Plain", json={"value": "v"})
    assert (response.status_code, response.json()) == (200, {"value": "v"})
    failed = text.delete("/v1/failures/5")
    assert failed.status_code == 404 and failed.json()["code"] == 5


def test_the_gateways_own_errors_go_through_the_codec(text: httpx.Client) -> None:
    bad = text.post("/v1/rooms/lobby/messages", content=b"\xff")
    assert (bad.status_code, bad.text) == (400, "INVALID_ARGUMENT: the body must be UTF-8 text")
    assert bad.headers["content-type"] == TEXT
    big = text.post("/v1/rooms/lobby/messages", content=b"x" * 1025)
    assert big.status_code == 413
    assert big.text == "RESOURCE_EXHAUSTED: the request body is larger than 1024 bytes"
    late = text.post("/v1/rooms/lobby/messages", content=b"x", headers={"Grpc-Timeout": "1 day"})
    assert late.status_code == 400 and late.text.startswith("INVALID_ARGUMENT: Grpc-Timeout")
    assert late.headers["x-request-id"]


# A service-wide codec ---------------------------------------------------------------


def test_a_service_codec_covers_its_unary_methods(service_wide: httpx.Client) -> None:
    failed = service_wide.delete("/v1/failures/8", headers={"X-Request-Id": "f-1"})
    assert failed.status_code == 429
    assert failed.json() == {"oops": "failing as asked", "grpc": "RESOURCE_EXHAUSTED",
                             "method": "Fail"}  # fmt: skip
    assert failed.headers["x-oops"] == "1" and failed.headers["x-request-id"] == "f-1"
    # The base class's request and response: protobuf's JSON mapping.
    echoed = service_wide.post("/v1/rooms/r/messages", json={"text": "hi"})
    assert echoed.json()["request"]["message"]["text"] == "hi"
    unknown = service_wide.post("/v1/rooms/r/messages", json={"txet": "hi"})
    assert unknown.status_code == 400 and unknown.json()["grpc"] == "INVALID_ARGUMENT"
    assert "txet" in unknown.json()["oops"]


def test_a_method_entry_wins_over_its_service(service_wide: httpx.Client) -> None:
    response = service_wide.post(f"/{ECHO}/Plain", content=b"{")
    assert response.status_code == 400 and response.json()["code"] == 3


def test_streaming_methods_keep_the_gateways_framing(service_wide: httpx.Client) -> None:
    with service_wide.stream(
        "GET", "/v1/chant/ho:chant", params={"times": 2}, headers={"Accept": "text/event-stream"}
    ) as response:
        events = list(_sse.events(response.iter_bytes()))
    assert [e.event for e in events] == ["message", "message", "done"]
    assert json.loads(events[0].data) == {"text": "ho", "index": 0}


# Codecs that fail -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("decode", "the gateway's Broken codec failed to decode the request"),
        ("encode", "the gateway's Broken codec failed to encode the response"),
        ("wrong type", "the gateway's Broken codec made the wrong request message"),
    ],
)
def test_a_failing_codec_is_a_500_without_its_traceback(
    echo: Echo, where: str, message: str
) -> None:
    with serving(echo, {f"{ECHO}.Echo": Broken(where)}) as http:
        response = http.post("/v1/rooms/r/messages", json={"text": "x"})
    # Broken's encode_error is the base class's: google.rpc.Status JSON.
    assert response.status_code == 500
    assert response.json() == {"code": 13, "message": message, "details": []}
    assert "secret" not in response.text


# Build-time checks ------------------------------------------------------------------


def test_a_streaming_method_refuses_a_codec(echo: Echo) -> None:
    with pytest.raises(ValueError, match="server-streaming method; codecs serve unary methods"):
        build_gateway(
            echo.target, descriptors=echo.descriptors(), codecs={f"{ECHO}.Chant": TEXT_CODEC}
        )


def test_a_codec_for_nothing_served_is_refused(echo: Echo) -> None:
    with pytest.raises(ValueError, match=r"for 'no\.Such', which is neither a served service"):
        build_gateway(echo.target, descriptors=echo.descriptors(), codecs={"no.Such": TEXT_CODEC})
    # Turning off a codec that is not there is harmless (protoserve up may always say it).
    build_gateway(echo.target, descriptors=echo.descriptors(), codecs={"no.Such": None})


def test_check_can_refuse_a_method(echo: Echo) -> None:
    with pytest.raises(ValueError, match=f"codec Picky cannot serve {ECHO}.Echo: I serve nothing"):
        build_gateway(echo.target, descriptors=echo.descriptors(), codecs={ECHO: Picky()})


def test_the_oip_codec_applies_only_where_its_service_is(echo: Echo) -> None:
    app = build_gateway(echo.target, descriptors=echo.descriptors())
    assert app.state.gateway.codecs == {}


# OpenAPI ----------------------------------------------------------------------------


def test_openapi_takes_a_codecs_schemas(text: httpx.Client, service_wide: httpx.Client) -> None:
    document = text.get("/openapi.json").json()
    OpenAPIV31SpecValidator(document).validate()
    echo = document["paths"]["/v1/{room.name}/messages"]["post"]
    assert echo["x-codec"] == "TextCodec"
    assert echo["x-grpc-method"] == f"/{ECHO}/Echo"
    assert list(echo["requestBody"]["content"]) == ["text/plain"]
    assert set(echo["responses"]) == {"201"}
    # Only the path parameter: no query parameters guessed from the proto.
    assert [p["name"] for p in echo["parameters"]] == ["room.name"]
    assert document["components"]["schemas"]["text.Lines"]["type"] == "string"
    # A codec that describes nothing is marked as defining the bodies itself.
    marked = service_wide.get("/openapi.json").json()
    OpenAPIV31SpecValidator(marked).validate()
    fail = marked["paths"]["/v1/failures/{code}"]["delete"]
    assert fail["x-codec"] == "ErrorsOnly"
    assert "`ErrorsOnly` codec" in fail["description"]
    assert "google.rpc.Status" not in json.dumps(fail["responses"])
    assert "x-codec" not in marked["paths"]["/v1/chant/{text}:chant"]["get"]


# Naming codecs (the CLI's --codec) ----------------------------------------------------


def test_load_codec_names() -> None:
    assert load_codec("protobuf") is None
    assert isinstance(load_codec("oip"), OipCodec)
    assert load_codec("tests.gateway.test_codecs:TEXT_CODEC") is TEXT_CODEC
    assert isinstance(load_codec("tests.gateway.test_codecs:TextCodec"), TextCodec)
    assert parse_codec_option("inference.GRPCInferenceService=protobuf") == (
        "inference.GRPCInferenceService",
        None,
    )
    name, codec = parse_codec_option(f"/{ECHO}/Echo=oip")
    assert name == f"{ECHO}.Echo" and isinstance(codec, OipCodec)


@pytest.mark.parametrize(
    ("option", "error"),
    [
        ("oip", "is not NAME=CODEC"),
        ("a.B=json", "is not 'protobuf', 'oip', 'openai' or 'package.module:attribute'"),
        ("a.B=no_such_module_here:x", "cannot import no_such_module_here"),
        ("a.B=tests.gateway.test_codecs:Missing", "has no attribute 'Missing'"),
        ("a.B=builtins:object", "is a object, not a protoserve.gateway.Codec"),
        ("a.B=tests.gateway.test_codecs:Broken", "calling Broken() failed"),
    ],
)
def test_bad_codec_options(option: str, error: str) -> None:
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace(")", r"\)")):
        parse_codec_option(option)


@pytest.mark.e2e
def test_the_cli_registers_codecs(echo: Echo, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "protoserve.clients.cli", "gateway",
        "--upstream", echo.target, "--descriptor-set", str(echo.descriptor_set),
        "--port", "0", "--port-file", str(tmp_path / "port"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    codec = f"--codec={ECHO}.Echo=tests.gateway.test_codecs:TextCodec"
    refused = subprocess.run(
        [*command, f"--codec={ECHO}.Chant=oip"], env=env, capture_output=True, text=True
    )
    assert refused.returncode == 2
    assert "server-streaming method" in refused.stderr and "Traceback" not in refused.stderr
    with (tmp_path / "log").open("wb") as log:
        gateway = subprocess.Popen([*command, codec], env=env, cwd=tmp_path, stderr=log)
    try:
        url = f"http://127.0.0.1:{wait_port(gateway, tmp_path / 'port')}"
        response = httpx.post(f"{url}/v1/rooms/cli/messages", content="by cli", timeout=30)
        assert response.status_code == 201
        assert response.text.startswith("room=rooms/cli\ntext=by cli\n")
    finally:
        assert stop(gateway) == 0, (tmp_path / "log").read_text()
