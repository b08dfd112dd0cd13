"""Server-Sent Events from the gateway: the line parser and the shared stream state.

:class:`SSESource` is what both HTTP streams (the blocking one in
:mod:`protoserve.clients._http`, the asyncio one in
:mod:`protoserve.clients._http_aio`) share: the request, the response once
sent, and its event lines read as stream steps and typed errors. They add only
the I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from protoserve.inference.v1 import inference_service_pb2 as pb

from ._convert import StreamPart, stream_part
from ._errors import Unavailable, from_http_error
from ._http_wire import parse_json, transport_error

__all__ = ["SSESource"]


class _SSEParser:
    """Server-Sent Events, one line at a time (the WHATWG event stream format).

    ``feed`` returns ``(event, data)`` when a blank line ends an event. Comments
    (``: keep-alive``) and ``id``/``retry`` fields are skipped; several ``data``
    lines are joined with newlines, as the format says. As in a browser, an
    event with no ``data`` line is dropped, and so is one that the body ends
    before its blank line (no line ever dispatches it): a gateway whose
    framing a browser would not read is not read here either.
    """

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            event = (self._event or "message", "\n".join(self._data)) if self._data else None
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


class SSESource:
    """What both HTTP streams share: reading events, and what they said.

    The body is read on after ``event: done`` to its end: a response read to
    its end leaves its connection in the pool for the next call. Cancelling
    closes the response, which makes the gateway cancel the call on the server.
    """

    def __init__(self, request: httpx.Request, base_url: str) -> None:
        self._request = request
        self._base_url = base_url
        self._parser = _SSEParser()
        self._response: httpx.Response | None = None
        self._cancelled = False
        self._done = False

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """httpx's failures as typed errors, except those of cancelling."""
        try:
            yield
        except httpx.TransportError as error:
            if not self._cancelled:
                raise transport_error(error, self._base_url) from None
        except httpx.StreamError:
            if not self._cancelled:
                raise

    def _part(self, line: str, response: httpx.Response) -> StreamPart | None:
        """The step of the message event this line ends, if it ends one.

        Raises:
            ProtoserveError: an ``event: error``: the status the call ended with.
        """
        event = self._parser.feed(line)
        if event is None or self._done:
            return None
        kind, data = event
        if kind == "done":
            self._done = True
        elif kind == "error":
            self._done = True
            try:
                status: Any = json.loads(data)
            except ValueError:
                status = data
            raise from_http_error(response.status_code, status, response.headers)
        elif kind == "message":
            return stream_part(parse_json(json.loads(data), pb.GenerateStreamResponse()))
        return None  # an event type this client does not know, from a newer gateway

    def _ended(self) -> None:
        if not self._done:
            # The body ended without `event: done`: the gateway or a proxy went away.
            raise Unavailable(f"the stream from {self._base_url} ended before it finished")
