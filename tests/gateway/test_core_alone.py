"""docs/architecture.md, rule 3: the gateway core, built without protoserve's own pieces
(the OIP codec, the playground), serves a service it was never given and nothing of ours;
a codec that frames its streams its own way fits the core without a branch in it; and
methods that share a route are told apart by their codec, not by the core.

The echo service (tests/gateway/echo_server.py) runs as a real gRPC server in its own
process; the gateway core runs on uvicorn in front of it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.routing import Mount

from protoserve.gateway import (
    Binding,
    Codec,
    CodecRequest,
    CodecResponse,
    Descriptors,
    StreamFormat,
    build_gateway,
    from_compiled,
    from_descriptor_set,
)
from protoserve.gateway._app import build_app
from protoserve.gateway.inference import OPENAI_SERVICE
from tests._threads import LoopThread, UvicornThread
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


def test_the_core_serves_our_api_without_its_pieces(caplog: pytest.LogCaptureFixture) -> None:
    # The compiled-in API, whose services the public build_gateway gives the OIP codec
    # and the playground: the core gives them neither. (Nothing is called upstream.)
    # OpenAI's create and stream methods share routes, which only its codec tells apart:
    # without it the create method serves them, and the build says so.
    with caplog.at_level(logging.WARNING, logger="protoserve.gateway"):
        core = build_app("127.0.0.1:1", from_compiled())
    assert (
        f"{OPENAI_SERVICE}.CreateChatCompletion and {OPENAI_SERVICE}.StreamChatCompletion "
        "share the route POST /openai/v1/chat/completions" in caplog.text
    )
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


# A route two methods share ------------------------------------------------------------

SHARED = "protoserve.testing.shared.v1.TalkService"


def talk_descriptors() -> Descriptors:
    """A service of its own, in a pool of its own: ``Say`` (unary) and ``SayMany``
    (server-streaming) both bound to ``POST /v1/say``, as a descriptor set gives them."""
    from google.api import annotations_pb2, http_pb2
    from google.protobuf import descriptor_pb2, descriptor_pool

    pool = descriptor_pool.DescriptorPool()
    for module in (descriptor_pb2, http_pb2, annotations_pb2):
        file = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(file)
        pool.Add(file)
    proto = descriptor_pb2.FileDescriptorProto(
        name="protoserve/testing/shared/v1/talk.proto",
        package="protoserve.testing.shared.v1",
        syntax="proto3",
        dependency=["google/api/annotations.proto"],
    )
    request = proto.message_type.add(name="SayRequest")
    request.field.add(name="text", number=1, type=9, label=1, json_name="text")
    request.field.add(name="times", number=2, type=5, label=1, json_name="times")
    request.field.add(name="stream", number=3, type=8, label=1, json_name="stream")
    reply = proto.message_type.add(name="SayResponse")
    reply.field.add(name="text", number=1, type=9, label=1, json_name="text")
    service = proto.service.add(name="TalkService")
    for name, streaming in (("Say", False), ("SayMany", True)):
        method = service.method.add(
            name=name,
            input_type=".protoserve.testing.shared.v1.SayRequest",
            output_type=".protoserve.testing.shared.v1.SayResponse",
            server_streaming=streaming,
        )
        rule = method.options.Extensions[annotations_pb2.http]
        rule.post, rule.body = "/v1/say", "*"
    pool.Add(proto)
    return Descriptors(pool, (pool.FindServiceByName(SHARED),), {}, "built in the test")


@contextmanager
def talk_server(descriptors: Descriptors) -> Iterator[tuple[str, list[str]]]:
    """A real grpc.aio server of TalkService: its target, and the methods it was called on."""
    import grpc
    from google.protobuf.message_factory import GetMessageClass

    service = descriptors.services[0]
    request_class = GetMessageClass(service.methods_by_name["Say"].input_type)
    reply_class = GetMessageClass(service.methods_by_name["Say"].output_type)
    called: list[str] = []

    async def say(request: Any, context: Any) -> Any:
        called.append("Say")
        return reply_class(text=request.text)

    async def say_many(request: Any, context: Any) -> Any:
        called.append("SayMany")
        for _ in range(request.times):
            yield reply_class(text=request.text)

    def handler(kind: Any, fn: Any) -> Any:
        return kind(fn, request_class.FromString, lambda m: m.SerializeToString())

    handlers = {
        "Say": handler(grpc.unary_unary_rpc_method_handler, say),
        "SayMany": handler(grpc.unary_stream_rpc_method_handler, say_many),
    }
    thread = LoopThread()

    async def start() -> tuple[Any, int]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SHARED, handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = thread.run(start())
    try:
        yield f"127.0.0.1:{port}", called
    finally:
        thread.run(server.stop(0))
        thread.stop()


class ByStream(Codec):
    """Protobuf's JSON mapping, choosing the streaming method when the body says ``stream``."""

    serves_streams = True

    def choose_binding(self, request: CodecRequest, bindings: Sequence[Binding]) -> Binding:
        stream = json.loads(request.body).get("stream") is True
        request.state["chosen by"] = "stream" if stream else "unary"
        return next(b for b in bindings if b.method.server_streaming == stream)

    def encode_response(self, request: CodecRequest, message: Message) -> CodecResponse:
        # The state the choice left carries over to the chosen method's request.
        answer = super().encode_response(request, message)
        return CodecResponse(answer.body, headers={"X-Chosen-By": request.state["chosen by"]})


def test_a_codec_chooses_between_methods_that_share_a_route() -> None:
    descriptors = talk_descriptors()
    with talk_server(descriptors) as (target, called):
        app = build_app(target, descriptors, codecs={SHARED: ByStream()})
        with serve(app) as http:
            unary = http.post("/v1/say", json={"text": "hi", "times": 3})
            assert unary.status_code == 200, unary.text
            assert unary.json() == {"text": "hi"}
            assert unary.headers["x-chosen-by"] == "unary"
            assert called == ["Say"]
            # The chosen method's input type is what the body becomes: times reaches SayMany.
            streamed = http.post("/v1/say", json={"text": "ho", "times": 2, "stream": True})
            assert streamed.status_code == 200, streamed.text
            assert streamed.headers["content-type"] == "application/x-ndjson"
            assert streamed.content == b'{"text":"ho"}\n{"text":"ho"}\n'
            assert called == ["Say", "SayMany"]
            metrics = http.get("/metrics").text
            # Counted by the route's template, whichever method served it.
            assert 'route="/v1/say"' in metrics
            assert 'route="/v1/say",status="200"} 2.0' in metrics
            document = http.get("/openapi.json").json()
    operation = operations(document)["POST /v1/say"]
    assert operation["x-grpc-methods"] == [f"/{SHARED}/Say", f"/{SHARED}/SayMany"]


class NoChoice(Codec):
    """Serves streams, but never overrides choose_binding."""

    serves_streams = True


def test_without_codecs_the_first_method_declared_serves_a_shared_route(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A foreign descriptor set is not ours to change: served as before, with a warning.
    descriptors = talk_descriptors()
    with talk_server(descriptors) as (target, called):
        with caplog.at_level(logging.WARNING, logger="protoserve.gateway"):
            app = build_app(target, descriptors)
        with serve(app) as http:
            answer = http.post("/v1/say", json={"text": "hi", "stream": True})
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"text": "hi"}
            assert called == ["Say"]
    assert (
        f"{SHARED}.Say and {SHARED}.SayMany share the route POST /v1/say: {SHARED}.Say "
        "serves it" in caplog.text
    )


@pytest.mark.parametrize("codecs", [{SHARED: NoChoice()}, {f"{SHARED}.Say": ByStream()}])
def test_methods_with_codecs_cannot_share_a_route_without_one_codec_that_chooses(
    codecs: dict[str, Codec],
) -> None:
    # A codec is there, but none tells the methods apart: refused when the app is built.
    with pytest.raises(ValueError) as refused:
        build_app("127.0.0.1:1", talk_descriptors(), codecs=codecs)
    message = str(refused.value)
    assert f"{SHARED}.Say and {SHARED}.SayMany share the route POST /v1/say" in message
    assert "Codec.choose_binding" in message
