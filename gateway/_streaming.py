"""Server-streaming calls on the wire: the stream formats, and the response that sends them.

A :class:`StreamFormat` is everything one wire format of a stream decides, as a
``Delimited`` marshaler is in grpc-gateway's registry: its content type, how a
message is framed, how the stream says it is done or failed, its keep-alive, and
a request it answers without a call. One is chosen per request
(:func:`choose_format`; a codec may choose its own, ``Codec.stream_format``). Two
come built in, chosen by ``Accept``:

SSE, when the request accepts ``text/event-stream``; one event per gRPC message::

    id: 1
    event: message
    data: {"text": "d", ...}

then exactly one terminal event: ``event: done`` (the stream finished with OK)
or ``event: error`` whose data is the ``google.rpc.Status`` JSON. While the
upstream is quiet, a ``: keep-alive`` comment goes out every ``keepalive``
seconds so proxies do not time the stream out. A browser's EventSource
reconnects by itself after a stream ends; such a reconnect carries
``Last-Event-ID`` and is answered 204, which tells EventSource to stop, so a
finished generation is never silently run again.

NDJSON otherwise: one JSON message per line; a failure ends with ``{"error": Status}``.

:class:`StreamResponse` sends a stream's chunks as they come and stops its producer
the moment the client leaves (docs/architecture.md, rule 6).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from protoserve.gateway._cancel import disconnected, race

__all__ = [
    "NDJSON",
    "SSE",
    "STREAM_FORMATS",
    "Ndjson",
    "ServerSentEvents",
    "StreamFormat",
    "StreamResponse",
    "choose_format",
]

Schema = dict[str, Any]


def _json(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


class StreamFormat:
    """One wire format of a server stream.

    Attributes:
        media_type: the media type a request's ``Accept`` names to get this format
            (and its key in the OpenAPI document).
        content_type: the response's ``Content-Type``.
        keepalive: sent after the gateway's ``keepalive`` seconds of silence; None for never.
        description: what the OpenAPI document says of the format.
    """

    media_type: str = ""
    content_type: str = ""
    keepalive: bytes | None = None
    description: str = ""

    def message(self, index: int, data: Any) -> bytes:
        """Message number ``index`` (from 1) of the stream, whose JSON is ``data``."""
        raise NotImplementedError

    def done(self) -> bytes:
        """What ends a stream that finished with OK (b"" for nothing)."""
        return b""

    def error(self, status: Mapping[str, Any]) -> bytes:
        """What ends a stream that failed, whose ``google.rpc.Status`` JSON is ``status``."""
        raise NotImplementedError

    def reconnect_status(self, headers: Mapping[str, str]) -> int | None:
        """The HTTP status to answer, without calling, a request that can only be a
        client reconnecting to a stream that already ended; None to call."""
        return None

    def openapi_schema(self, message: Schema, status: Schema) -> Schema:
        """The OpenAPI schema of this format's body, given a message's and a status's."""
        return {"type": "string", "description": self.description}


KEEPALIVE = b": keep-alive\n\n"


class ServerSentEvents(StreamFormat):
    """Server-Sent Events: ``event: message`` per message, then ``done`` or ``error``."""

    media_type = "text/event-stream"
    content_type = "text/event-stream; charset=utf-8"
    keepalive = KEEPALIVE
    description = (
        "Server-Sent Events, sent when the request has `Accept: text/event-stream`. Each "
        "response message is one `event: message` with an increasing `id:` and its JSON as "
        "`data:`. The stream ends with exactly one `event: done` (the call succeeded) or "
        "`event: error` whose `data:` is the google.rpc.Status JSON. Lines starting with `:` "
        "are keep-alive comments. A request with `Last-Event-ID` (an EventSource reconnecting "
        "after the stream ended) is answered 204, so the call is not made again."
    )

    def message(self, index: int, data: Any) -> bytes:
        # JSON from json.dumps has no raw newlines, so one data line always suffices.
        return f"id: {index}\nevent: message\ndata: {_json(data)}\n\n".encode()

    def done(self) -> bytes:
        return b"event: done\ndata: {}\n\n"

    def error(self, status: Mapping[str, Any]) -> bytes:
        return f"event: error\ndata: {_json(status)}\n\n".encode()

    def reconnect_status(self, headers: Mapping[str, str]) -> int | None:
        # An EventSource reconnecting after the stream ended: 204 makes it stop,
        # instead of silently running the whole call again.
        return 204 if "last-event-id" in headers else None


class Ndjson(StreamFormat):
    """Newline-delimited JSON: a line per message; a failure's last line is ``{"error": ...}``."""

    media_type = "application/x-ndjson"
    content_type = "application/x-ndjson"
    description = (
        "Newline-delimited JSON, sent otherwise: one response message per line. A call that "
        'fails after the stream started ends with a line `{"error": <google.rpc.Status>}`.'
    )

    def message(self, index: int, data: Any) -> bytes:
        return (_json(data) + "\n").encode()

    def error(self, status: Mapping[str, Any]) -> bytes:
        return self.message(0, {"error": status})

    def openapi_schema(self, message: Schema, status: Schema) -> Schema:
        # anyOf, not oneOf: a message whose fields are all optional also matches the error line.
        error = {"type": "object", "properties": {"error": status}, "required": ["error"]}
        return {
            "anyOf": [message, error],
            "description": "One line: a response message, or the error that ended the stream.",
        }


SSE = ServerSentEvents()
NDJSON = Ndjson()
#: The gateway's stream formats, in the order ``Accept`` is tried; the last is the default.
STREAM_FORMATS: tuple[StreamFormat, ...] = (SSE, NDJSON)


def choose_format(formats: Sequence[StreamFormat], accept: str) -> StreamFormat:
    """The first of ``formats`` whose media type the ``Accept`` header names, else the last."""
    for candidate in formats:
        if candidate.media_type in accept:
            return candidate
    return formats[-1]


class StreamResponse(Response):
    """A response that sends chunks as they come and stops the producer on disconnect.

    The producer is iterated in its own task, raced against the client's
    ``http.disconnect``: when the client goes first, the producer is cancelled
    at once (which cancels the gRPC call behind it), whatever the ASGI server
    does with writes to a closed connection. (Starlette's ``StreamingResponse``
    leaves that to ``send`` failing, which uvicorn's does not: ADR 7.)

    Args:
        chunks: the body, chunk by chunk; each is sent (flushed) as it comes.
        headers: response headers, ``Content-Type`` included.
        keepalive: sent after ``keepalive_every`` seconds of silence; None for never.
        keepalive_every: seconds of silence before a ``keepalive``.
        on_disconnect: called when the client went away before the end.
    """

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        *,
        headers: Mapping[str, str],
        keepalive: bytes | None = None,
        keepalive_every: float = 15.0,
        on_disconnect: Callable[[], None] | None = None,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers(headers)  # no body yet, so no Content-Length: chunked
        self.chunks = chunks
        self.keepalive = keepalive
        self.silence = keepalive_every if keepalive is not None else None
        self.on_disconnect = on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        finished = await race(self._pump(send), disconnected(receive))
        if finished is None:
            if self.on_disconnect is not None:
                self.on_disconnect()
            return
        finished.result()  # what the producer or send raised, if anything
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _pump(self, send: Send) -> None:
        iterator = aiter(self.chunks)
        pending: asyncio.Future[bytes] | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(iterator))
                done, _ = await asyncio.wait({pending}, timeout=self.silence)
                if not done and self.keepalive is not None:
                    await _body(send, self.keepalive)
                    continue
                try:
                    chunk = pending.result()
                except StopAsyncIteration:
                    return
                finally:
                    pending = None
                await _body(send, chunk)
        finally:
            if pending is not None:
                # The producer is inside a read: cancel it and let it unwind first, since
                # closing a generator that is still running fails ("already running").
                pending.cancel()
                await asyncio.wait({pending})
            closer = getattr(iterator, "aclose", None)
            if closer is not None:
                await closer()


async def _body(send: Send, chunk: bytes) -> None:
    await send({"type": "http.response.body", "body": chunk, "more_body": True})
