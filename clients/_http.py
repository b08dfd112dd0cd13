"""Clients for the REST/SSE gateway: the same methods and values as the gRPC clients.

:class:`HttpClient` and :class:`AsyncHttpClient` speak JSON over HTTP to
``protoserve gateway`` (or ``protoserve up``) where gRPC cannot go: through
proxies that only pass HTTP/1.1, from networks that block HTTP/2. They build
the same ``protoserve.inference.v1`` messages as the gRPC clients (through
``_convert``), send them as proto3 JSON, and parse the answers back into
messages, so a call returns the same Python values, and fails with the same
exception classes, over either transport.

Streams are read as Server-Sent Events, parsed line by line as they arrive.
"""

# The async methods take `timeout` on purpose (ASYNC109): it is the deadline sent to
# the server with the call, which asyncio.timeout() around the call cannot carry, and
# it keeps their signatures those of the gRPC AsyncClient.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import httpx
import numpy.typing as npt
from google.protobuf import json_format
from google.protobuf.message import Message

from protoserve.inference.v1 import inference_service_pb2 as pb

from . import _convert
from ._errors import DeadlineExceeded, ProtoserveError, Unavailable, from_http_error
from ._types import FinishReason, Generation, ModelInfo, Usage

if TYPE_CHECKING:
    import torch

    Tensors = Mapping[str, torch.Tensor | npt.NDArray[Any]]

__all__ = ["AsyncHttpClient", "AsyncHttpTextStream", "HttpClient", "HttpTextStream"]

DEFAULT_URL = "http://127.0.0.1:8080"

# The client waits this much longer than the deadline it sends, so that the
# server's DEADLINE_EXCEEDED (with its request id) arrives before httpx gives up.
_DEADLINE_MARGIN = 1.0
# Refused connections fail at once; this bounds a connect that hangs (a dropped SYN).
_CONNECT_TIMEOUT = 10.0

M = TypeVar("M", bound=Message)
Metadata = Sequence[tuple[str, str]]


# --- transport-independent pieces: URLs, headers, JSON <-> messages, errors ---


def _path(model: str, verb: str) -> str:
    # A model name is one path segment: quote "/" too, as the route's {model} expects.
    return f"/v1/models/{quote(model, safe='')}:{verb}"


def _body(message: Message) -> dict[str, Any]:
    """The request as proto3 JSON, without ``model``: the URL path carries it."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    data.pop("model", None)
    return data


def _parse(data: Any, message: M) -> M:
    # Unknown fields are ignored so that a newer server does not break an older client.
    return json_format.ParseDict(data, message, ignore_unknown_fields=True)


def _timeout(seconds: float | None) -> httpx.Timeout:
    if seconds is None:
        return httpx.Timeout(None, connect=_CONNECT_TIMEOUT)
    return httpx.Timeout(seconds + _DEADLINE_MARGIN, connect=min(seconds, _CONNECT_TIMEOUT))


def _deadline_headers(seconds: float | None) -> dict[str, str]:
    if seconds is None:
        return {}
    if seconds <= 0:
        raise ValueError(f"timeout must be positive, got {seconds}")
    return {"X-Request-Timeout": repr(float(seconds))}


def _client_headers(token: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    merged = {"Accept": "application/json", **(headers or {})}
    if token is not None:
        merged["Authorization"] = f"Bearer {token}"
    return merged


def _verify(verify: bool | str) -> ssl.SSLContext | bool:
    # httpx 0.28 deprecates a CA path as `verify`; build the context it asks for.
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    return verify


def _transport_error(error: httpx.TransportError, base_url: str) -> ProtoserveError:
    """The typed error for a failure below HTTP: the same class gRPC gives for it."""
    if isinstance(error, httpx.TimeoutException) and not isinstance(error, httpx.ConnectTimeout):
        return DeadlineExceeded(f"no answer from {base_url} in time: {error!r}")
    return Unavailable(f"cannot reach {base_url}: {error!r}")


def _error_of(response: httpx.Response) -> ProtoserveError:
    """The typed exception for a non-2xx response whose body has been read."""
    try:
        body: Any = response.json()
    except ValueError:  # not JSON: a proxy's HTML page, say
        body = response.text
    return from_http_error(response.status_code, body, response.headers)


class _SSEParser:
    """Server-Sent Events, one line at a time (the WHATWG event stream format).

    ``feed`` returns ``(event, data)`` when a blank line ends an event. Comments
    (``: keep-alive``) and ``id``/``retry`` fields are skipped; several ``data``
    lines are joined with newlines, as the format says.
    """

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            if not self._data and not self._event:
                return None
            event = (self._event or "message", "\n".join(self._data))
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


def _only_model(models: Sequence[ModelInfo]) -> str:
    if len(models) == 1:
        return models[0].name
    names = ", ".join(m.name for m in models) or "none"
    raise ValueError(f"the server holds several models ({names}): pass model=")


class _Stream:
    """What both stream classes share: reading events, and what they said."""

    def __init__(self, base_url: str) -> None:
        self._base_url = base_url
        self._parser = _SSEParser()
        self._response: httpx.Response | None = None
        self._started = False
        self._cancelled = False
        self._done = False
        self._ids: list[int] = []
        self._parts: list[str] = []
        self.finish_reason: FinishReason | None = None
        self.usage: Usage | None = None

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The ids of the tokens received so far."""
        return tuple(self._ids)

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._parts)

    def _opened(self, response: httpx.Response) -> None:
        self._response = response
        if not response.is_success:
            raise _error_of(response)

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
            part = _parse(json.loads(data), pb.GenerateStreamResponse())
            text, ids, finish_reason, usage = _convert.stream_part(part)
            self._ids.extend(ids)
            if finish_reason is not None:
                self.finish_reason = finish_reason
            if usage is not None:
                self.usage = usage
            if text:
                self._parts.append(text)
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


class HttpTextStream(_Stream):
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

    def __init__(self, http: httpx.Client, request: httpx.Request, base_url: str) -> None:
        super().__init__(base_url)
        self._http = http
        self._request = request
        self._next: Iterator[str] | None = None

    def __iter__(self) -> Iterator[str]:
        # A generator, so that a `for` loop that breaks drops it and its
        # `finally` closes the response, even while the stream itself is still
        # referenced by the caller.
        if self._started:
            return
        self._started = True
        try:
            if self._cancelled:
                return
            response = self._http.send(self._request, stream=True)
            if not response.is_success:
                response.read()
            self._opened(response)
            # Read on after `event: done` to the end of the body: a response read
            # to its end leaves its connection in the pool for the next call.
            for line in response.iter_lines():
                if text := self._feed(line, response):
                    yield text
            self._ended()
        except httpx.TransportError as error:
            if not self._cancelled:
                raise _transport_error(error, self._base_url) from None
        except httpx.StreamError:
            if not self._cancelled:
                raise
        finally:
            self.cancel()
            if self._response is not None:
                self._response.close()

    def __next__(self) -> str:
        if self._next is None:
            self._next = iter(self)
        return next(self._next)

    def cancel(self) -> None:
        """Close the response; the server stops generating. Harmless after the end."""
        if self._mark_cancelled() and self._response is not None:
            self._response.close()

    close = cancel

    def __enter__(self) -> HttpTextStream:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cancel()


class AsyncHttpTextStream(_Stream):
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
                raise _transport_error(error, self._base_url) from None
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


class _Settings:
    """What both clients derive from their constructor arguments."""

    def __init__(
        self,
        base_url: str,
        model: str | None,
        timeout: float | None,
        token: str | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        _deadline_headers(timeout)  # a bad default timeout fails here, not at the first call
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.headers = _client_headers(token, headers)

    def request(
        self,
        http: httpx.Client | httpx.AsyncClient,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        timeout: float | None,
        metadata: Metadata,
        accept: str = "application/json",
    ) -> httpx.Request:
        seconds = self.timeout if timeout is None else timeout
        headers = {**_deadline_headers(seconds), "Accept": accept}
        # The gateway passes Grpc-Metadata-<key> headers upstream as <key> metadata.
        headers.update((f"Grpc-Metadata-{key}", value) for key, value in metadata)
        return http.build_request(
            method, path, json=body, headers=headers, timeout=_timeout(seconds)
        )


class HttpClient:
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
    ``Unavailable`` when the gateway cannot be reached.
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
        self._settings = _Settings(base_url, model, timeout, token, headers)
        self.base_url = self._settings.base_url
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=self._settings.headers,
            verify=_verify(verify),
            timeout=_timeout(timeout),
        )
        self._default_model = model
        self._lock = threading.Lock()

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        timeout: float | None,
        metadata: Metadata,
    ) -> Any:
        request = self._settings.request(self._http, method, path, body, timeout, metadata)
        try:
            response = self._http.send(request)
        except httpx.TransportError as error:
            raise _transport_error(error, self.base_url) from None
        if not response.is_success:
            raise _error_of(response)
        return response.json()

    def _model(self, model: str | None) -> str:
        if model is not None:
            return model
        with self._lock:
            if self._default_model is None:
                self._default_model = _only_model(self.models())
            return self._default_model

    def models(self, *, timeout: float | None = None, metadata: Metadata = ()) -> list[ModelInfo]:
        """Every model the server holds, ready or not."""
        data = self._call("GET", "/v1/models", None, timeout, metadata)
        return [_convert.model_info(m) for m in _parse(data, pb.ListModelsResponse()).models]

    def model(
        self, name: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> ModelInfo:
        """One model's description. Raises ``NotFound`` for an unknown name."""
        data = self._call("GET", f"/v1/models/{quote(name, safe='')}", None, timeout, metadata)
        return _convert.model_info(_parse(data, pb.GetModelResponse()).model)

    def generate(
        self,
        text: str,
        *,
        model: str | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
        **parameters: Any,
    ) -> Generation:
        """Continue ``text``; returns the continuation, a ``str`` with its metadata.

        Args:
            parameters: ``max_new_tokens``, ``temperature``, ``top_k``,
                ``top_p``, ``seed``, ``stop_sequences``; None leaves one unset.

        Raises:
            TypeError: an unknown parameter.
            ProtoserveError: the typed error of a failed call.
        """
        request = _convert.generate_request(self._model(model), text, parameters)
        path = _path(request.model, "generate")
        data = self._call("POST", path, _body(request), timeout, metadata)
        return _convert.generation(_parse(data, pb.GenerateResponse()))

    def generate_stream(
        self,
        text: str,
        *,
        model: str | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
        **parameters: Any,
    ) -> HttpTextStream:
        """Continue ``text``, streaming it over SSE (see :class:`HttpTextStream`).

        ``timeout`` bounds the whole stream. Raises ``TypeError`` for an
        unknown parameter at once; call errors are raised while iterating.
        """
        request = _convert.stream_request(self._model(model), text, parameters)
        path = _path(request.model, "generateStream")
        http_request = self._settings.request(
            self._http, "POST", path, _body(request), timeout, metadata, "text/event-stream"
        )
        return HttpTextStream(self._http, http_request, self.base_url)

    def embed(
        self,
        texts: str | Sequence[str],
        *,
        normalize: bool = True,
        model: str | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> torch.Tensor:
        """Embed a text (a ``[D]`` float32 tensor) or a batch of texts (``[N, D]``)."""
        request = _convert.embed_request(self._model(model), texts, normalize)
        path = _path(request.model, "embed")
        data = self._call("POST", path, _body(request), timeout, metadata)
        return _convert.embeddings(_parse(data, pb.EmbedResponse()), isinstance(texts, str))

    def predict(
        self,
        tensors: Tensors,
        *,
        parameters: Mapping[str, Any] | None = None,
        model: str | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> dict[str, torch.Tensor | npt.NDArray[Any]]:
        """Run the model on named tensors; returns its named outputs.

        Outputs are numpy arrays when every input was one, else torch tensors
        (bfloat16 outputs are always torch: numpy has no such type).
        """
        request, as_numpy = _convert.predict_request(self._model(model), tensors, parameters)
        path = _path(request.model, "predict")
        data = self._call("POST", path, _body(request), timeout, metadata)
        return _convert.predict_outputs(_parse(data, pb.PredictResponse()), as_numpy)

    def close(self) -> None:
        """Close the connections; streams still being read are cut off."""
        self._http.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


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
        self._settings = _Settings(base_url, model, timeout, token, headers)
        self.base_url = self._settings.base_url
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._settings.headers,
            verify=_verify(verify),
            timeout=_timeout(timeout),
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
            raise _transport_error(error, self.base_url) from None
        if not response.is_success:
            raise _error_of(response)
        return response.json()

    async def _model(self, model: str | None) -> str:
        if model is not None:
            return model
        if self._default_model is None:
            self._default_model = _only_model(await self.models())
        return self._default_model

    async def models(
        self, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> list[ModelInfo]:
        """Every model the server holds, ready or not."""
        data = await self._call("GET", "/v1/models", None, timeout, metadata)
        return [_convert.model_info(m) for m in _parse(data, pb.ListModelsResponse()).models]

    async def model(
        self, name: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> ModelInfo:
        """One model's description. Raises ``NotFound`` for an unknown name."""
        path = f"/v1/models/{quote(name, safe='')}"
        data = await self._call("GET", path, None, timeout, metadata)
        return _convert.model_info(_parse(data, pb.GetModelResponse()).model)

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
        path = _path(request.model, "generate")
        data = await self._call("POST", path, _body(request), timeout, metadata)
        return _convert.generation(_parse(data, pb.GenerateResponse()))

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
            path = _path(name, "generateStream")
            return self._settings.request(
                self._http, "POST", path, _body(request), timeout, metadata, "text/event-stream"
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
        path = _path(request.model, "embed")
        data = await self._call("POST", path, _body(request), timeout, metadata)
        return _convert.embeddings(_parse(data, pb.EmbedResponse()), isinstance(texts, str))

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
        path = _path(request.model, "predict")
        data = await self._call("POST", path, _body(request), timeout, metadata)
        return _convert.predict_outputs(_parse(data, pb.PredictResponse()), as_numpy)

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
