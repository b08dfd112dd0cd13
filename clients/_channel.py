"""How the gRPC clients reach the server: the target, the service config, credentials.

:class:`GrpcClientBase` is the constructor :class:`~protoserve.clients.Client`
and :class:`~protoserve.clients.AsyncClient` share; :class:`ChannelSettings` is
what it derives from their arguments: the channel target (one endpoint, or
several to balance over), TLS and token credentials, metadata, and channel
options including the retry policy of :func:`service_config`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import grpc
import grpc.aio

from protoserve.common import balancing

from ._api import AsyncTransport, BaseClient, Metadata, Transport
from ._errors import from_grpc_error

__all__ = ["CallStream", "ChannelSettings", "GrpcClientBase", "service_config"]

_SERVICE = "protoserve.inference.v1.InferenceService"


def service_config(retries: int, balance: bool) -> dict[str, Any]:
    """The gRPC service config the clients use (:func:`protoserve.common.balancing.
    service_config`): round robin when balancing, and calls that end UNAVAILABLE (server
    down, restarting, model loading) retried up to ``retries`` times."""
    return balancing.service_config(retries=retries, balance=balance, services=[_SERVICE])


class ChannelSettings:
    """What both clients derive from their constructor arguments."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None,
        retries: int,
        tls: bool,
        root_certificates: bytes | None,
        token: str | None,
        metadata: Metadata,
        options: Sequence[tuple[str, Any]],
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        self.target, balance = balancing.target_of(target)
        self.timeout = timeout
        if (certificate_chain is None) != (private_key is None):
            raise ValueError("certificate_chain and private_key go together")
        self.tls = tls or root_certificates is not None or certificate_chain is not None
        self.metadata: tuple[tuple[str, str], ...] = tuple(metadata)
        self.credentials: grpc.ChannelCredentials | None = None
        if self.tls:
            # With a client certificate: mTLS, for a server that requires one.
            self.credentials = grpc.ssl_channel_credentials(
                root_certificates, private_key=private_key, certificate_chain=certificate_chain
            )
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

    def channel(self) -> grpc.Channel:
        if self.credentials is not None:
            return grpc.secure_channel(self.target, self.credentials, options=self.options)
        return grpc.insecure_channel(self.target, options=self.options)

    def aio_channel(self) -> grpc.aio.Channel:
        if self.credentials is not None:
            return grpc.aio.secure_channel(self.target, self.credentials, options=self.options)
        return grpc.aio.insecure_channel(self.target, options=self.options)

    def call_options(self, timeout: float | None, metadata: Metadata) -> dict[str, Any]:
        """A call's deadline (the client's unless given) and metadata (the client's and these)."""
        return {
            "timeout": self.timeout if timeout is None else timeout,
            "metadata": self.metadata + tuple(metadata),
        }


class GrpcClientBase(BaseClient):
    """The constructor of both gRPC clients; each names the transport it builds."""

    _transport_type: Callable[[ChannelSettings], Transport | AsyncTransport]

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
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
    ) -> None:
        settings = ChannelSettings(
            target,
            timeout=timeout,
            retries=retries,
            tls=tls,
            root_certificates=root_certificates,
            token=token,
            metadata=metadata,
            options=options,
            certificate_chain=certificate_chain,
            private_key=private_key,
        )
        super().__init__(self._transport_type(settings), model)


class CallStream:
    """What both gRPC streams share: the call, cancelling it, and how it ends."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._cancelled = False

    @contextmanager
    def _ending(self) -> Iterator[None]:
        """Around reading the call: its failure as a typed error, unless it was cancelled."""
        try:
            yield
        except grpc.RpcError as error:
            if not self._cancelled:
                raise from_grpc_error(error) from None
        finally:
            self._call.cancel()  # a call that has ended stays as it is

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()
