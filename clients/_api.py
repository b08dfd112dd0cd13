"""The methods every remote client has, written once: :class:`ClientAPI` and its asyncio twin.

A client is this API over a transport. The API turns arguments into a request
message, and a response message into Python values (``_convert``), without
I/O; the transport moves the messages, and provides only primitives (a unary
call, a server-streaming call, closing), written once per protocol and I/O
flavour: gRPC (``_grpc.py``, ``_grpc_aio.py``) and the gateway's HTTP
(``_http.py``, ``_http_aio.py``). So the blocking and the asyncio methods differ
only in ``await``, as httpx's ``Client`` and ``AsyncClient`` do over its
``BaseClient``; each public class adds its constructor and nothing else.
"""

# The async methods take `timeout` on purpose (ASYNC109): it is the deadline sent to
# the server with the call, which asyncio.timeout() around the call cannot carry, and
# it keeps their signatures those of the blocking methods.
# ruff: noqa: ASYNC109

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import numpy.typing as npt
from google.protobuf.message import Message

from protoserve.inference.v1 import inference_service_pb2 as pb

from ._closing import AsyncClosing, Closing
from ._convert import (
    embed_request,
    embeddings,
    generate_request,
    generation,
    model_info,
    predict_outputs,
    predict_request,
    stream_request,
)
from ._default_model import only_model
from ._stream import AsyncSource, Source
from ._types import Generation, ModelInfo

if TYPE_CHECKING:
    import torch

    Tensors = Mapping[str, torch.Tensor | npt.NDArray[Any]]

__all__ = ["AsyncClientAPI", "AsyncTransport", "BaseClient", "ClientAPI", "Metadata", "Transport"]

Metadata = Sequence[tuple[str, str]]
R = TypeVar("R")
S = TypeVar("S")  # the stream class a client's generate_stream returns


@dataclass(frozen=True)
class UnaryCall(Generic[R]):
    """One unary call, whatever carries it.

    Attributes:
        method: the RPC's name in ``InferenceService`` ("Generate"); the gRPC
            stub's method, and the key of its HTTP route.
        request: the request message.
        read: the Python value of the response message.
    """

    method: str
    request: Message
    read: Callable[[Any], R]


def _list_models() -> UnaryCall[list[ModelInfo]]:
    request = pb.ListModelsRequest()
    return UnaryCall("ListModels", request, lambda r: [model_info(m) for m in r.models])


def _get_model(name: str) -> UnaryCall[ModelInfo]:
    return UnaryCall("GetModel", pb.GetModelRequest(name=name), lambda r: model_info(r.model))


def _generate(model: str, text: str, parameters: Mapping[str, Any]) -> UnaryCall[Generation]:
    return UnaryCall("Generate", generate_request(model, text, parameters), generation)


def _embed(model: str, texts: str | Sequence[str], normalize: bool) -> UnaryCall[torch.Tensor]:
    single = isinstance(texts, str)
    request = embed_request(model, texts, normalize)
    return UnaryCall("Embed", request, lambda r: embeddings(r, single))


def _predict(
    model: str, tensors: Tensors, parameters: Mapping[str, Any] | None
) -> UnaryCall[dict[str, torch.Tensor | npt.NDArray[Any]]]:
    request, as_numpy = predict_request(model, tensors, parameters)
    return UnaryCall("Predict", request, lambda r: predict_outputs(r, as_numpy))


class Transport(Protocol):
    """The blocking primitives a protocol provides. Failures are typed errors."""

    def unary(
        self, method: str, request: Message, timeout: float | None, metadata: Metadata
    ) -> Any:
        """The response message of a unary call."""
        ...

    def stream(
        self, method: str, request: Message, timeout: float | None, metadata: Metadata
    ) -> Source:
        """A server-streaming call; it may wait for the first read to go out."""
        ...

    def close(self) -> None: ...


class AsyncTransport(Protocol):
    """The asyncio primitives a protocol provides (see :class:`Transport`)."""

    async def unary(
        self, method: str, request: Message, timeout: float | None, metadata: Metadata
    ) -> Any: ...

    def stream(
        self, method: str, request: Message, timeout: float | None, metadata: Metadata
    ) -> AsyncSource: ...

    async def close(self) -> None: ...


class BaseClient:
    """What a client holds whatever its flavour: a transport, and the default model."""

    def __init__(self, transport: Any, model: str | None) -> None:
        self._transport = transport
        self._default_model = model


class ClientAPI(BaseClient, Closing, Generic[S]):
    """The blocking methods, over a :class:`Transport`."""

    _transport: Transport
    _stream_type: Callable[[Source], S]

    def __init__(self, transport: Transport, model: str | None) -> None:
        super().__init__(transport, model)
        self._lock = threading.Lock()

    def _model(self, model: str | None) -> str:
        if model is not None:
            return model
        with self._lock:
            if self._default_model is None:
                self._default_model = only_model(self.models())
            return self._default_model

    def _call(self, call: UnaryCall[R], timeout: float | None, metadata: Metadata) -> R:
        return call.read(self._transport.unary(call.method, call.request, timeout, metadata))

    def models(self, *, timeout: float | None = None, metadata: Metadata = ()) -> list[ModelInfo]:
        """Every model the server holds, ready or not."""
        return self._call(_list_models(), timeout, metadata)

    def model(
        self, name: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> ModelInfo:
        """One model's description. Raises ``NotFound`` for an unknown name."""
        return self._call(_get_model(name), timeout, metadata)

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
        return self._call(_generate(self._model(model), text, parameters), timeout, metadata)

    def generate_stream(
        self,
        text: str,
        *,
        model: str | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
        **parameters: Any,
    ) -> S:
        """Continue ``text``, streaming the continuation (see :class:`TextStream`).

        ``timeout`` bounds the whole stream. Raises ``TypeError`` for an
        unknown parameter at once; call errors are raised while iterating.
        """
        request = stream_request(self._model(model), text, parameters)
        return self._stream_type(
            self._transport.stream("GenerateStream", request, timeout, metadata)
        )

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
        return self._call(_embed(self._model(model), texts, normalize), timeout, metadata)

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
        return self._call(_predict(self._model(model), tensors, parameters), timeout, metadata)

    def close(self) -> None:
        """Close the channel or connections; calls and streams still running are cancelled."""
        self._transport.close()


class AsyncClientAPI(BaseClient, AsyncClosing, Generic[S]):
    """The asyncio twin of :class:`ClientAPI`: the same methods, awaited.

    ``generate_stream`` is not a coroutine: ``async for chunk in client.generate_stream(...)``.
    """

    _transport: AsyncTransport
    _stream_type: Callable[[Callable[[], Awaitable[str]], Callable[[str], AsyncSource]], S]

    async def _model(self, model: str | None) -> str:
        if model is not None:
            return model
        if self._default_model is None:
            # Two tasks may both ask; both get the same answer, so no lock.
            self._default_model = only_model(await self.models())
        return self._default_model

    async def _call(self, call: UnaryCall[R], timeout: float | None, metadata: Metadata) -> R:
        return call.read(await self._transport.unary(call.method, call.request, timeout, metadata))

    async def models(
        self, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> list[ModelInfo]:
        """Every model the server holds, ready or not."""
        return await self._call(_list_models(), timeout, metadata)

    async def model(
        self, name: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> ModelInfo:
        """One model's description. Raises ``NotFound`` for an unknown name."""
        return await self._call(_get_model(name), timeout, metadata)

    async def generate(
        self,
        text: str,
        *,
        model: str | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
        **parameters: Any,
    ) -> Generation:
        """Continue ``text``; see :meth:`Client.generate`."""
        call = _generate(await self._model(model), text, parameters)
        return await self._call(call, timeout, metadata)

    def generate_stream(
        self,
        text: str,
        *,
        model: str | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
        **parameters: Any,
    ) -> S:
        """Continue ``text``, streaming it (see :class:`AsyncTextStream`).

        Not a coroutine: ``async for chunk in client.generate_stream(...)``.
        Raises ``TypeError`` for an unknown parameter at once.
        """
        # Check the parameters now, as a local call would; the model is
        # resolved when the stream starts.
        stream_request("", text, parameters)

        def start(name: str) -> AsyncSource:
            request = stream_request(name, text, parameters)
            return self._transport.stream("GenerateStream", request, timeout, metadata)

        return self._stream_type(partial(self._model, model), start)

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
        return await self._call(
            _embed(await self._model(model), texts, normalize), timeout, metadata
        )

    async def predict(
        self,
        tensors: Tensors,
        *,
        parameters: Mapping[str, Any] | None = None,
        model: str | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> dict[str, torch.Tensor | npt.NDArray[Any]]:
        """Run the model on named tensors; see :meth:`Client.predict`."""
        call = _predict(await self._model(model), tensors, parameters)
        return await self._call(call, timeout, metadata)

    async def aclose(self) -> None:
        """Close the channel or connections; calls and streams still running are cancelled."""
        await self._transport.close()
