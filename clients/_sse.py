"""Server-Sent Events from the gateway: the line parser and the shared stream state.

:class:`SSEStream` is what both HTTP text streams
(:class:`~protoserve.clients._http.HttpTextStream`,
:class:`~protoserve.clients._http_aio.AsyncHttpTextStream`) share: turning
event lines into text, token ids, usage and typed errors.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from protoserve.inference.v1 import inference_service_pb2 as pb

from ._errors import Unavailable, from_http_error
from ._http_wire import error_of, parse_json
from ._record import StreamRecord
from ._types import FinishReason

__all__ = ["SSEStream"]


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


class SSEStream(StreamRecord):
    """What both stream classes share: reading events, and what they said."""

    def __init__(self, base_url: str) -> None:
        super().__init__()
        self._base_url = base_url
        self._parser = _SSEParser()
        self._response: httpx.Response | None = None
        self._started = False
        self._cancelled = False
        self._done = False

    def _opened(self, response: httpx.Response) -> None:
        self._response = response
        if not response.is_success:
            raise error_of(response)

    def _feed(self, line: str, response: httpx.Response) -> str:
        """The text of the event this line ends ("" if none).

        Raises:
            ProtoserveError: an ``event: error``: the status the call ended with.
        """
        event = self._parser.feed(line)
        if event is None or self._done:
            return ""
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
            part = parse_json(json.loads(data), pb.GenerateStreamResponse())
            text = self._record(part)
            if text:
                return text
        return ""  # an event type this client does not know, from a newer gateway

    def _ended(self) -> None:
        if not self._done:
            # The body ended without `event: done`: the gateway or a proxy went away.
            raise Unavailable(f"the stream from {self._base_url} ended before it finished")

    def _mark_cancelled(self) -> bool:
        """Whether this call cancels the stream (it had not ended nor been cancelled)."""
        if self._done or self._cancelled:
            return False
        self._cancelled = True
        self.finish_reason = self.finish_reason or FinishReason.CANCELLED
        return True
