"""The blocking gRPC client: :class:`Client` and its :class:`TextStream`.

A call looks like calling the model in process: ``client.generate("def ")``
returns a ``str``, ``client.embed(texts)`` a ``torch.Tensor``, a misspelt
keyword is a ``TypeError``, and every failure is one typed exception from
:mod:`protoserve.clients._errors`, never a ``grpc.RpcError``. The asyncio
twins are in :mod:`protoserve.clients._grpc_aio`; the channel settings both
share, in :mod:`protoserve.clients._channel`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
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

__all__ = ["Client", "TextStream"]


T = TypeVar("T")


class TextStream(StreamRecord):
    """The text of a streamed generation, chunk by chunk, as it is produced.

    Iterate it once: ``for chunk in stream`` yields non-empty ``str`` chunks.
    Leaving the loop early (``break``, an exception) cancels the call, and with
    it the generation on the server, at once; so do :meth:`cancel`, leaving a
    ``with`` block and closing the client. After the end, ``finish_reason``,
    ``usage`` and ``token_ids`` describe the whole generation.

    Raises (while iterating):
        ProtoserveError: the typed error the call ended with.
    """

    def __init__(self, call: Any) -> None:
        super().__init__()
        self._call = call
        self._cancelled = False
        self._done = False
        self._next: Iterator[str] | None = None

    def __iter__(self) -> Iterator[str]:
        # A generator, so that a `for` loop that breaks drops it and its
        # `finally` cancels the call, even while the stream itself is still
        # referenced by the caller.
        try:
            for message in self._call:
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

    def __next__(self) -> str:
        if self._next is None:
            self._next = iter(self)
        return next(self._next)

    def cancel(self) -> None:
        """Cancel the call; the server stops generating. Harmless after the end."""
        if not self._done and not self._cancelled:
            self._cancelled = True
            self.finish_reason = self.finish_reason or FinishReason.CANCELLED
            self._call.cancel()

    close = cancel

    def __enter__(self) -> TextStream:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cancel()


class Client:
    """A blocking client of a protoserve server.

    Args:
        target: ``host:port``, a gRPC target (``dns:///name:port``), or a list
            of ``ip:port`` endpoints to balance over (round robin).
        model: the model calls use when they name none; None means the one
            model the server holds (a ``ValueError`` if it holds several).
        timeout: the deadline of each call in seconds; None waits forever.
        retries: how many times a call that ends UNAVAILABLE is retried.
        tls: use TLS (implied by ``root_certificates``).
        root_certificates: PEM roots to trust; None trusts the system's.
        token: a bearer token sent with every call.
        metadata: gRPC metadata sent with every call.
        options: gRPC channel options; they override the client's own.
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
        s = self._settings
        if s.credentials is not None:
            self._channel = grpc.secure_channel(s.target, s.credentials, options=s.options)
        else:
            self._channel = grpc.insecure_channel(s.target, options=s.options)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._default_model = model
        self._lock = threading.Lock()

    def _model(self, model: str | None) -> str:
        if model is not None:
            return model
        with self._lock:
            if self._default_model is None:
                self._default_model = only_model(self.models())
            return self._default_model

    def _call(
        self, rpc: Callable[..., T], request: Message, timeout: float | None, metadata: Metadata
    ) -> T:
        """One unary call with the client's deadline and metadata; failures as typed errors."""
        try:
            return rpc(
                request,
                timeout=self._settings.deadline(timeout),
                metadata=self._settings.call_metadata(metadata),
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None

    def models(self, *, timeout: float | None = None, metadata: Metadata = ()) -> list[ModelInfo]:
        """Every model the server holds, ready or not."""
        response = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout, metadata)
        return [_convert.model_info(m) for m in response.models]

    def model(
        self, name: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> ModelInfo:
        """One model's description. Raises ``NotFound`` for an unknown name."""
        response = self._call(self._stub.GetModel, pb.GetModelRequest(name=name), timeout, metadata)
        return _convert.model_info(response.model)

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
        response = self._call(self._stub.Generate, request, timeout, metadata)
        return _convert.generation(response)

    def generate_stream(
        self,
        text: str,
        *,
        model: str | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
        **parameters: Any,
    ) -> TextStream:
        """Continue ``text``, streaming the continuation (see :class:`TextStream`).

        ``timeout`` bounds the whole stream. Raises ``TypeError`` for an
        unknown parameter at once; call errors are raised while iterating.
        """
        request = _convert.stream_request(self._model(model), text, parameters)
        call = self._stub.GenerateStream(
            request,
            timeout=self._settings.deadline(timeout),
            metadata=self._settings.call_metadata(metadata),
        )
        return TextStream(call)

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
        response = self._call(self._stub.Embed, request, timeout, metadata)
        return _convert.embeddings(response, isinstance(texts, str))

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
        response = self._call(self._stub.Predict, request, timeout, metadata)
        return _convert.predict_outputs(response, as_numpy)

    def close(self) -> None:
        """Close the channel; calls and streams still running are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
