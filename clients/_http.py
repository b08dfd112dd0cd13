"""Clients for the REST/SSE gateway: the same methods and values as the gRPC clients.

:class:`HttpClient` and :class:`AsyncHttpClient` speak JSON over HTTP to
``protoserve gateway`` (or ``protoserve up``) where gRPC cannot go: through
proxies that only pass HTTP/1.1, from networks that block HTTP/2. They build
the same ``protoserve.inference.v1`` messages as the gRPC clients (through
``_convert``), send them as proto3 JSON on the routes of the API's
``google.api.http`` rules (:mod:`protoserve.clients._routes`), and parse the
answers back into messages, so a call returns the same Python values, and
fails with the same exception classes, over either transport.

Streams are read as Server-Sent Events (:mod:`protoserve.clients._sse`), parsed
line by line as they arrive. This module holds the blocking
:class:`HttpClient` and the primitives under it; the asyncio twins are in
:mod:`protoserve.clients._http_aio`, and what both put on the wire in
:mod:`protoserve.clients._http_wire`.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import httpx
from google.protobuf.message import Message

from ._api import ClientAPI, Metadata
from ._convert import StreamPart
from ._http_wire import SSE, HttpClientBase, Settings, error_of, read_response, transport_error
from ._sse import SSESource
from ._stream import TextStream

__all__ = ["HttpClient", "HttpTextStream", "HttpTransport"]


class HttpTextStream(TextStream):
    """The text of a streamed generation, chunk by chunk, as the gateway sends it.

    The same contract as the gRPC :class:`~protoserve.clients.TextStream`:
    iterate it once; ``for chunk in stream`` yields non-empty ``str`` chunks.
    The request goes out on the first iteration. Leaving the loop early
    (``break``, an exception), :meth:`cancel` and leaving a ``with`` block
    close the HTTP response, which makes the gateway cancel the call on the
    server at once. After the end, ``finish_reason``, ``usage`` and
    ``token_ids`` describe the whole generation.

    Raises (while iterating):
        ProtoserveError: the typed error the call ended with, before or after
            its first token.
    """


class SSEStream(SSESource):
    """A stream's request, sent on the first read; its events as steps."""

    def __init__(self, http: httpx.Client, request: httpx.Request, base_url: str) -> None:
        super().__init__(request, base_url)
        self._http = http

    def __iter__(self) -> Generator[StreamPart, None, None]:
        try:
            with self._errors():
                response = self._response = self._http.send(self._request, stream=True)
                if not response.is_success:
                    response.read()
                    raise error_of(response)
                for line in response.iter_lines():
                    if (part := self._part(line, response)) is not None:
                        yield part
                self._ended()
        finally:
            if self._response is not None:
                self._response.close()

    def cancel(self) -> None:
        self._cancelled = True
        if self._response is not None:
            self._response.close()


class HttpTransport:
    """Blocking calls through the gateway, on one ``httpx.Client``."""

    def __init__(self, settings: Settings, verify: bool | str) -> None:
        self._settings = settings
        self._http = httpx.Client(**settings.client_options(verify))

    def unary(
        self, method: str, request: Message, timeout: float | None, metadata: Metadata
    ) -> Any:
        call = self._settings.request(self._http, method, request, timeout, metadata)
        try:
            response = self._http.send(call)
        except httpx.TransportError as error:
            raise transport_error(error, self._settings.base_url) from None
        return read_response(method, response)

    def stream(
        self, method: str, request: Message, timeout: float | None, metadata: Metadata
    ) -> SSEStream:
        call = self._settings.request(self._http, method, request, timeout, metadata, SSE)
        return SSEStream(self._http, call, self._settings.base_url)

    def close(self) -> None:
        self._http.close()


class HttpClient(HttpClientBase, ClientAPI[HttpTextStream]):
    """A blocking client of the protoserve gateway, with the gRPC ``Client``'s methods.

    Args:
        base_url: the gateway's URL.
        model: the model calls use when they name none; None means the one
            model the server holds (a ``ValueError`` if it holds several).
        timeout: the deadline of each call in seconds; None waits forever. It is
            sent as ``X-Request-Timeout``, so the server stops at the deadline,
            and httpx waits a little longer so that the server's
            ``DeadlineExceeded`` arrives first.
        token: a bearer token sent with every call (``Authorization``).
        headers: extra headers for every request.
        verify: TLS verification: True, False, or the path of a CA bundle.

    Every failure raises the :class:`~protoserve.clients.ProtoserveError`
    subclass the gRPC client raises for it, never an ``httpx`` exception:
    ``Unavailable`` when the gateway cannot be reached. ``close()`` (or leaving
    a ``with`` block) closes the connections; streams still being read are cut
    off.
    """

    _transport_type = HttpTransport
    _stream_type = HttpTextStream
