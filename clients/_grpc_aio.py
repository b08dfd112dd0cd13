"""The asyncio gRPC client: :class:`AsyncClient` and its :class:`AsyncTextStream`.

The same arguments, methods, values and exceptions as the blocking
:class:`~protoserve.clients.Client` (:mod:`protoserve.clients._grpc`), awaited.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
import numpy.typing as npt
from google.protobuf.message import Message

from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc

from . import _convert
from ._channel import ChannelSettings, Metadata
from ._default_model import only_model
from ._errors import from_grpc_error
from ._record import StreamRecord
from ._types import FinishReason, Generation, ModelInfo

if TYPE_CHECKING:
    import torch

    Tensors = Mapping[str, torch.Tensor | npt.NDArray[Any]]

__all__ = ["AsyncClient", "AsyncTextStream"]


T = TypeVar("T")


class AsyncTextStream(StreamRecord):
    """The asyncio twin of :class:`TextStream`: ``async for chunk in stream``.

    The call starts on the first iteration. Leaving the loop early cancels it
    (when the loop drops the iterator, as asyncio finalizes it); so do
    :meth:`cancel`, leaving an ``async with`` block and closing the client.
    """

    def __init__(self, client: AsyncClient, model: str | None, start: Any) -> None:
        super().__init__()
        self._client = client
        self._model = model
        self._start = start
        self._call: Any = None
        self._cancelled = False
        self._done = False
        self._next: AsyncIterator[str] | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            model = await self._client._model(self._model)
            if self._cancelled:
                return
            self._call = self._start(model)
            async for message in self._call:
                text = self._record(message)
                if text:
                    yield text
            self._done = True
        except grpc.RpcError as error:
            if self._cancelled:
                return
            raise from_grpc_error(error) from None
        finally:
            if not self._done:
                self.cancel()

    async def __anext__(self) -> str:
        if self._next is None:
            self._next = aiter(self)
        return await anext(self._next)

    def cancel(self) -> None:
        """Cancel the call; the server stops generating. Harmless after the end."""
        if not self._done and not self._cancelled:
            self._cancelled = True
            self.finish_reason = self.finish_reason or FinishReason.CANCELLED
            if self._call is not None:
                self._call.cancel()

    async def aclose(self) -> None:
        """Cancel the call (see :meth:`cancel`)."""
        self.cancel()

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cancel()


class AsyncClient:
    """The asyncio twin of :class:`Client`: the same arguments and methods, awaited.

    The channel is made on first use, so the client may be built outside the
    event loop that uses it.
    """

    def __init__(
        self,
        target: str | Sequence[str] = "127.0.0.1:50051",
        *,
        model: str | None = None,
        timeout: float | None = None,
        retries: int = 3,
        tls: bool = False,
        root_certificates: bytes | None = None,
        token: str | None = None,
        metadata: Metadata = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._settings = ChannelSettings(
            target,
            model=model,
            timeout=timeout,
            retries=retries,
            tls=tls,
            root_certificates=root_certificates,
            token=token,
            metadata=metadata,
            options=options,
        )
        self._channel: grpc.aio.Channel | None = None
        self._stub_: pb_grpc.InferenceServiceAsyncStub | None = None
        self._default_model = model

    @property
    def _stub(self) -> pb_grpc.InferenceServiceAsyncStub:
        if self._stub_ is None:
            s = self._settings
            if s.credentials is not None:
                self._channel = grpc.aio.secure_channel(s.target, s.credentials, options=s.options)
            else:
                self._channel = grpc.aio.insecure_channel(s.target, options=s.options)
            self._stub_ = pb_grpc.InferenceServiceStub(self._channel)
        return self._stub_

    async def _model(self, model: str | None) -> str:
        if model is not None:
            return model
        if self._default_model is None:
            # Two tasks may both ask; both get the same answer, so no lock.
            self._default_model = only_model(await self.models())
        return self._default_model

    async def _call(
        self,
        rpc: Callable[..., Awaitable[T]],
        request: Message,
        deadline: float | None,
        metadata: Metadata,
    ) -> T:
        """One unary call with the client's deadline and metadata; failures as typed errors."""
        try:
            return await rpc(
                request,
                timeout=self._settings.deadline(deadline),
                metadata=self._settings.call_metadata(metadata),
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None

    async def models(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, as in Client
        metadata: Metadata = (),
    ) -> list[ModelInfo]:
        """Every model the server holds, ready or not."""
        response = await self._call(
            self._stub.ListModels, pb.ListModelsRequest(), timeout, metadata
        )
        return [_convert.model_info(m) for m in response.models]

    async def model(
        self,
        name: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: Metadata = (),
    ) -> ModelInfo:
        """One model's description. Raises ``NotFound`` for an unknown name."""
        response = await self._call(
            self._stub.GetModel, pb.GetModelRequest(name=name), timeout, metadata
        )
        return _convert.model_info(response.model)

    async def generate(
        self,
        text: str,
        *,
        model: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: Metadata = (),
        **parameters: Any,
    ) -> Generation:
        """Continue ``text``; see :meth:`Client.generate`."""
        request = _convert.generate_request(await self._model(model), text, parameters)
        response = await self._call(self._stub.Generate, request, timeout, metadata)
        return _convert.generation(response)

    def generate_stream(
        self,
        text: str,
        *,
        model: str | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
        **parameters: Any,
    ) -> AsyncTextStream:
        """Continue ``text``, streaming it (see :class:`AsyncTextStream`).

        Not a coroutine: ``async for chunk in client.generate_stream(...)``.
        Raises ``TypeError`` for an unknown parameter at once.
        """
        # Check the parameters now, as a local call would; the model is
        # resolved when the stream starts.
        _convert.stream_request("", text, parameters)

        def start(name: str) -> Any:
            return self._stub.GenerateStream(
                _convert.stream_request(name, text, parameters),
                timeout=self._settings.deadline(timeout),
                metadata=self._settings.call_metadata(metadata),
            )

        return AsyncTextStream(self, model, start)

    async def embed(
        self,
        texts: str | Sequence[str],
        *,
        normalize: bool = True,
        model: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: Metadata = (),
    ) -> torch.Tensor:
        """Embed a text (``[D]``) or a batch of texts (``[N, D]``), float32."""
        request = _convert.embed_request(await self._model(model), texts, normalize)
        response = await self._call(self._stub.Embed, request, timeout, metadata)
        return _convert.embeddings(response, isinstance(texts, str))

    async def predict(
        self,
        tensors: Tensors,
        *,
        parameters: Mapping[str, Any] | None = None,
        model: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: Metadata = (),
    ) -> dict[str, torch.Tensor | npt.NDArray[Any]]:
        """Run the model on named tensors; see :meth:`Client.predict`."""
        request, as_numpy = _convert.predict_request(await self._model(model), tensors, parameters)
        response = await self._call(self._stub.Predict, request, timeout, metadata)
        return _convert.predict_outputs(response, as_numpy)

    async def aclose(self) -> None:
        """Close the channel; calls and streams still running are cancelled."""
        if self._channel is not None:
            await self._channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
