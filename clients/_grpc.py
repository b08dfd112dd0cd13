"""gRPC clients: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

A call looks like calling the model in process: ``client.generate("def ")``
returns a ``str``, ``client.embed(texts)`` a ``torch.Tensor``, a misspelt
keyword is a ``TypeError``, and every failure is one typed exception from
:mod:`protoserve.clients._errors`, never a ``grpc.RpcError``.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import numpy.typing as npt

from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc

from . import _convert
from ._errors import from_grpc_error
from ._types import FinishReason, Generation, ModelInfo, Usage

if TYPE_CHECKING:
    import torch

    Tensors = Mapping[str, torch.Tensor | npt.NDArray[Any]]

__all__ = ["AsyncClient", "AsyncTextStream", "Client", "TextStream", "service_config"]

_SERVICE = "protoserve.inference.v1.InferenceService"
Metadata = Sequence[tuple[str, str]]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _target(target: str | Sequence[str]) -> tuple[str, bool]:
    """The channel target for one endpoint or several, and whether it balances.

    Several ``host:port`` endpoints become one ``ipv4:`` (or ``ipv6:``) target,
    gRPC's static address list, so round robin sees each as a backend. Names
    cannot be listed that way: one ``dns:///name:port`` target with several
    addresses does the same.
    """
    if isinstance(target, str):
        return target, target.startswith("dns:")
    endpoints = list(target)
    if not endpoints:
        raise ValueError("target: give at least one endpoint")
    if len(endpoints) == 1:
        return endpoints[0], endpoints[0].startswith("dns:")
    hosts = [endpoint.rpartition(":")[0] for endpoint in endpoints]
    if not all(_is_ip(host) for host in hosts):
        raise ValueError(
            "several endpoints must be IP addresses ('10.0.0.1:50051'); "
            "for names use one 'dns:///name:port' target"
        )
    scheme = "ipv6" if all(host.startswith("[") for host in hosts) else "ipv4"
    return f"{scheme}:{','.join(endpoints)}", True


def service_config(retries: int, balance: bool) -> dict[str, Any]:
    """The gRPC service config the clients use.

    Calls that end UNAVAILABLE (server down, restarting, model loading) are
    retried up to ``retries`` times with exponential backoff. gRPC retries a
    stream only until its first response arrives, so a stream is never
    replayed after text has reached the caller.
    """
    config: dict[str, Any] = {}
    if balance:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    if retries > 0:
        config["methodConfig"] = [
            {
                "name": [{"service": _SERVICE}],
                "retryPolicy": {
                    "maxAttempts": retries + 1,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return config


class _Settings:
    """What both clients derive from their constructor arguments."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        model: str | None,
        timeout: float | None,
        retries: int,
        tls: bool,
        root_certificates: bytes | None,
        token: str | None,
        metadata: Metadata,
        options: Sequence[tuple[str, Any]],
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        self.target, balance = _target(target)
        self.model = model
        self.timeout = timeout
        self.tls = tls or root_certificates is not None
        self.metadata: tuple[tuple[str, str], ...] = tuple(metadata)
        self.credentials: grpc.ChannelCredentials | None = None
        if self.tls:
            self.credentials = grpc.ssl_channel_credentials(root_certificates)
            if token is not None:
                # Call credentials are only ever sent over TLS: gRPC's guard
                # against leaking a token in clear text.
                self.credentials = grpc.composite_channel_credentials(
                    self.credentials, grpc.access_token_call_credentials(token)
                )
        elif token is not None:
            self.metadata += (("authorization", f"Bearer {token}"),)
        defaults: dict[str, Any] = {
            "grpc.enable_retries": 1,
            "grpc.service_config": json.dumps(service_config(retries, balance)),
            # gRPC waits 1 s or more before reconnecting to a server that was
            # down; retries would all fail inside that wait. Reconnect sooner.
            "grpc.initial_reconnect_backoff_ms": 100,
            "grpc.min_reconnect_backoff_ms": 100,
            "grpc.max_reconnect_backoff_ms": 2000,
            # Tokens and tensors can be large.
            "grpc.max_receive_message_length": 64 * 1024 * 1024,
            "grpc.max_send_message_length": 64 * 1024 * 1024,
        }
        defaults.update(dict(options))  # the caller's options win
        self.options = list(defaults.items())

    def call_metadata(self, extra: Metadata) -> tuple[tuple[str, str], ...]:
        return self.metadata + tuple(extra)

    def deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


def _only_model(models: Sequence[ModelInfo]) -> str:
    if len(models) == 1:
        return models[0].name
    names = ", ".join(m.name for m in models) or "none"
    raise ValueError(f"the server holds several models ({names}): pass model=")


class TextStream:
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
        self._call = call
        self._cancelled = False
        self._done = False
        self._ids: list[int] = []
        self._parts: list[str] = []
        self._next: Iterator[str] | None = None
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

    def __iter__(self) -> Iterator[str]:
        # A generator, so that a `for` loop that breaks drops it and its
        # `finally` cancels the call, even while the stream itself is still
        # referenced by the caller.
        try:
            for message in self._call:
                text, ids, finish_reason, usage = _convert.stream_part(message)
                self._ids.extend(ids)
                if finish_reason is not None:
                    self.finish_reason = finish_reason
                if usage is not None:
                    self.usage = usage
                if text:
                    self._parts.append(text)
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
        self._settings = _Settings(
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
                self._default_model = _only_model(self.models())
            return self._default_model

    def models(self, *, timeout: float | None = None, metadata: Metadata = ()) -> list[ModelInfo]:
        """Every model the server holds, ready or not."""
        try:
            response = self._stub.ListModels(
                pb.ListModelsRequest(),
                timeout=self._settings.deadline(timeout),
                metadata=self._settings.call_metadata(metadata),
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None
        return [_convert.model_info(m) for m in response.models]

    def model(
        self, name: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> ModelInfo:
        """One model's description. Raises ``NotFound`` for an unknown name."""
        try:
            response = self._stub.GetModel(
                pb.GetModelRequest(name=name),
                timeout=self._settings.deadline(timeout),
                metadata=self._settings.call_metadata(metadata),
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None
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
        try:
            response = self._stub.Generate(
                request,
                timeout=self._settings.deadline(timeout),
                metadata=self._settings.call_metadata(metadata),
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None
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
        try:
            response = self._stub.Embed(
                request,
                timeout=self._settings.deadline(timeout),
                metadata=self._settings.call_metadata(metadata),
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None
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
        try:
            response = self._stub.Predict(
                request,
                timeout=self._settings.deadline(timeout),
                metadata=self._settings.call_metadata(metadata),
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None
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


class AsyncTextStream:
    """The asyncio twin of :class:`TextStream`: ``async for chunk in stream``.

    The call starts on the first iteration. Leaving the loop early cancels it
    (when the loop drops the iterator, as asyncio finalizes it); so do
    :meth:`cancel`, leaving an ``async with`` block and closing the client.
    """

    def __init__(self, client: AsyncClient, model: str | None, start: Any) -> None:
        self._client = client
        self._model = model
        self._start = start
        self._call: Any = None
        self._cancelled = False
        self._done = False
        self._ids: list[int] = []
        self._parts: list[str] = []
        self._next: AsyncIterator[str] | None = None
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

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            model = await self._client._model(self._model)
            if self._cancelled:
                return
            self._call = self._start(model)
            async for message in self._call:
                text, ids, finish_reason, usage = _convert.stream_part(message)
                self._ids.extend(ids)
                if finish_reason is not None:
                    self.finish_reason = finish_reason
                if usage is not None:
                    self.usage = usage
                if text:
                    self._parts.append(text)
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
        self._settings = _Settings(
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
            self._default_model = _only_model(await self.models())
        return self._default_model

    async def models(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, as in Client
        metadata: Metadata = (),
    ) -> list[ModelInfo]:
        """Every model the server holds, ready or not."""
        try:
            response = await self._stub.ListModels(
                pb.ListModelsRequest(),
                timeout=self._settings.deadline(timeout),
                metadata=self._settings.call_metadata(metadata),
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None
        return [_convert.model_info(m) for m in response.models]

    async def model(
        self,
        name: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: Metadata = (),
    ) -> ModelInfo:
        """One model's description. Raises ``NotFound`` for an unknown name."""
        try:
            response = await self._stub.GetModel(
                pb.GetModelRequest(name=name),
                timeout=self._settings.deadline(timeout),
                metadata=self._settings.call_metadata(metadata),
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None
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
        try:
            response = await self._stub.Generate(
                request,
                timeout=self._settings.deadline(timeout),
                metadata=self._settings.call_metadata(metadata),
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None
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
        try:
            response = await self._stub.Embed(
                request,
                timeout=self._settings.deadline(timeout),
                metadata=self._settings.call_metadata(metadata),
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None
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
        try:
            response = await self._stub.Predict(
                request,
                timeout=self._settings.deadline(timeout),
                metadata=self._settings.call_metadata(metadata),
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None
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
