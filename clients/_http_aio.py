"""The asyncio client of the REST/SSE gateway: :class:`AsyncHttpClient`.

It and its :class:`AsyncHttpTextStream` are the twins of the blocking
:class:`~protoserve.clients.HttpClient` (:mod:`protoserve.clients._http`):
the same arguments, methods, values and exceptions, awaited.
"""

# The async methods take `timeout` on purpose (ASYNC109): it is the deadline sent to
# the server with the call, which asyncio.timeout() around the call cannot carry, and
# it keeps their signatures those of the gRPC AsyncClient.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import numpy.typing as npt

from protoserve.inference.v1 import inference_service_pb2 as pb

from . import _convert
from ._default_model import only_model
from ._http_wire import (
    DEFAULT_URL,
    Metadata,
    Settings,
    error_of,
    httpx_timeout,
    json_body,
    parse_json,
    ssl_verify,
    transport_error,
    url_path,
)
from ._sse import SSEStream
from ._types import Generation, ModelInfo

if TYPE_CHECKING:
    import torch

    Tensors = Mapping[str, torch.Tensor | npt.NDArray[Any]]

__all__ = ["AsyncHttpClient", "AsyncHttpTextStream"]


class AsyncHttpTextStream(SSEStream):
    """The asyncio twin of :class:`HttpTextStream`: ``async for chunk in stream``.

    The model is resolved and the request sent on the first iteration. Leaving
    the loop early closes the response when asyncio finalizes the dropped
    iterator (a loop iteration or so later); :meth:`aclose` and leaving an
    ``async with`` block close it at once.
    """

    def __init__(
        self,
        client: AsyncHttpClient,
        model: str | None,
        start: Callable[[str], httpx.Request],
    ) -> None:
        super().__init__(client.base_url)
        self._client = client
        self._model = model
        self._start = start
        self._next: AsyncIterator[str] | None = None
        self._closing: asyncio.Task[None] | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        if self._started:
            return
        self._started = True
        try:
            model = await self._client._model(self._model)
            if self._cancelled:
                return
            response = await self._client._http.send(self._start(model), stream=True)
            if not response.is_success:
                await response.aread()
            self._opened(response)
            async for line in response.aiter_lines():
                if text := self._feed(line, response):
                    yield text
            self._ended()
        except httpx.TransportError as error:
            if not self._cancelled:
                raise transport_error(error, self._base_url) from None
        except httpx.StreamError:
            if not self._cancelled:
                raise
        finally:
            self._mark_cancelled()
            if self._response is not None:
                await self._response.aclose()

    async def __anext__(self) -> str:
        if self._next is None:
            self._next = aiter(self)
        return await anext(self._next)

    def cancel(self) -> None:
        """Start closing the response; the server stops generating. Harmless after the end."""
        if self._mark_cancelled() and self._response is not None:
            # Closing an async response takes an await; a task does it (and is
            # kept referenced until done). aclose() waits for it.
            self._closing = asyncio.get_running_loop().create_task(self._response.aclose())

    async def aclose(self) -> None:
        """Close the response and wait until it is closed (see :meth:`cancel`)."""
        self.cancel()
        if self._closing is not None:
            await self._closing
        elif self._response is not None and self._cancelled:
            await self._response.aclose()

    async def __aenter__(self) -> AsyncHttpTextStream:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncHttpClient:
    """The asyncio twin of :class:`HttpClient`: the same arguments and methods, awaited.

    ``generate_stream`` is not a coroutine: ``async for chunk in client.generate_stream(...)``.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        model: str | None = None,
        timeout: float | None = None,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        verify: bool | str = True,
    ) -> None:
        self._settings = Settings(base_url, model, timeout, token, headers)
        self.base_url = self._settings.base_url
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._settings.headers,
            verify=ssl_verify(verify),
            timeout=httpx_timeout(timeout),
        )
        self._default_model = model

    async def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        timeout: float | None,
        metadata: Metadata,
    ) -> Any:
        request = self._settings.request(self._http, method, path, body, timeout, metadata)
        try:
            response = await self._http.send(request)
        except httpx.TransportError as error:
            raise transport_error(error, self.base_url) from None
        if not response.is_success:
            raise error_of(response)
        return response.json()

    async def _model(self, model: str | None) -> str:
        if model is not None:
            return model
        if self._default_model is None:
            self._default_model = only_model(await self.models())
        return self._default_model

    async def models(
        self, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> list[ModelInfo]:
        """Every model the server holds, ready or not."""
        data = await self._call("GET", "/v1/models", None, timeout, metadata)
        return [_convert.model_info(m) for m in parse_json(data, pb.ListModelsResponse()).models]

    async def model(
        self, name: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> ModelInfo:
        """One model's description. Raises ``NotFound`` for an unknown name."""
        path = f"/v1/models/{quote(name, safe='')}"
        data = await self._call("GET", path, None, timeout, metadata)
        return _convert.model_info(parse_json(data, pb.GetModelResponse()).model)

    async def generate(
        self,
        text: str,
        *,
        model: str | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
        **parameters: Any,
    ) -> Generation:
        """Continue ``text``; see :meth:`HttpClient.generate`."""
        request = _convert.generate_request(await self._model(model), text, parameters)
        path = url_path(request.model, "generate")
        data = await self._call("POST", path, json_body(request), timeout, metadata)
        return _convert.generation(parse_json(data, pb.GenerateResponse()))

    def generate_stream(
        self,
        text: str,
        *,
        model: str | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
        **parameters: Any,
    ) -> AsyncHttpTextStream:
        """Continue ``text``, streaming it (see :class:`AsyncHttpTextStream`).

        Not a coroutine: ``async for chunk in client.generate_stream(...)``.
        Raises ``TypeError`` for an unknown parameter at once.
        """
        # Check the parameters now, as a local call would; the model is
        # resolved when the stream starts.
        _convert.stream_request("", text, parameters)

        def start(name: str) -> httpx.Request:
            request = _convert.stream_request(name, text, parameters)
            path = url_path(name, "generateStream")
            return self._settings.request(
                self._http, "POST", path, json_body(request), timeout, metadata, "text/event-stream"
            )

        return AsyncHttpTextStream(self, model, start)

    async def embed(
        self,
        texts: str | Sequence[str],
        *,
        normalize: bool = True,
        model: str | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> torch.Tensor:
        """Embed a text (a ``[D]`` float32 tensor) or a batch of texts (``[N, D]``)."""
        request = _convert.embed_request(await self._model(model), texts, normalize)
        path = url_path(request.model, "embed")
        data = await self._call("POST", path, json_body(request), timeout, metadata)
        return _convert.embeddings(parse_json(data, pb.EmbedResponse()), isinstance(texts, str))

    async def predict(
        self,
        tensors: Tensors,
        *,
        parameters: Mapping[str, Any] | None = None,
        model: str | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> dict[str, torch.Tensor | npt.NDArray[Any]]:
        """Run the model on named tensors; see :meth:`HttpClient.predict`."""
        model_name = await self._model(model)
        request, as_numpy = _convert.predict_request(model_name, tensors, parameters)
        path = url_path(request.model, "predict")
        data = await self._call("POST", path, json_body(request), timeout, metadata)
        return _convert.predict_outputs(parse_json(data, pb.PredictResponse()), as_numpy)

    async def aclose(self) -> None:
        """Close the connections; streams still being read are cut off."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncHttpClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
