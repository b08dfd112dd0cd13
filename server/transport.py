"""gRPC transport limits: what one connection may hold, and what one call must send.

Two halves, both for every service the server has (ours, the Open Inference
Protocol, health, reflection):

- :func:`transport_options`: grpc core's channel arguments for the HTTP/2
  connection: concurrent streams per connection (``SETTINGS_MAX_CONCURRENT_STREAMS``;
  a stream past it is refused with ``RST_STREAM REFUSED_STREAM``), the server's own
  keepalive pings, and the enforcement of the client's (too many pings: GOAWAY
  ``ENHANCE_YOUR_CALM``).
- :class:`WholeRequest`: a server interceptor that makes every unary-request method
  (unary, or server-streaming) read its request itself: exactly one message, then
  the end of the stream, within ``read_timeout`` seconds. grpcio's asyncio server
  reads that message before any of our code runs, and when the stream ends without
  one (END_STREAM and no message, or a length prefix longer than what follows) it
  returns without a status: the call stays open until the client goes
  (``_handle_unary_unary_rpc`` in grpcio's ``aio/server.pyx.pxi``). Nor does it look
  for a second message. Read here, every such call ends with a status:
  INVALID_ARGUMENT for no whole message or one too many, DEADLINE_EXCEEDED when the
  message has not arrived (with its end) within the bound.

docs/adr/0017 says why this way; docs/security.md ("gRPC transport limits") what a
user can set.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

import grpc
from google.protobuf.message import DecodeError

from protoserve.server.calls import abandon, begin, framed, method_label, refusal
from protoserve.server.config import ServerConfig
from protoserve.server.metrics import Metrics
from protoserve.server.runtime.errors import InvalidArgument, ProtoserveError

__all__ = ["RequestTimedOut", "WholeRequest", "transport_options"]

Context = grpc.aio.ServicerContext[Any, Any]
#: What ``context.read()`` returns once the request stream has ended (not in grpc-stubs).
EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]

if TYPE_CHECKING:  # generic in grpc-stubs only
    Handler = grpc.RpcMethodHandler[Any, Any]
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def transport_options(config: ServerConfig) -> list[tuple[str, int]]:
    """grpc core's channel arguments for ``config``'s transport limits."""
    return [
        *_connection_age(config),
        # Per connection; grpc core advertises it in SETTINGS and refuses a stream past
        # it (RST_STREAM REFUSED_STREAM). The process-wide bound on streaming calls is
        # the runtime's max_streams; this one bounds what a single connection can hold.
        ("grpc.max_concurrent_streams", config.max_streams_per_connection),
        # The server's pings on a connection quiet for this long, and how long it waits
        # for the ack before closing the connection: a peer that vanished is noticed.
        ("grpc.keepalive_time_ms", _ms(config.keepalive_time)),
        ("grpc.keepalive_timeout_ms", _ms(config.keepalive_timeout)),
        # The client's pings: closer together than this while no data flows is a strike;
        # one strike past the limit and the connection gets GOAWAY ENHANCE_YOUR_CALM.
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(config.keepalive_min_ping_interval)),
        ("grpc.http2.max_ping_strikes", config.keepalive_max_ping_strikes),
        # Pings on a connection without calls: allowed only when asked for.
        ("grpc.keepalive_permit_without_calls", int(config.keepalive_permit_without_calls)),
    ]


def _connection_age(config: ServerConfig) -> list[tuple[str, int]]:
    """A connection's most age, then GOAWAY: its client connects again and resolves the
    server's name anew, reaching servers added since (docs/deploy.md). Its calls in
    flight go on for the grace; grpc core's defaults are no age and no grace limit."""
    options = []
    if config.max_connection_age is not None:
        options.append(("grpc.max_connection_age_ms", _ms(config.max_connection_age)))
        if config.max_connection_age_grace is not None:
            options.append(
                ("grpc.max_connection_age_grace_ms", _ms(config.max_connection_age_grace))
            )
    return options


class Admission(Protocol):
    """Who decides, as a call arrives, whether the server takes it (the Runtime)."""

    def admit(self) -> bool:
        """Whether the call arriving now is taken; True obliges one :meth:`release`."""
        ...

    def release(self) -> None:
        """A call taken has ended."""
        ...


class _Always:
    """Every call is taken (no runtime behind the interceptor)."""

    def admit(self) -> bool:
        return True

    def release(self) -> None:
        pass


class RequestTimedOut(ProtoserveError):
    """The whole request did not arrive within the server's ``--request-read-timeout``."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


async def _one_message(context: Context, method: str, read_timeout: float) -> object:
    """The call's one request message, once its stream has ended after it.

    Raises:
        InvalidArgument: the stream ended without a whole message, or sent a second
            one; or the message does not parse (for a deserializer that raises).
        RequestTimedOut: the message and the stream's end took longer than ``read_timeout``.
    """
    try:
        async with asyncio.timeout(read_timeout):
            request = await context.read()
            if request is EOF:
                # grpc core reports a truncated message (a length prefix longer than what
                # followed) as no message at all: the two read the same here.
                raise InvalidArgument(
                    f"{method} takes one request message; the call ended without a whole one"
                )
            if await context.read() is not EOF:
                raise InvalidArgument(
                    f"{method} takes one request message; the call sent more than one"
                )
            return request
    except TimeoutError:
        raise RequestTimedOut(
            f"the request of {method} did not arrive whole within {read_timeout:g}s "
            "(the server's --request-read-timeout)"
        ) from None
    except DecodeError as exc:  # grpcio's own servicers (health) parse strictly
        raise InvalidArgument(f"the request of {method} does not parse: {exc}") from None


class WholeRequest(_ServerInterceptor):
    """Turns every unary-request method handler into one that reads its request itself
    (the module docstring); a refusal is answered in the call's frame
    (:func:`~protoserve.server.calls.refusal`: request id, access line, ``metrics``).

    Handlers whose request is a stream, and synchronous handlers, are left as they are.
    """

    def __init__(
        self,
        read_timeout: float,
        metrics: Metrics | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.read_timeout = read_timeout
        self.metrics = metrics
        #: Whether the server takes a call arriving now (the Runtime, asked in the
        #: call's context): when not, its headers wait, so that a refusal goes without
        #: them; when so, it is released as the call ends.
        self.admission = admission or _Always()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        name = method_label(handler_call_details.method)
        if handler.response_streaming:
            return self._streaming(handler, name)
        return self._unary(handler, name)

    async def _request(self, context: Context, handler: Handler, name: str) -> object:
        """The request, or the call answered with why there is none (which raises)."""
        try:
            return await _one_message(context, name, self.read_timeout)
        except ProtoserveError as error:
            answer = refusal(handler, name, error, self.metrics)
            # The refusal's kind follows ``handler``: unary_unary or unary_stream.
            refuse = cast(
                Callable[[object, Context], Awaitable[None]],
                answer.unary_stream if handler.response_streaming else answer.unary_unary,
            )
            await refuse(None, context)
            raise AssertionError("unreachable: a refusal aborts the call") from None

    def _unary(self, handler: Handler, name: str) -> Handler:
        inner = cast(Callable[..., Any], handler.unary_unary)
        if not inspect.iscoroutinefunction(inner):
            return handler

        if framed(inner):

            async def unary(requests: object, context: Context) -> object:
                # The frame begins first: its headers go out while the request is read.
                admitted = self.admission.admit()
                begin(context, headers=admitted)
                try:
                    try:
                        request = await self._request(context, handler, name)
                    except BaseException:
                        abandon()
                        raise
                    return await inner(request, context)
                finally:
                    if admitted:
                        self.admission.release()

        else:

            async def unary(requests: object, context: Context) -> object:
                return await inner(await self._request(context, handler, name), context)

        return grpc.stream_unary_rpc_method_handler(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _streaming(self, handler: Handler, name: str) -> Handler:
        inner = cast(Callable[..., Any], handler.unary_stream)
        if inspect.isasyncgenfunction(inner):
            began = framed(inner)

            async def responses(requests: object, context: Context) -> AsyncIterator[object]:
                admitted = began and self.admission.admit()
                if began:
                    begin(context, headers=admitted)  # as for a unary method
                try:
                    try:
                        request = await self._request(context, handler, name)
                    except BaseException:
                        abandon()
                        raise
                    # Closed at once when the call ends early, as the method's own would be.
                    async with contextlib.aclosing(inner(request, context)) as items:
                        async for item in items:
                            yield item
                finally:
                    if admitted:
                        self.admission.release()

            method: Callable[..., Any] = responses
        elif inspect.iscoroutinefunction(inner):  # writes with context.write (health's Watch)

            async def written(requests: object, context: Context) -> None:
                await inner(await self._request(context, handler, name), context)

            method = written
        else:
            return handler
        return grpc.stream_stream_rpc_method_handler(
            method,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
