"""Clients for the REST/SSE gateway: the same methods and values as the gRPC clients.

:class:`HttpClient` and :class:`AsyncHttpClient` speak JSON over HTTP to
``protoserve gateway`` (or ``protoserve up``) where gRPC cannot go: through
proxies that only pass HTTP/1.1, from networks that block HTTP/2. They build
the same ``protoserve.inference.v1`` messages as the gRPC clients (through
``_convert``), send them as proto3 JSON, and parse the answers back into
messages, so a call returns the same Python values, and fails with the same
exception classes, over either transport.

Streams are read as Server-Sent Events (:mod:`protoserve.clients._sse`), parsed
line by line as they arrive. This module holds the blocking
:class:`HttpClient` and its :class:`HttpTextStream`; the asyncio twins are in
:mod:`protoserve.clients._http_aio`, and what both put on the wire in
:mod:`protoserve.clients._http_wire`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
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

__all__ = ["HttpClient", "HttpTextStream"]


class HttpTextStream(SSEStream):
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
                raise transport_error(error, self._base_url) from None
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
        self._settings = Settings(base_url, model, timeout, token, headers)
        self.base_url = self._settings.base_url
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=self._settings.headers,
            verify=ssl_verify(verify),
            timeout=httpx_timeout(timeout),
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
            raise transport_error(error, self.base_url) from None
        if not response.is_success:
            raise error_of(response)
        return response.json()

    def _model(self, model: str | None) -> str:
        if model is not None:
            return model
        with self._lock:
            if self._default_model is None:
                self._default_model = only_model(self.models())
            return self._default_model

    def models(self, *, timeout: float | None = None, metadata: Metadata = ()) -> list[ModelInfo]:
        """Every model the server holds, ready or not."""
        data = self._call("GET", "/v1/models", None, timeout, metadata)
        return [_convert.model_info(m) for m in parse_json(data, pb.ListModelsResponse()).models]

    def model(
        self, name: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> ModelInfo:
        """One model's description. Raises ``NotFound`` for an unknown name."""
        data = self._call("GET", f"/v1/models/{quote(name, safe='')}", None, timeout, metadata)
        return _convert.model_info(parse_json(data, pb.GetModelResponse()).model)

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
        path = url_path(request.model, "generate")
        data = self._call("POST", path, json_body(request), timeout, metadata)
        return _convert.generation(parse_json(data, pb.GenerateResponse()))

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
        path = url_path(request.model, "generateStream")
        http_request = self._settings.request(
            self._http, "POST", path, json_body(request), timeout, metadata, "text/event-stream"
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
        path = url_path(request.model, "embed")
        data = self._call("POST", path, json_body(request), timeout, metadata)
        return _convert.embeddings(parse_json(data, pb.EmbedResponse()), isinstance(texts, str))

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
        path = url_path(request.model, "predict")
        data = self._call("POST", path, json_body(request), timeout, metadata)
        return _convert.predict_outputs(parse_json(data, pb.PredictResponse()), as_numpy)

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
