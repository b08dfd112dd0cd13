"""docs/architecture.md, rule 3: the gateway core, built without protoserve's own pieces
(the OIP codec, the playground), serves a service it was never given and nothing of ours;
and a codec that frames its streams its own way fits the core without a branch in it.

The echo service (tests/gateway/echo_server.py) runs as a real gRPC server in its own
process; the gateway core runs on uvicorn in front of it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.routing import Mount

from protoserve.gateway import (
    Codec,
    CodecRequest,
    StreamFormat,
    build_gateway,
    from_compiled,
    from_descriptor_set,
)
from protoserve.gateway._app import build_app
from tests._threads import UvicornThread
from tests.gateway.echo_server import running

ROOT = Path(__file__).resolve().parents[2]
ECHO = "protoserve.testing.echo.v1.EchoService"
#: The pages of the core itself; protoserve's pieces add "/" (the playground).
CORE_PAGES = {"/healthz", "/readyz", "/openapi.json", "/docs", "/metrics"}


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, bytes]]:
    """The echo server's target and its descriptor set."""
    with running(tmp_path_factory.mktemp("core")) as (target, descriptor_set):
        yield target, descriptor_set.read_bytes()


@contextmanager
def serve(app: Starlette) -> Iterator[httpx.Client]:
    served = UvicornThread(app)
    try:
        with httpx.Client(base_url=served.url, timeout=30) as client:
            yield client
    finally:
        served.stop()


def operations(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``VERB /path`` -> operation, for every operation of an OpenAPI document."""
    return {
        f"{verb.upper()} {path}": operation
        for path, item in document["paths"].items()
        for verb, operation in item.items()
    }


def test_the_core_serves_a_foreign_service_and_nothing_of_ours(
    echo: tuple[str, bytes],
) -> None:
    target, data = echo
    app = build_app(target, from_descriptor_set(data))
    assert app.state.gateway.codecs == {}
    assert set(app.state.gateway.pages) == CORE_PAGES
    with serve(app) as http:
        echoed = http.post("/v1/rooms/lobby/messages", json={"text": "hi"})
        assert echoed.status_code == 200, echoed.text
        assert echoed.json()["request"]["message"]["text"] == "hi"
        with http.stream("GET", "/v1/chant/ho:chant", params={"times": 2}) as streamed:
            lines = [json.loads(line) for line in streamed.iter_lines() if line]
        assert lines == [{"text": "ho", "index": 0}, {"text": "ho", "index": 1}]
        # No playground, no Open Inference Protocol.
        assert http.get("/").status_code == 404
        assert http.get("/v2/health/live").status_code == 404
        assert http.get("/docs").status_code == 200
        document = http.get("/openapi.json").json()
        assert not [op for op in operations(document) if " /v2" in op]
        assert all(
            op["x-grpc-method"].startswith(f"/{ECHO}/") for op in operations(document).values()
        )


def test_the_core_serves_our_api_without_its_pieces() -> None:
    # The compiled-in API, whose services the public build_gateway gives the OIP codec
    # and the playground: the core gives them neither. (Nothing is called upstream.)
    core = build_app("127.0.0.1:1", from_compiled())
    assert core.state.gateway.codecs == {}
    assert set(core.state.gateway.pages) == CORE_PAGES
    public = build_gateway("127.0.0.1:1")
    assert set(public.state.gateway.pages) == {*CORE_PAGES, "/"}
    live = "GET /v2/health/live"
    with serve(core) as http:
        assert http.get("/").status_code == 404
        assert "x-codec" not in operations(http.get("/openapi.json").json())[live]
    with serve(public) as http:
        assert http.get("/").status_code == 200
        assert operations(http.get("/openapi.json").json())[live]["x-codec"] == "oip"


class DataDone(StreamFormat):
    """A protocol's own event framing: ``data:`` events, then ``data: [DONE]``."""

    media_type = "text/event-stream"
    content_type = "text/event-stream; charset=utf-8"

    def message(self, index: int, data: Any) -> bytes:
        return f"data: {json.dumps(data)}\n\n".encode()

    def done(self) -> bytes:
        return b"data: [DONE]\n\n"

    def error(self, status: Mapping[str, Any]) -> bytes:
        return f"data: {json.dumps({'error': status})}\n\n".encode()


class Choices(Codec):
    """Frames Chant's stream in ``DataDone``, each message as a list of choices."""

    serves_streams = True

    def stream_format(self, request: CodecRequest) -> StreamFormat:
        return DataDone()

    def encode_stream_message(self, request: CodecRequest, message: Message) -> Any:
        text: Any = message
        return {"choices": [{"text": text.text}]}


def test_a_codec_frames_a_stream_its_own_way(echo: tuple[str, bytes]) -> None:
    target, data = echo
    app = build_app(target, from_descriptor_set(data), codecs={f"{ECHO}.Chant": Choices()})
    with serve(app) as http:
        # Whatever Accept says: the codec chose its format.
        response = http.get("/v1/chant/ho:chant", params={"times": 2}, headers={"Accept": "*/*"})
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.content == (
            b'data: {"choices": [{"text": "ho"}]}\n\n'
            b'data: {"choices": [{"text": "ho"}]}\n\n'
            b"data: [DONE]\n\n"
        )


class FailsOnSecond(Choices):
    """A codec with a bug: it cannot render Chant's second message."""

    def encode_stream_message(self, request: CodecRequest, message: Message) -> Any:
        text: Any = message
        if text.index == 1:
            raise RuntimeError("a bug in the codec")
        return super().encode_stream_message(request, message)


def test_a_codec_that_fails_mid_stream_ends_it_with_an_error_event(
    echo: tuple[str, bytes],
) -> None:
    # docs/architecture.md, rule 4: a codec's failure is a 500 INTERNAL, never a cut body.
    target, data = echo
    app = build_app(target, from_descriptor_set(data), codecs={f"{ECHO}.Chant": FailsOnSecond()})
    with serve(app) as http:
        response = http.get("/v1/chant/ho:chant", params={"times": 3})
    assert response.status_code == 200
    first, second = response.content.split(b"\n\n")[:2]
    assert first == b'data: {"choices": [{"text": "ho"}]}'
    error = json.loads(second.removeprefix(b"data: "))["error"]
    assert error["code"] == 13  # INTERNAL
    assert "codec failed to encode a stream message" in error["message"]
    assert response.content.endswith(b"}\n\n")  # the error ends the stream; no [DONE]


def test_the_pages_are_found_below_a_root_path(echo: tuple[str, bytes]) -> None:
    # Behind a proxy that strips a prefix (uvicorn --root-path), or mounted in another
    # app, the gateway's pages are where they were.
    target, data = echo
    app = build_app(target, from_descriptor_set(data))
    with serve(Starlette(routes=[Mount("/gw", app)])) as http:
        assert http.get("/gw/healthz").json() == {"status": "ok"}
        assert http.get("/gw/openapi.json").status_code == 200
