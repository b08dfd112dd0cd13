"""The blocking gRPC client: :class:`Client`, over :class:`GrpcTransport`.

A call looks like calling the model in process: ``client.generate("def ")``
returns a ``str``, ``client.embed(texts)`` a ``torch.Tensor``, a misspelt
keyword is a ``TypeError``, and every failure is one typed exception from
:mod:`protoserve.clients._errors`, never a ``grpc.RpcError``. The methods are
:class:`~protoserve.clients._api.ClientAPI`'s; this module holds the blocking
gRPC primitives under them. The asyncio twins are in
:mod:`protoserve.clients._grpc_aio`; the channel settings both share, in
:mod:`protoserve.clients._channel`.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import grpc
from google.protobuf.message import Message

from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc

from ._api import ClientAPI, Metadata
from ._channel import CallStream, ChannelSettings, GrpcClientBase
from ._convert import StreamPart, stream_part
from ._errors import from_grpc_error
from ._stream import TextStream

__all__ = ["Client", "GrpcTransport"]


class GrpcStream(CallStream):
    """A server-streaming call's messages as steps; its failure as a typed error."""

    def __iter__(self) -> Generator[StreamPart, None, None]:
        with self._ending():
            for message in self._call:
                yield stream_part(message)


class GrpcTransport:
    """Blocking calls on one channel, with the client's deadline and metadata."""

    def __init__(self, settings: ChannelSettings) -> None:
        self._settings = settings
        self._channel = settings.channel()
        self._stub = pb_grpc.InferenceServiceStub(self._channel)

    def unary(
        self, method: str, request: Message, timeout: float | None, metadata: Metadata
    ) -> Any:
        try:
            return getattr(self._stub, method)(
                request, **self._settings.call_options(timeout, metadata)
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None

    def stream(
        self, method: str, request: Message, timeout: float | None, metadata: Metadata
    ) -> GrpcStream:
        rpc = getattr(self._stub, method)
        return GrpcStream(rpc(request, **self._settings.call_options(timeout, metadata)))

    def close(self) -> None:
        self._channel.close()


class Client(GrpcClientBase, ClientAPI[TextStream]):
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
        certificate_chain, private_key: PEM client certificate and its key, for a
            server that requires one (mTLS; ``serve --client-ca``); implies TLS.

    ``close()`` (or leaving a ``with`` block) closes the channel; calls and
    streams still running are cancelled.
    """

    _transport_type = GrpcTransport
    _stream_type = TextStream
