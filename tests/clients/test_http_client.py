"""HttpClient and AsyncHttpClient against the real gateway in front of a real gRPC server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from protoserve.clients._errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    ProtoserveError,
    Unavailable,
)
from protoserve.clients._grpc import Client
from protoserve.clients._grpc_aio import AsyncClient
from protoserve.clients._http import HttpClient
from protoserve.clients._http_aio import AsyncHttpClient
from protoserve.clients._sse import _SSEParser
from protoserve.clients._types import FinishReason, Generation
from protoserve.gateway import build_gateway
from tests._observe import SlowCancelled, wait_until_async
from tests._threads import UvicornThread, start_grpc_server, stop_grpc_server
from tests.server.models_for_tests import Slow

T = TypeVar("T")

# The gRPC server is conftest's (`target`); these models are only needed here:
# one that fails mid-stream, one silent long enough for keep-alive comments.
ODD_MODELS = (
    "tests.server.models_for_tests:Exploding",
    "tests.server.models_for_tests:Pausing",
)


@dataclass
class Gateway:
    """The gateway in front of conftest's server, and a gRPC Client of that server."""

    front: UvicornThread
    grpc_client: Client

    @property
    def url(self) -> str:
        return self.front.url


@pytest.fixture(scope="session")
def gateway(target: str) -> Iterator[Gateway]:
    front = UvicornThread(build_gateway(target))
    with Client(target, timeout=30) as grpc_client:
        yield Gateway(front, grpc_client)
    front.stop()


@pytest.fixture(scope="session")
def odd_url() -> Iterator[str]:
    thread, server = start_grpc_server(ODD_MODELS, shutdown_grace=1)
    front = UvicornThread(build_gateway(f"127.0.0.1:{server.port}", keepalive=0.3))
    yield front.url
    front.stop()
    stop_grpc_server(thread, server)


# SSE bodies as a gateway might frame them, served byte for byte by `framed_url`
# under the model name. Lines end with "\n" here; an X-Line-End header swaps in another.
MESSAGES = (
    b": keep-alive\n\n"
    b'id: 1\nevent: message\ndata: {"text":"a","token_ids":[97]}\n\n'
    b'id: 2\nevent: message\ndata: {"text":"b","token_ids":[98],'
    b'"finish_reason":"FINISH_REASON_LENGTH"}\n\n'
)
FRAMED = {
    "whole": MESSAGES + b"event: done\ndata: {}\n\n",
    # Cut before the blank line that would dispatch `done`: a browser never sees it.
    "cut": MESSAGES + b"event: done\ndata: {}\n",
    # No data line: a browser does not dispatch the event.
    "dataless": MESSAGES + b"event: done\n\n",
}
LINE_ENDS = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}


@pytest.fixture(scope="session")
def framed_url() -> Iterator[str]:
    async def stream(request: Request) -> Response:
        body = FRAMED[request.path_params["call"].partition(":")[0]]
        end = LINE_ENDS[request.headers.get("x-line-end", "lf")]
        return Response(body.replace(b"\n", end), media_type="text/event-stream")

    front = UvicornThread(Starlette(routes=[Route("/v1/models/{call}", stream, methods=["POST"])]))
    yield front.url
    front.stop()


@pytest.fixture
def client(gateway: Gateway) -> Iterator[HttpClient]:
    with HttpClient(gateway.url, timeout=30) as http:
        yield http


def run(coro: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro()

    return asyncio.run(main())


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_cancel(cancelled: SlowCancelled) -> None:
    """The server stopped generating for ``slow`` after the client left, once it had
    begun (SlowCancelled.wait says what stopped means)."""
    cancelled.wait()
    assert Slow.steps > cancelled.steps_before, "the generation never began"


# --- the SSE parser, line by line ---


def test_sse_parser_joins_data_lines_and_skips_comments() -> None:
    parser = _SSEParser()
    lines = [": keep-alive", "", "id: 1", "event: message", "data: {", "data:  }", "retry: 5", ""]
    assert [parser.feed(line) for line in lines] == [None] * 7 + [("message", "{\n }")]
    assert parser.feed("data:x") is None and parser.feed("") == ("message", "x")
    assert parser.feed("event: done") is None and parser.feed("data") is None
    assert parser.feed("") == ("done", "")


def test_sse_parser_drops_an_event_without_data_as_a_browser_does() -> None:
    parser = _SSEParser()
    assert [parser.feed(line) for line in ["event: done", "id: 3", ""]] == [None] * 3
    # Nothing of the dropped event is left over for the next one.
    assert parser.feed("data: {}") is None and parser.feed("") == ("message", "{}")


@pytest.mark.parametrize("end", LINE_ENDS)
def test_a_whole_stream_reads_with_any_line_end(framed_url: str, end: str) -> None:
    with HttpClient(framed_url, headers={"X-Line-End": end}) as client:
        stream = client.generate_stream("", model="whole")
        assert list(stream) == ["a", "b"] and stream.token_ids == (97, 98)
    assert stream.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("framing", ["cut", "dataless"])
def test_a_done_a_browser_would_drop_is_no_end(framed_url: str, framing: str) -> None:
    chunks: list[str] = []
    with HttpClient(framed_url) as client, pytest.raises(Unavailable, match="ended before"):
        chunks.extend(client.generate_stream("", model=framing))
    assert chunks == ["a", "b"]

    async def main() -> None:
        async with AsyncHttpClient(framed_url) as client:
            with pytest.raises(Unavailable, match="ended before"):
                async for chunk in client.generate_stream("", model=framing):
                    chunks.append(chunk)

    chunks.clear()
    run(main)
    assert chunks == ["a", "b"]


# --- sync ---


def test_generate_returns_a_generation(client: HttpClient, gateway: Gateway) -> None:
    text = client.generate("def ", model="bytelm", max_new_tokens=8, seed=1)
    assert isinstance(text, Generation) and isinstance(text, str)
    assert text.finish_reason is FinishReason.LENGTH and text.model == "bytelm"
    assert len(text.token_ids) == 8 and text.usage.completion_tokens == 8
    over_grpc = gateway.grpc_client.generate("def ", model="bytelm", max_new_tokens=8, seed=1)
    assert text == over_grpc and text.token_ids == over_grpc.token_ids
    assert text.usage == over_grpc.usage and text.finish_reason == over_grpc.finish_reason


def test_models_and_model(client: HttpClient) -> None:
    names = [m.name for m in client.models()]
    assert {"bytelm", "doubler", "slow"} <= set(names)
    info = client.model("bytelm")
    assert info.ready and "text_generation" in info.tasks
    assert "max_new_tokens" in [p.name for p in info.parameters]


def test_model_none_needs_a_single_model(client: HttpClient) -> None:
    with pytest.raises(ValueError, match="pass model="):
        client.generate("x")
    with HttpClient(client.base_url, model="doubler") as doubling:
        y = doubling.predict({"x": torch.ones(2)})["y"]
    assert isinstance(y, torch.Tensor) and torch.equal(y, torch.full((2,), 2.0))


def test_generate_stream_yields_chunks_then_reports_how_it_ended(client: HttpClient) -> None:
    stream = client.generate_stream("import ", model="bytelm", max_new_tokens=12, seed=3)
    assert stream.finish_reason is None
    chunks = list(stream)
    assert len(chunks) > 1 and all(chunks)
    assert stream.finish_reason is FinishReason.LENGTH
    assert stream.usage is not None and stream.usage.completion_tokens == 12
    assert len(stream.token_ids) == 12
    whole = client.generate("import ", model="bytelm", max_new_tokens=12, seed=3)
    assert "".join(chunks) == whole and stream.token_ids == whole.token_ids


def test_stream_over_http_and_over_grpc_yield_the_same_tokens(
    client: HttpClient, gateway: Gateway
) -> None:
    parameters: dict[str, Any] = {"max_new_tokens": 24, "seed": 7, "temperature": 1.0}
    over_grpc = gateway.grpc_client.generate_stream("class ", model="bytelm", **parameters)
    grpc_chunks = list(over_grpc)
    over_http = client.generate_stream("class ", model="bytelm", **parameters)
    # The same text; where it is cut into messages depends on how far each stream's
    # reader fell behind (a message holds every token since the previous one).
    assert "".join(over_http) == "".join(grpc_chunks)
    assert over_http.token_ids == over_grpc.token_ids and len(over_http.token_ids) == 24
    assert over_http.text == over_grpc.text
    assert over_http.finish_reason == over_grpc.finish_reason == FinishReason.LENGTH
    assert over_http.usage == over_grpc.usage


def test_keepalive_comments_are_skipped(odd_url: str) -> None:
    # The gateway sends ": keep-alive" every 0.3 s; the model is silent for 1.2 s.
    with HttpClient(odd_url) as client:
        stream = client.generate_stream("", model="pausing")
        assert list(stream) == ["a", "b"] and stream.token_ids == (97, 98)


def test_breaking_out_of_the_loop_cancels_the_generation_on_the_server(
    client: HttpClient, server: Any
) -> None:
    cancelled = SlowCancelled(server)
    for count, _ in enumerate(client.generate_stream("", model="slow", max_new_tokens=1000)):
        if count == 2:
            break
    wait_for_cancel(cancelled)
    # The connection the stream used was closed, not poisoned: the client still works.
    assert client.model("slow").ready


def test_close_cancels_a_stream_in_use(client: HttpClient, server: Any) -> None:
    cancelled = SlowCancelled(server)
    with client.generate_stream("", model="slow", max_new_tokens=1000) as stream:
        iterator = iter(stream)
        next(iterator)
    wait_for_cancel(cancelled)


def test_not_found(client: HttpClient) -> None:
    with pytest.raises(NotFound) as caught:
        client.generate("x", model="nope")
    assert caught.value.http_status == 404 and caught.value.request_id
    with pytest.raises(NotFound):
        client.model("nope")
    with pytest.raises(NotFound):
        list(client.generate_stream("x", model="nope"))


def test_invalid_argument_names_the_field(client: HttpClient) -> None:
    with pytest.raises(InvalidArgument) as caught:
        client.generate("x", model="bytelm", temperature=-1.0, top_p=2.0)
    fields = {v.field for v in caught.value.field_violations}
    assert fields == {"parameters.temperature", "parameters.top_p"}
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        client.generate_stream("x", model="bytelm", temprature=1.0)


def test_deadline_is_the_servers(client: HttpClient, server: Any) -> None:
    cancelled = SlowCancelled(server)
    with pytest.raises(DeadlineExceeded) as caught:
        client.generate("", model="slow", max_new_tokens=1000, timeout=1.0)
    # 504 from the gateway: the server's deadline fired first. Had httpx's own
    # (2 s: the deadline and a second) come first, there would be no HTTP status.
    assert caught.value.http_status == 504
    wait_for_cancel(cancelled)  # and it stopped the generation on the server
    stream = client.generate_stream("", model="slow", max_new_tokens=1000, timeout=1.0)
    chunks: list[str] = []
    with pytest.raises(DeadlineExceeded):
        chunks.extend(stream)
    assert chunks, "the deadline came as an `event: error` after the first tokens"


def test_error_after_the_first_token_is_raised_typed(odd_url: str) -> None:
    chunks: list[str] = []
    with HttpClient(odd_url) as client, pytest.raises(Internal) as caught:
        chunks.extend(client.generate_stream("", model="exploding"))
    assert chunks == ["A"] and "secret" not in str(caught.value)
    assert caught.value.request_id


def test_unreachable_gateway_is_unavailable_at_once() -> None:
    # At once: the refused connection itself is the error (ConnectError), not a
    # timeout that ran out waiting for it (ConnectTimeout).
    with HttpClient(f"http://127.0.0.1:{closed_port()}") as dead:
        with pytest.raises(Unavailable, match="ConnectError"):
            dead.models()
        with pytest.raises(Unavailable, match="ConnectError"):
            list(dead.generate_stream("x", model="bytelm"))


CALLS: list[tuple[str, Callable[[Any], object]]] = [
    ("not_found", lambda c: c.generate("x", model="nope")),
    ("invalid_argument", lambda c: c.generate("x", model="bytelm", temperature=-1.0, top_p=2.0)),
    ("wrong_task", lambda c: c.embed("x", model="doubler")),
    ("deadline", lambda c: c.generate("x", model="slow", max_new_tokens=1000, timeout=0.2)),
    ("stream_not_found", lambda c: list(c.generate_stream("x", model="nope"))),
]


@pytest.mark.parametrize("call", [c for _, c in CALLS], ids=[name for name, _ in CALLS])
def test_the_same_exception_as_over_grpc(
    client: HttpClient, gateway: Gateway, call: Callable[[Any], object]
) -> None:
    with pytest.raises(ProtoserveError) as grpc_error:
        call(gateway.grpc_client)
    with pytest.raises(ProtoserveError) as http_error:
        call(client)
    expected = grpc_error.value
    assert type(http_error.value) is type(expected)
    if not isinstance(expected, DeadlineExceeded):
        # A deadline's message is gRPC core's own, and differs between runs of the
        # same call ("Deadline Exceeded", "Stream removed (...)"); the rest are the server's.
        assert http_error.value.message == expected.message
    assert getattr(http_error.value, "field_violations", None) == getattr(
        expected, "field_violations", None
    )


def test_embed(client: HttpClient, gateway: Gateway) -> None:
    one = client.embed("def f(x):", model="bytelm")
    batch = client.embed(["def f(x):", "import os"], model="bytelm")
    assert one.dim() == 1 and batch.shape == (2, one.shape[0]) and batch.dtype == torch.float32
    assert torch.allclose(batch[0], one, atol=1e-5)  # batched with padding: not bit-equal
    assert torch.allclose(batch.norm(dim=1), torch.ones(2), atol=1e-5)
    raw = client.embed(["def f(x):"], model="bytelm", normalize=False)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(1), atol=1e-3)
    over_grpc = gateway.grpc_client.embed(["def f(x):"], model="bytelm", normalize=False)
    assert torch.equal(raw, over_grpc)


def test_predict_torch_and_numpy(client: HttpClient) -> None:
    x = torch.tensor([1.5, -2.0, 3.25])
    out = client.predict({"x": x}, model="doubler")
    assert set(out) == {"y"} and isinstance(out["y"], torch.Tensor)
    assert torch.equal(out["y"], 2 * x)
    array = np.arange(5, dtype=np.float32)
    tripled = client.predict({"x": array}, parameters={"factor": 3.0}, model="doubler")
    assert isinstance(tripled["y"], np.ndarray)
    np.testing.assert_array_equal(tripled["y"], 3 * array)


# --- async: the same behaviour through AsyncHttpClient ---


def test_async_generate_stream_and_the_rest(gateway: Gateway) -> None:
    async def main() -> None:
        async with AsyncHttpClient(gateway.url, timeout=30) as client:
            text = await client.generate("def ", model="bytelm", max_new_tokens=8, seed=1)
            assert text.finish_reason is FinishReason.LENGTH and len(text.token_ids) == 8
            stream = client.generate_stream("def ", model="bytelm", max_new_tokens=8, seed=1)
            chunks = [chunk async for chunk in stream]
            assert "".join(chunks) == text and stream.token_ids == text.token_ids
            assert stream.usage == text.usage
            assert "bytelm" in [m.name for m in await client.models()]
            assert (await client.model("doubler")).ready
            vectors = await client.embed(["a", "b"], model="bytelm")
            assert vectors.shape[0] == 2
            y = (await client.predict({"x": torch.ones(3)}, model="doubler"))["y"]
            assert isinstance(y, torch.Tensor) and torch.equal(y, torch.full((3,), 2.0))

    run(main)


def test_async_stream_matches_grpc(gateway: Gateway, target: str) -> None:
    parameters: dict[str, Any] = {"max_new_tokens": 16, "seed": 11, "temperature": 1.0}

    async def main() -> None:
        async with AsyncClient(target) as over_grpc, AsyncHttpClient(gateway.url) as over_http:
            grpc_stream = over_grpc.generate_stream("for ", model="bytelm", **parameters)
            http_stream = over_http.generate_stream("for ", model="bytelm", **parameters)
            # The same text, however each stream's messages cut it.
            http_text = "".join([c async for c in http_stream])
            assert http_text == "".join([c async for c in grpc_stream])
            assert http_stream.token_ids == grpc_stream.token_ids
            assert http_stream.usage == grpc_stream.usage

    run(main)


def test_async_break_cancels_on_the_server(gateway: Gateway, server: Any) -> None:
    cancelled = SlowCancelled(server)

    async def main() -> None:
        async with AsyncHttpClient(gateway.url) as client:
            async for _ in client.generate_stream("", model="slow", max_new_tokens=1000):
                break
            # No aclose(): asyncio finalizes the dropped iterator while the loop runs.
            await wait_until_async(Slow.closed.is_set, "the generation closed, loop left")

    run(main)
    wait_for_cancel(cancelled)


def test_async_aclose_cancels_on_the_server(gateway: Gateway, server: Any) -> None:
    cancelled = SlowCancelled(server)

    async def main() -> None:
        async with AsyncHttpClient(gateway.url) as client:
            async with client.generate_stream("", model="slow", max_new_tokens=1000) as stream:
                assert await anext(stream) == "x"
            assert stream.finish_reason is FinishReason.CANCELLED
            # The client is still usable: the cut connection left the pool.
            assert (await client.model("slow")).ready

    run(main)
    wait_for_cancel(cancelled)


def test_async_errors_are_typed(gateway: Gateway) -> None:
    async def main() -> None:
        async with AsyncHttpClient(gateway.url) as client:
            with pytest.raises(NotFound):
                await client.generate("x", model="nope")
            with pytest.raises(InvalidArgument) as caught:
                await client.generate("x", model="bytelm", temperature=-1.0)
            assert [v.field for v in caught.value.field_violations] == ["parameters.temperature"]
            with pytest.raises(DeadlineExceeded):
                async for _ in client.generate_stream(
                    "", model="slow", max_new_tokens=1000, timeout=0.3
                ):
                    pass
            with pytest.raises(ValueError, match="pass model="):
                async for _ in client.generate_stream("x"):
                    pass
        async with AsyncHttpClient(f"http://127.0.0.1:{closed_port()}") as dead:
            with pytest.raises(Unavailable):
                await dead.models()

    run(main)
