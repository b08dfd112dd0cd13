"""The asyncio client of the REST/SSE gateway: :class:`AsyncHttpClient`.

It and its :class:`AsyncHttpTextStream` are the twins of the blocking
:class:`~protoserve.clients.HttpClient` (:mod:`protoserve.clients._http`):
the same arguments, methods, values and exceptions, awaited.
"""

# `timeout` is the deadline of the call (see _api.py), not asyncio's.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import httpx
from google.protobuf.message import Message

from ._api import AsyncClientAPI, Metadata
from ._convert import StreamPart
from ._http_wire import SSE, HttpClientBase, Settings, error_of, read_response, transport_error
from ._sse import SSESource
from ._stream import AsyncTextStream

__all__ = ["AsyncHttpClient", "AsyncHttpTextStream", "AsyncHttpTransport"]


class AsyncHttpTextStream(AsyncTextStream):
    """The asyncio twin of :class:`HttpTextStream`: ``async for chunk in stream``.

    The model is resolved and the request sent on the first iteration. Leaving
    the loop early closes the response when asyncio finalizes the dropped
    iterator (a loop iteration or so later); :meth:`aclose` and leaving an
    ``async with`` block close it at once.
    """


class AsyncSSEStream(SSESource):
    """The asyncio twin of :class:`~protoserve.clients._http.SSEStream`."""

    def __init__(self, http: httpx.AsyncClient, request: httpx.Request, base_url: str) -> None:
        super().__init__(request, base_url)
        self._http = http
        self._closing: asyncio.Task[None] | None = None

    async def __aiter__(self) -> AsyncGenerator[StreamPart, None]:
        try:
            with self._errors():
                response = self._response = await self._http.send(self._request, stream=True)
                if not response.is_success:
                    await response.aread()
                    raise error_of(response)
                async for line in response.aiter_lines():
                    if (part := self._part(line, response)) is not None:
                        yield part
                self._ended()
        finally:
            if self._response is not None:
                await self._response.aclose()

    def cancel(self) -> None:
        self._cancelled = True
        if self._response is not None:
            # Closing an async response takes an await; a task does it (and is
            # kept referenced until done). aclose() waits for it.
            self._closing = asyncio.get_running_loop().create_task(self._response.aclose())

    async def aclose(self) -> None:
        if self._closing is not None:
            await self._closing
        elif self._response is not None and self._cancelled:
            await self._response.aclose()


class AsyncHttpTransport:
    """asyncio calls through the gateway, on one ``httpx.AsyncClient``."""

    def __init__(self, settings: Settings, verify: bool | str) -> None:
        self._settings = settings
        self._http = httpx.AsyncClient(**settings.client_options(verify))

    async def unary(
        self, method: str, request: Message, timeout: float | None, metadata: Metadata
    ) -> Any:
        call = self._settings.request(self._http, method, request, timeout, metadata)
        try:
            response = await self._http.send(call)
        except httpx.TransportError as error:
            raise transport_error(error, self._settings.base_url) from None
        return read_response(method, response)

    def stream(
        self, method: str, request: Message, timeout: float | None, metadata: Metadata
    ) -> AsyncSSEStream:
        call = self._settings.request(self._http, method, request, timeout, metadata, SSE)
        return AsyncSSEStream(self._http, call, self._settings.base_url)

    async def close(self) -> None:
        await self._http.aclose()


class AsyncHttpClient(HttpClientBase, AsyncClientAPI[AsyncHttpTextStream]):
    """The asyncio twin of :class:`HttpClient`: the same arguments and methods, awaited.

    ``generate_stream`` is not a coroutine: ``async for chunk in client.generate_stream(...)``.
    """

    _transport_type = AsyncHttpTransport
    _stream_type = AsyncHttpTextStream
