"""Server-streaming calls as Server-Sent Events or newline-delimited JSON.

SSE framing, one event per gRPC message::

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

NDJSON: one JSON message per line; a failure ends with ``{"error": Status}``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.types import Receive, Scope, Send

__all__ = ["StreamResponse", "ndjson_error", "ndjson_line", "sse_done", "sse_error", "sse_message"]


def _json(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def sse_message(event_id: int, data: Any) -> bytes:
    # JSON from json.dumps has no raw newlines, so one data line always suffices.
    return f"id: {event_id}\nevent: message\ndata: {_json(data)}\n\n".encode()


def sse_done() -> bytes:
    return b"event: done\ndata: {}\n\n"


def sse_error(status: Mapping[str, Any]) -> bytes:
    return f"event: error\ndata: {_json(status)}\n\n".encode()


def ndjson_line(data: Any) -> bytes:
    return (_json(data) + "\n").encode()


def ndjson_error(status: Mapping[str, Any]) -> bytes:
    return ndjson_line({"error": status})


KEEPALIVE = b": keep-alive\n\n"


class StreamResponse:
    """An ASGI response that sends chunks as they come and stops the producer on disconnect.

    The producer is iterated in its own task, raced against the client's
    ``http.disconnect``: when the client goes first, the producer is cancelled
    at once (which cancels the gRPC call behind it), whatever the ASGI server
    does with writes to a closed connection.

    Args:
        chunks: the body, chunk by chunk; each is sent (flushed) as it comes.
        status_code: the HTTP status.
        headers: response headers.
        keepalive: seconds of silence after which ``keepalive_chunk`` is sent; None for never.
        on_disconnect: called when the client went away before the end.
    """

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        *,
        status_code: int = 200,
        headers: Mapping[str, str],
        keepalive: float | None = None,
        keepalive_chunk: bytes = KEEPALIVE,
        on_disconnect: Any = None,
    ) -> None:
        self.chunks = chunks
        self.status_code = status_code
        self.headers = headers
        self.keepalive = keepalive
        self.keepalive_chunk = keepalive_chunk
        self.on_disconnect = on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": self.status_code,
                "headers": [
                    (k.lower().encode("latin-1"), v.encode("latin-1"))
                    for k, v in self.headers.items()
                ],
            }
        )

        async def pump() -> None:
            iterator = aiter(self.chunks)
            pending: asyncio.Task[bytes] | None = None
            try:
                while True:
                    if pending is None:
                        pending = asyncio.ensure_future(anext(iterator))
                    done, _ = await asyncio.wait({pending}, timeout=self.keepalive)
                    if not done:
                        await send(
                            {
                                "type": "http.response.body",
                                "body": self.keepalive_chunk,
                                "more_body": True,
                            }
                        )
                        continue
                    try:
                        chunk = pending.result()
                    except StopAsyncIteration:
                        return
                    finally:
                        pending = None
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finally:
                if pending is not None:
                    pending.cancel()
                closer = getattr(iterator, "aclose", None)
                if closer is not None:
                    await closer()

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        pumping = asyncio.create_task(pump())
        watching = asyncio.create_task(disconnected())
        try:
            done, _ = await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pumping, watching):
                if not task.done():
                    task.cancel()
            await asyncio.gather(pumping, watching, return_exceptions=True)
        if pumping in done and pumping.exception() is None:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif pumping in done:
            raise pumping.exception()  # type: ignore[misc]
        elif self.on_disconnect is not None:
            self.on_disconnect()
