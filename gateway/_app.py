"""The gateway: a Starlette app built at runtime from descriptors, talking gRPC upstream.

One catch-all endpoint routes every request through the :class:`Router` built
from the services' ``google.api.http`` rules, transcodes it into the method's
request message, calls the upstream over a grpc.aio channel and transcodes
the answer back: JSON for unary methods, SSE or NDJSON for server streaming.
The gateway knows nothing about inference (DESIGN rule 3) and never imports
``protoserve.server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from protoserve.gateway._descriptors import Descriptors, from_compiled
from protoserve.gateway._errors import HTTP_STATUS, GatewayError, from_grpc_error, status_json
from protoserve.gateway._metrics import UNMATCHED, GatewayMetrics
from protoserve.gateway._request_id import RequestIdMiddleware, current_request_id
from protoserve.gateway._request_id import request_id as sane_request_id
from protoserve.gateway._routing import MethodNotAllowed, RouteNotFound, Router
from protoserve.gateway._rules import Binding, bindings_for
from protoserve.gateway._streaming import (
    StreamResponse,
    ndjson_error,
    ndjson_line,
    sse_done,
    sse_error,
    sse_message,
)
from protoserve.gateway._transcode import build_request, render_message, render_response

__all__ = ["DEFAULT_FORWARDED_HEADERS", "build_gateway"]

T = TypeVar("T")
log = logging.getLogger("protoserve.gateway")

MiB = 1024 * 1024
#: Request headers passed upstream as gRPC metadata (plus every ``Grpc-Metadata-*``).
DEFAULT_FORWARDED_HEADERS = ("authorization", "traceparent", "tracestate")
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_GRPC_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")
_GRPC_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
# Metadata that is gRPC's own business, never echoed as response headers.
_RESERVED_METADATA = frozenset(
    {
        "content-type",
        "grpc-status",
        "grpc-message",
        "x-request-id",
        "grpc-status-details-bin",
        "grpc-encoding",
        "grpc-accept-encoding",
    }
)
#: HTTP status for a client that went away (nginx's convention, as grpc-gateway uses).
CLIENT_CLOSED = 499


def _timeout(request: Request) -> float | None:
    """The deadline a request asks for: ``Grpc-Timeout`` (gRPC's format) or
    ``X-Request-Timeout`` (seconds)."""
    raw = request.headers.get("grpc-timeout")
    if raw is not None:
        match = _GRPC_TIMEOUT.match(raw.strip())
        if not match:
            raise GatewayError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Grpc-Timeout {raw!r} is not like '10S' or '250m'",
            )
        return int(match[1]) * _GRPC_TIMEOUT_UNITS[match[2]]
    raw = request.headers.get("x-request-timeout")
    if raw is not None:
        try:
            seconds = float(raw)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds < 1e6:
            raise GatewayError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"X-Request-Timeout {raw!r} must be a positive number of seconds",
            )
        return seconds
    return None


def _metadata(
    request: Request, forwarded: frozenset[str], request_id: str
) -> list[tuple[str, str]]:
    metadata = [("x-request-id", request_id)]
    for key, value in request.headers.items():
        key = key.lower()
        if key.startswith("grpc-metadata-"):
            key = key[len("grpc-metadata-") :]
        elif key not in forwarded:
            continue
        # Binary (-bin) metadata would need base64 rules of its own; it is not forwarded.
        if key and not key.endswith("-bin") and key not in _RESERVED_METADATA and value.isascii():
            metadata.append((key, value))
    return metadata


def _response_headers(metadata: Any, prefix: str) -> dict[str, str]:
    headers = {}
    for key, value in metadata or ():
        if isinstance(value, str) and key not in _RESERVED_METADATA and value.isascii():
            headers[f"{prefix}{key}"] = value
    return headers


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_big = GatewayError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"the request body is larger than {limit} bytes",
        http_status=413,
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_big
        parts.append(part)
    return b"".join(parts)


def _check_content_type(header: str) -> None:
    """Bodies are read as JSON whatever the header says, except kinds that are surely not JSON.

    ``curl -d`` labels every body ``application/x-www-form-urlencoded``: refusing
    it would fail the most common way people try an API. A JSON syntax error
    still names where the body went wrong.
    """
    kind = header.split(";")[0].strip().lower()
    if kind.startswith("multipart/") or "protobuf" in kind or kind.startswith("application/grpc"):
        raise GatewayError(
            grpc.StatusCode.INVALID_ARGUMENT, f"the body must be JSON, not {kind}", http_status=415
        )


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (the body must already have been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(
    request: Request, call: Any, pending: Awaitable[T]
) -> asyncio.Future[T] | None:
    """``pending``, finished, or None when the client went away first.

    Then the gRPC ``call`` is cancelled, so the server stops working on it.
    """
    task = asyncio.ensure_future(pending)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task.done():
        return task
    call.cancel()
    task.cancel()
    return None


class _Gateway:
    """The per-app state behind the endpoints."""

    def __init__(
        self,
        upstream: str | grpc.aio.Channel,
        descriptors: Descriptors,
        *,
        max_body_bytes: int,
        keepalive: float,
        forwarded: Sequence[str],
        use_proto_names: bool,
        channel_options: Sequence[tuple[str, Any]],
    ) -> None:
        self.upstream = upstream
        self.descriptors = descriptors
        self.bindings = [b for s in descriptors.services for b in bindings_for(s)]
        self.router = Router(self.bindings)
        self.max_body_bytes = max_body_bytes
        self.keepalive = keepalive
        self.forwarded = frozenset(h.lower() for h in forwarded)
        self.use_proto_names = use_proto_names
        self.channel_options = list(channel_options)
        self.channel: grpc.aio.Channel | None = (
            upstream if isinstance(upstream, grpc.aio.Channel) else None
        )
        self._owns_channel = self.channel is None
        self._callables: dict[str, Any] = {}
        self.metrics = GatewayMetrics()

    # Life cycle (Starlette lifespan): a grpc.aio channel belongs to the loop it is made in.
    async def open(self) -> None:
        if self.channel is None:
            assert isinstance(self.upstream, str)
            self.channel = grpc.aio.insecure_channel(self.upstream, options=self.channel_options)

    async def close(self) -> None:
        if self.channel is not None and self._owns_channel:
            await self.channel.close(grace=None)
            self.channel = None

    def _callable(self, method: MethodDescriptor) -> Any:
        found = self._callables.get(method.full_name)
        if found is None:
            assert self.channel is not None, "the gateway's channel is not open"
            path = f"/{method.containing_service.full_name}/{method.name}"
            make = (
                self.channel.unary_stream if method.server_streaming else self.channel.unary_unary
            )
            found = make(
                path,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=GetMessageClass(method.output_type).FromString,
            )
            self._callables[method.full_name] = found
        return found

    def error_response(self, error: GatewayError, request_id: str) -> JSONResponse:
        body = status_json(error.code, error.message, list(error.details), self.descriptors.pool)
        status = error.http_status or HTTP_STATUS[error.code]
        return JSONResponse(
            body, status_code=status, headers={**(error.headers or {}), "X-Request-Id": request_id}
        )

    def grpc_error_response(self, error: grpc.aio.AioRpcError, request_id: str) -> JSONResponse:
        self.metrics.upstream_errors.labels(error.code().name).inc()
        status, body, headers = from_grpc_error(error, self.descriptors.pool)
        return JSONResponse(
            body, status_code=status, headers={**headers, "X-Request-Id": request_id}
        )

    async def dispatch(self, request: Request) -> Response:
        # Decided by RequestIdMiddleware, which logs it; its rule again outside the middleware.
        request_id = current_request_id() or sane_request_id(
            request.headers.get("x-request-id", "")
        )
        started = time.perf_counter()
        try:
            response = await self._dispatch(request, request_id)
        except GatewayError as error:
            response = self.error_response(error, request_id)
        # The binding's template, set by _dispatch once matched: bounded, unlike the path.
        route = getattr(request.state, "route", UNMATCHED)
        self.metrics.observe(route, request.method, response.status_code, started)
        return response

    async def _dispatch(self, request: Request, request_id: str) -> Response:
        raw_path = request.scope.get("raw_path") or request.scope["path"].encode()
        # The raw path keeps %2F apart from "/" (http.proto's rules need that); a
        # client that sent raw UTF-8 instead of percent-encoding still gets its text.
        path = raw_path.decode("utf-8", "replace").split("?", 1)[0]
        try:
            match = self.router.match(request.method, path)
        except RouteNotFound:
            raise GatewayError(
                grpc.StatusCode.NOT_FOUND, f"no route for {request.method} {path}"
            ) from None
        except MethodNotAllowed as exc:
            raise GatewayError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{request.method} is not allowed on {path}; allowed: {', '.join(exc.allowed)}",
                http_status=405,
                headers={"Allow": ", ".join(exc.allowed)},
            ) from None
        binding = match.binding
        request.state.route = binding.template.pattern
        # For the access line (RequestIdMiddleware).
        request.state.grpc_method = (
            f"/{binding.method.containing_service.full_name}/{binding.method.name}"
        )
        body = await _read_body(request, self.max_body_bytes)
        if body and binding.body:
            _check_content_type(request.headers.get("content-type", ""))
        message = build_request(
            binding,
            match.path_params,
            request.query_params.multi_items(),
            body,
            GetMessageClass(binding.method.input_type),
        )
        deadline = _timeout(request)
        metadata = _metadata(request, self.forwarded, request_id)
        if binding.method.server_streaming:
            return await self._stream(request, binding, message, deadline, metadata, request_id)
        return await self._unary(request, binding, message, deadline, metadata, request_id)

    async def _unary(
        self,
        request: Request,
        binding: Binding,
        message: Message,
        deadline: float | None,
        metadata: list[tuple[str, str]],
        request_id: str,
    ) -> Response:
        call = self._callable(binding.method)(message, timeout=deadline, metadata=metadata)
        answer = await _unless_gone(request, call, call)
        if answer is None:
            log.info("%s: client went away; call cancelled", binding.method.name)
            return Response(status_code=CLIENT_CLOSED)
        try:
            response = answer.result()
        except grpc.aio.AioRpcError as error:
            return self.grpc_error_response(error, request_id)
        headers = {
            "X-Request-Id": request_id,
            **_response_headers(await call.initial_metadata(), "Grpc-Metadata-"),
            **_response_headers(await call.trailing_metadata(), "Grpc-Trailer-"),
        }
        return Response(
            render_response(binding, response, use_proto_names=self.use_proto_names),
            media_type="application/json",
            headers=headers,
        )

    async def _stream(
        self,
        request: Request,
        binding: Binding,
        message: Message,
        deadline: float | None,
        metadata: list[tuple[str, str]],
        request_id: str,
    ) -> Response:
        sse = "text/event-stream" in request.headers.get("accept", "")
        if sse and "last-event-id" in request.headers:
            # An EventSource reconnecting after the stream ended: 204 makes it stop,
            # instead of silently running the whole call again.
            return Response(status_code=204, headers={"X-Request-Id": request_id})
        call = self._callable(binding.method)(message, timeout=deadline, metadata=metadata)
        messages = call.__aiter__()
        # Wait for the first message (or the error) before answering, so that a call
        # refused at once (bad parameters, unknown model) gets its own HTTP status.
        first_task = await _unless_gone(request, call, anext(messages))
        if first_task is None:
            log.info("%s: client went away; call cancelled", binding.method.name)
            return Response(status_code=CLIENT_CLOSED)
        first: Message | None
        try:
            first = first_task.result()
        except StopAsyncIteration:
            first = None
        except grpc.aio.AioRpcError as error:
            return self.grpc_error_response(error, request_id)
        render = self._render
        pool = self.descriptors.pool
        metrics = self.metrics

        async def events() -> AsyncIterator[bytes]:
            count = 0
            metrics.streams_in_flight.inc()
            try:
                pending = [first] if first is not None else []
                async for item in _chain(pending, messages):
                    count += 1
                    data = render(item)
                    yield sse_message(count, data) if sse else ndjson_line(data)
                if sse:
                    yield sse_done()
            except grpc.aio.AioRpcError as error:
                metrics.upstream_errors.labels(error.code().name).inc()
                _, body, _ = from_grpc_error(error, pool)
                yield sse_error(body) if sse else ndjson_error(body)
            finally:
                metrics.streams_in_flight.dec()
                call.cancel()  # a no-op once the call has ended

        headers = {
            "X-Request-Id": request_id,
            "Cache-Control": "no-cache",
            # Tell nginx-style proxies not to buffer: every event must flush as it comes.
            "X-Accel-Buffering": "no",
            **_response_headers(await call.initial_metadata(), "Grpc-Metadata-"),
        }
        return _Streamed(
            events(),
            headers={
                **headers,
                "Content-Type": "text/event-stream; charset=utf-8"
                if sse
                else "application/x-ndjson",
            },
            keepalive=self.keepalive if sse else None,
            on_disconnect=lambda: log.info(
                "%s: client went away; stream cancelled", binding.method.name
            ),
        )

    def _render(self, message: Message) -> dict[str, Any]:
        return render_message(message, use_proto_names=self.use_proto_names)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        assert self.channel is not None
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        except grpc.aio.AioRpcError as error:
            return JSONResponse(
                {
                    "status": "UNREACHABLE",
                    "code": error.code().name,
                    "message": error.details() or "",
                },
                status_code=503,
            )
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        return JSONResponse({"status": name}, status_code=200 if name == "SERVING" else 503)


class _Streamed(Response):
    """A Starlette Response wrapping :class:`StreamResponse` (Starlette wants a Response)."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        *,
        headers: Mapping[str, str],
        keepalive: float | None,
        on_disconnect: Callable[[], None],
    ) -> None:
        super().__init__(status_code=200)
        self._inner = StreamResponse(
            chunks, headers=headers, keepalive=keepalive, on_disconnect=on_disconnect
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._inner(scope, receive, send)


async def _chain(first: list[Message], rest: AsyncIterator[Message]) -> AsyncIterator[Message]:
    for item in first:
        yield item
    async for item in rest:
        yield item


def build_gateway(
    upstream: str | grpc.aio.Channel,
    *,
    descriptors: Descriptors | None = None,
    cors_origins: Sequence[str] = (),
    max_body_bytes: int = 4 * MiB,
    keepalive: float = 15.0,
    forwarded_headers: Sequence[str] = DEFAULT_FORWARDED_HEADERS,
    use_proto_names: bool = True,
    max_message_bytes: int = 16 * MiB,
    title: str = "protoserve gateway",
    playground: bool | None = None,
) -> Starlette:
    """A Starlette app serving every method of ``descriptors`` over HTTP, calling ``upstream``.

    Args:
        upstream: ``host:port`` of the gRPC server (a channel is opened at startup), or
            an open ``grpc.aio.Channel``.
        descriptors: what to serve; protoserve's own API (compiled in) by default.
        cors_origins: origins allowed by CORS; none (CORS off) by default.
        max_body_bytes: larger request bodies are refused with 413.
        keepalive: seconds of silence on an SSE stream before a keep-alive comment.
        forwarded_headers: request headers passed upstream as metadata, besides
            ``Grpc-Metadata-*`` (prefix stripped) and ``X-Request-Id``.
        use_proto_names: JSON field names as in the .proto (``generated_text``);
            False for lowerCamelCase (``generatedText``). Input accepts both.
        max_message_bytes: largest gRPC message sent or received upstream.
        title: the OpenAPI document's title.
        playground: serve the text-generation playground page at ``/``; by default
            only when ``descriptors`` include ``protoserve.inference.v1.InferenceService``.

    Raises:
        ValueError: a method's ``google.api.http`` rule is invalid.
    """
    from protoserve.gateway._docs import docs_html
    from protoserve.gateway._openapi import build_openapi
    from protoserve.gateway._playground import playground_html

    descriptors = descriptors or from_compiled()
    gateway = _Gateway(
        upstream,
        descriptors,
        max_body_bytes=max_body_bytes,
        keepalive=keepalive,
        forwarded=forwarded_headers,
        use_proto_names=use_proto_names,
        channel_options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    document = build_openapi(
        gateway.bindings,
        title=title,
        version="1",
        comments=descriptors.comments,
        use_proto_names=use_proto_names,
    )

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    async def docs(request: Request) -> Response:
        return HTMLResponse(docs_html("/openapi.json", title))

    async def playground_page(request: Request) -> Response:
        return HTMLResponse(playground_html(title))

    if playground is None:
        names = {service.full_name for service in descriptors.services}
        playground = "protoserve.inference.v1.InferenceService" in names

    verbs = sorted({*_METHODS, *(b.verb for b in gateway.bindings)})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.open()
        log.info(
            "gateway serving %d routes from %s, upstream %s",
            len(gateway.bindings),
            descriptors.source,
            upstream if isinstance(upstream, str) else "channel",
        )
        try:
            yield
        finally:
            await gateway.close()

    middleware = [Middleware(RequestIdMiddleware)]
    if cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=verbs,
                allow_headers=["*"],
                expose_headers=["X-Request-Id", "Retry-After"],
            )
        )
    app = Starlette(
        routes=[
            Route("/healthz", gateway.healthz, methods=["GET"]),
            Route("/readyz", gateway.readyz, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/docs", docs, methods=["GET"]),
            Route("/metrics", gateway.metrics.endpoint, methods=["GET"]),
            *([Route("/", playground_page, methods=["GET"])] if playground else []),
            Route("/{path:path}", gateway.dispatch, methods=verbs),
        ],
        middleware=middleware,
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
