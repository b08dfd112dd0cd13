"""The asyncio gRPC client: :class:`AsyncClient`, over :class:`AsyncGrpcTransport`.

The same arguments, methods, values and exceptions as the blocking
:class:`~protoserve.clients.Client` (:mod:`protoserve.clients._grpc`), awaited.
"""

# `timeout` is the deadline of the call (see _api.py), not asyncio's.
# ruff: noqa: ASYNC109

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import Message

from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc

from ._api import AsyncClientAPI, Metadata
from ._channel import CallStream, ChannelSettings, GrpcClientBase
from ._convert import StreamPart, stream_part
from ._errors import from_grpc_error
from ._stream import AsyncTextStream

__all__ = ["AsyncClient", "AsyncGrpcTransport"]


class AsyncGrpcStream(CallStream):
    """The asyncio twin of :class:`~protoserve.clients._grpc.GrpcStream`."""

    async def __aiter__(self) -> AsyncGenerator[StreamPart, None]:
        with self._ending():
            async for message in self._call:
                yield stream_part(message)

    async def aclose(self) -> None:
        """Nothing to wait for: cancelling a gRPC call takes effect at once."""


class AsyncGrpcTransport:
    """asyncio calls on one channel, made on first use (see :class:`AsyncClient`)."""

    def __init__(self, settings: ChannelSettings) -> None:
        self._settings = settings
        self._channel: grpc.aio.Channel | None = None
        self._stub_: Any = None

    @property
    def _stub(self) -> Any:
        if self._stub_ is None:
            self._channel = self._settings.aio_channel()
            self._stub_ = pb_grpc.InferenceServiceStub(self._channel)
        return self._stub_

    async def unary(
        self, method: str, request: Message, timeout: float | None, metadata: Metadata
    ) -> Any:
        try:
            return await getattr(self._stub, method)(
                request, **self._settings.call_options(timeout, metadata)
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None

    def stream(
        self, method: str, request: Message, timeout: float | None, metadata: Metadata
    ) -> AsyncGrpcStream:
        rpc = getattr(self._stub, method)
        return AsyncGrpcStream(rpc(request, **self._settings.call_options(timeout, metadata)))

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)


class AsyncClient(GrpcClientBase, AsyncClientAPI[AsyncTextStream]):
    """The asyncio twin of :class:`Client`: the same arguments and methods, awaited.

    The channel is made on first use, so the client may be built outside the
    event loop that uses it.
    """

    _transport_type = AsyncGrpcTransport
    _stream_type = AsyncTextStream
