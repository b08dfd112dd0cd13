"""Every gRPC call's plumbing, for every servicer: registration, parsing, its frame.

:func:`add_service` registers a servicer's methods from the service's descriptor,
with lenient parsing: bytes that do not parse reach the method as
:class:`Malformed` and become INVALID_ARGUMENT, where grpc's own handling is
UNKNOWN and a server-side traceback. A method decorated :func:`unary` or
:func:`streaming` runs in its call's frame (:class:`_Frame`): its request id (the
caller's ``x-request-id``, or a new one; :func:`protoserve.common.logs.request_id`),
returned as ``x-request-id`` initial metadata (sent without the call waiting for
it: :class:`_Headers`; begun before the request is read, :func:`begin`) and carried
by every line logged while the call runs; its errors as statuses with
``google.rpc`` details (docs/architecture.md, rule 4), an unexpected exception
logged with its traceback while the client gets INTERNAL with the request id only;
its metrics; and one access line (``protoserve.server.access``) when it ends, for a
stream when the stream does (rule 6). A call refused before any servicer sees it (a missing token:
:mod:`protoserve.server.auth`) is answered by :func:`refusal` in the same frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from protoserve.common import logs
from protoserve.common.logs import REQUEST_ID
from protoserve.server.metrics import Metrics
from protoserve.server.runtime.errors import (
    Internal,
    InvalidArgument,
    ProtoserveError,
    to_rpc_status,
)

__all__ = [
    "LABEL_PREFIXES",
    "abandon",
    "add_service",
    "begin",
    "framed",
    "method_label",
    "note_access",
    "refusal",
    "streaming",
    "unary",
]

log = logging.getLogger("protoserve.server")
#: One line per finished call: method, code, duration_ms, request_id, peer (and error).
access_log = logging.getLogger("protoserve.server.access")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Item = TypeVar("Item")
Context = grpc.aio.ServicerContext[Any, Any]
#: Services whose method names repeat another served service's (OpenAI's ListModels
#: beside v1's): their methods' label is this prefix and the name (``openai.ListModels``).
#: A servicer of one of them sets ``label_prefix`` from here.
LABEL_PREFIXES = {"protoserve.openai.v1.OpenAIService": "openai."}
#: What the call being served adds to its access line (:func:`note_access`).
_NOTED: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "protoserve_access_noted", default=None
)


def method_label(full_method: str) -> str:
    """The metrics' and access line's method label of ``/package.Service/Method``: the
    method's name, after its service's :data:`LABEL_PREFIXES` entry if it has one."""
    service, _, name = full_method.rpartition("/")
    return LABEL_PREFIXES.get(service.lstrip("/"), "") + name


def note_access(**fields: str) -> None:
    """Add ``fields`` to the access line of the call being served (nothing outside a
    call): what a request says of itself that its operator should see, such as
    OpenAI's ``user``. The caller bounds them; the log's formatter escapes them."""
    noted = _NOTED.get()
    if noted is not None:
        noted.update(fields)


def _request_id(context: Context) -> str:
    """The caller's ``x-request-id`` when it is sane, else a new one (:func:`logs.request_id`)."""
    given = (v for k, v in context.invocation_metadata() or () if k == "x-request-id")
    return logs.request_id(next((v for v in given if isinstance(v, str)), None))


async def _abort(context: Context, error: ProtoserveError, *more: tuple[str, str | bytes]) -> None:
    status = to_rpc_status(error)
    await context.abort(
        error.code,
        error.message,
        trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()), *more),
    )


class _Headers:
    """A call's initial metadata (its ``x-request-id``), sent without waiting for it.

    grpc.aio sends custom initial metadata only as a batch of its own, which
    ``send_initial_metadata`` awaits: one more trip through the event loop for every
    call. Here the batch is started at once (its coroutine run up to the batch's
    future, as a task would) and its end is awaited only where it must be, before the
    response or the status: by then the loop has usually seen it end (while the
    request was read, or the model worked), and the call goes on without suspending.
    Not an ``asyncio`` task: one per call measured 0.95x the calls/s of this (GetModel,
    h2load, 8 rounds, 2026-12-03); its context copy and scheduling cost more than
    the trip it saves.
    """

    __slots__ = ("_coro", "_error", "_future", "_waiting")

    def __init__(self, context: Context, rid: str, *, now: bool = True) -> None:
        self._error: Exception | None = None
        self._future: Any = None
        self._coro: Any = None
        #: ``now`` False: what :meth:`sent` sends, not started until then.
        self._waiting = None if now else (context, rid)
        if not now:
            return
        self._coro = context.send_initial_metadata((("x-request-id", rid),))
        try:
            self._future = self._coro.send(None)
        except StopIteration:
            self._coro = None
            return
        except Exception as error:  # the call cannot send (grpc stopped it): raised by sent()
            self._coro, self._error = None, error
            return
        if asyncio.isfuture(self._future):
            # What a task does with a future its coroutine yields; this one waits on it.
            self._future._asyncio_future_blocking = False
        else:  # not grpc.aio's batch future: finish it in sent(), waiting as a task would
            self._future = None

    async def sent(self) -> None:
        """Return once the metadata is sent (at once when it already is); raises what
        sending it raised."""
        if self._waiting is not None:
            context, rid = self._waiting
            self._waiting = None
            await context.send_initial_metadata((("x-request-id", rid),))
            return
        coro = self._coro
        if coro is None:
            if self._error is not None:
                raise self._error
            return
        self._coro = None
        future = self._future
        if future is None:
            await _Resumed(coro)
            return
        if not future.done():
            try:
                await future
            except BaseException:
                coro.close()
                raise
        try:
            coro.send(None)
        except StopIteration:
            return
        coro.close()
        raise RuntimeError("send_initial_metadata went on after its batch ended")

    def drop(self) -> None:
        """Give up on it (the call ended without its response or status): its
        coroutine is closed, and its batch's outcome read when it comes."""
        self._waiting = None
        coro, self._coro = self._coro, None
        if coro is None:
            return
        coro.close()
        if self._future is not None:
            self._future.add_done_callback(_retrieved)

    @property
    def begun(self) -> bool:
        """Whether sending them has begun: false until :meth:`sent` for ``now`` False."""
        return self._waiting is None


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _Resumed:
    """Awaiting this finishes ``coro``, already started, in the awaiting task (a task
    resumes a coroutine with None when what it yielded is done)."""

    def __init__(self, coro: Any) -> None:
        self._coro = coro

    def __await__(self) -> Generator[Any, None, None]:
        yield from self._coro.__await__()


#: A call whose frame began before its request was read (:func:`begin`): its id and headers.
_BEGUN: contextvars.ContextVar[tuple[str, _Headers] | None] = contextvars.ContextVar(
    "protoserve_call_begun", default=None
)


def framed(method: Callable[..., Any]) -> bool:
    """Whether ``method`` (a handler's function) runs in its call's frame
    (:func:`unary`, :func:`streaming`, :func:`refusal`), which :func:`begin` may start."""
    return getattr(method, "_protoserve_framed", False)


def begin(context: Context, *, headers: bool = True) -> None:
    """Begin the frame of the call being served, whose method is :func:`framed`,
    before its request is read (:class:`~protoserve.server.transport.WholeRequest`):
    its request id is decided and its headers' batch started, to end while the
    request is read. The frame takes them over when the method runs.

    ``headers`` False (a draining server): they wait for the answer, so that a
    refusal goes out without them (Trailers-Only, which clients may retry)."""
    rid = _request_id(context)
    _BEGUN.set((rid, _Headers(context, rid, now=headers)))


def abandon() -> None:
    """The call :func:`begin` began ended before its frame took it over (the client
    left while its request was read): its headers are dropped."""
    begun = _BEGUN.get()
    if begun is not None:
        _BEGUN.set(None)
        begun[1].drop()


class _Frame:
    """One call's frame (the module docstring): request id, errors as statuses,
    metrics, and the access line when it ends (:meth:`close`)."""

    __slots__ = (
        "code",
        "context",
        "error_message",
        "headers",
        "method",
        "metrics",
        "noted",
        "noted_token",
        "peer",
        "rid",
        "started",
        "token",
    )

    def __init__(self, context: Context, method: str, metrics: Metrics | None) -> None:
        self.started = time.perf_counter()
        self.context, self.method, self.metrics = context, method, metrics
        # Anything that is neither a result nor an error of ours (the call was cancelled).
        self.code = grpc.StatusCode.CANCELLED
        self.error_message: str | None = None
        begun = _BEGUN.get()
        if begun is None:
            self.rid = _request_id(context)
            self.headers = _Headers(context, self.rid)
        else:
            _BEGUN.set(None)
            self.rid, self.headers = begun
        # Asked now: once a call is over, grpc may have freed what peer() reads (a crash).
        self.peer = context.peer()
        self.token = REQUEST_ID.set(self.rid)
        self.noted: dict[str, str] = {}
        self.noted_token = _NOTED.set(self.noted)

    async def ok(self) -> None:
        """The method returned (or a stream ended): the call is OK."""
        await self.headers.sent()
        self.code = grpc.StatusCode.OK

    async def fail(self, error: Exception) -> None:
        """Answer ``error`` with its status; anything but a :class:`ProtoserveError`
        is logged with its traceback, and the client gets INTERNAL with the id only.
        Raises (grpc's abort)."""
        if isinstance(error, ProtoserveError):
            self.code = error.code
            self.error_message = error.message  # on the access line
        else:
            self.code = grpc.StatusCode.INTERNAL
            log.error("%s failed", self.method, exc_info=error)
            error = Internal(self.rid)
        if self.headers.begun:
            await self.headers.sent()
            await _abort(self.context, error)
        else:  # nothing sent yet (begin): Trailers-Only, the request id in the trailers
            self.headers.drop()
            await _abort(self.context, error, ("x-request-id", self.rid))

    def close(self) -> None:
        """The call ended: its metrics and access line."""
        self.headers.drop()
        seconds = time.perf_counter() - self.started
        if self.metrics is not None:
            self.metrics.called(self.method, self.code.name, seconds)
        _log_access(
            self.method, self.code, seconds, self.rid, self.peer, self.error_message, self.noted
        )
        try:
            REQUEST_ID.reset(self.token)
            _NOTED.reset(self.noted_token)
        except ValueError:
            # A stream's generator closed late, from another context: that one never had it.
            pass


@contextlib.asynccontextmanager
async def _call(context: Context, method: str, metrics: Metrics | None) -> AsyncIterator[_Frame]:
    """One call's frame (:class:`_Frame`) around its body; the body awaits
    ``frame.headers.sent()`` before it yields a message of its own."""
    frame = _Frame(context, method, metrics)
    try:
        try:
            yield frame
        except Exception as error:
            await frame.fail(error)
        else:
            await frame.ok()
    finally:
        frame.close()


def _log_access(
    method: str,
    code: grpc.StatusCode,
    seconds: float,
    rid: str,
    peer: str,
    error_message: str | None,
    noted: dict[str, str],
) -> None:
    """The call's one access line (``protoserve.server.access``, INFO); ``noted`` are
    the fields its method added (:func:`note_access`)."""
    duration_ms = round(seconds * 1000, 3)
    fields: dict[str, Any] = {
        **noted,
        "method": method,
        "code": code.name,
        "duration_ms": duration_ms,
        "request_id": rid,
        "peer": peer,
    }
    if error_message is None:
        access_log.info("%s %s %.1fms", method, code.name, duration_ms, extra=fields)
    else:
        fields["error"] = error_message
        access_log.info(
            "%s %s %.1fms: %s", method, code.name, duration_ms, error_message, extra=fields
        )


@dataclass(frozen=True)
class Malformed:
    """What a request that does not parse becomes, so the call can answer INVALID_ARGUMENT.

    grpc's own handling of a deserializer error is UNKNOWN and a server-side
    traceback; a client's bad bytes deserve neither.
    """

    type_name: str
    error: str


def _lenient(message_class: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def parse(data: bytes) -> Message | Malformed:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Malformed(message_class.DESCRIPTOR.full_name, str(exc))

    return parse


def _parsed(request: Req | Malformed) -> Req:
    if isinstance(request, Malformed):
        raise InvalidArgument(f"the request is not a valid {request.type_name}: {request.error}")
    return request


def add_service(servicer: object, server: grpc.aio.Server, service: ServiceDescriptor) -> None:
    """Register every method of ``service`` (the servicer's method of the same name),
    from its descriptor, with lenient parsing: a request that does not parse reaches
    the method as :class:`Malformed`, which :func:`unary` and :func:`streaming`
    answer with INVALID_ARGUMENT."""
    handlers = {}
    for method in service.methods:
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_lenient(GetMessageClass(method.input_type)),
            response_serializer=lambda message: message.SerializeToString(),
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def refusal(
    like: grpc.RpcMethodHandler[Any, Any] | None,
    method: str,
    error: ProtoserveError,
    metrics: Metrics | None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler that answers a call with ``error``, in its call's frame (request id,
    access line, ``metrics`` when given), without reading or parsing its request.

    Args:
        like: the method's own handler, whose kind (unary or streaming, each way)
            the refusal takes; None (an unknown method): unary.
        method: the name on the access line and the metrics' method label.
        error: what the caller gets.
        metrics: the server's metrics, or None not to count the call (a method the
            server does not have: its name is the caller's to choose).
    """

    async def answer(request: object, context: Context) -> None:
        async with _call(context, method, metrics):
            raise error

    answer._protoserve_framed = True  # type: ignore[attr-defined]

    kind = (like.request_streaming, like.response_streaming) if like is not None else (False, False)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    # No deserializer: the refused request stays bytes, never parsed.
    return make(answer)


def unary(
    fn: Callable[[Any, Req], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    """A unary method in its call's frame: ``fn(self, request)`` gets a parsed request,
    and its errors become statuses. The method's name, after the servicer's
    ``label_prefix`` if it has one (:data:`LABEL_PREFIXES`), is the metrics' and access
    line's method label; ``self.metrics`` (or None) counts the call."""

    async def handler(
        self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        frame = _Frame(context, getattr(self, "label_prefix", "") + fn.__name__, self.metrics)
        try:
            try:
                response = await fn(self, _parsed(request))
            except Exception as error:
                await frame.fail(error)
                raise AssertionError("unreachable: fail() aborts the call") from None
            await frame.ok()
            return response
        finally:
            frame.close()

    handler.__name__ = fn.__name__
    handler._protoserve_framed = True  # type: ignore[attr-defined]
    return handler


def streaming(
    message: Callable[[Item], Resp],
) -> Callable[
    [Callable[[Any, Req], AsyncGenerator[Item, None]]],
    Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]],
]:
    """A server-streaming method in its call's frame, as :func:`unary`: ``fn(self,
    request)`` returns the items (an async generator, from the runtime), and
    ``message(item)`` is the response sent for each. A call that ends early (the
    client left, its deadline passed) closes the items at once, not at GC, which
    cancels the work behind them."""

    def decorate(
        fn: Callable[[Any, Req], AsyncGenerator[Item, None]],
    ) -> Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]]:
        async def handler(
            self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
        ) -> AsyncIterator[Resp]:
            label = getattr(self, "label_prefix", "") + fn.__name__
            async with _call(context, label, self.metrics) as frame:
                async with contextlib.aclosing(fn(self, _parsed(request))) as items:
                    async for item in items:
                        await frame.headers.sent()
                        yield message(item)

        handler.__name__ = fn.__name__
        handler._protoserve_framed = True  # type: ignore[attr-defined]
        return handler

    return decorate
