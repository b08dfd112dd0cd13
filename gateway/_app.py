"""The gateway: a Starlette app built at runtime from descriptors, talking gRPC upstream.

One catch-all endpoint routes every request through the :class:`Router` built
from the services' ``google.api.http`` rules, transcodes it into the method's
request message, calls the upstream over a grpc.aio channel and transcodes
the answer back: JSON for unary methods, SSE or NDJSON for server streaming.
The gateway knows nothing about inference (docs/architecture.md, rule 3) and
never imports ``protoserve.server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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

from protoserve.common.logs import request_id as sane_request_id
from protoserve.gateway._body import check_content_type, read_body
from protoserve.gateway._callmeta import metadata_headers, outgoing_metadata, request_deadline
from protoserve.gateway._codecs import (
    Codec,
    CodecRequest,
    CodecResponse,
    ErrorInfo,
    resolve_codecs,
)
from protoserve.gateway._descriptors import Descriptors, from_compiled
from protoserve.gateway._errors import (
    HTTP_STATUS,
    GatewayError,
    from_grpc_error,
    grpc_error_parts,
    status_json,
)
from protoserve.gateway._metrics import UNMATCHED, GatewayMetrics
from protoserve.gateway._request_id import RequestIdMiddleware, current_request_id
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
#: HTTP status for a client that went away (nginx's convention, as grpc-gateway uses).
CLIENT_CLOSED = 499


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
        codecs: Mapping[str, Codec],
    ) -> None:
        self.upstream = upstream
        self.descriptors = descriptors
        self.bindings = [b for s in descriptors.services for b in bindings_for(s)]
        #: Method full name -> its codec, for the methods that have one.
        self.codecs = dict(codecs)
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

    def error_response(
        self, error: GatewayError, request_id: str, binding: Binding | None = None
    ) -> Response:
        """The answer to the gateway's own error; by the codec of ``binding``'s method, if any."""
        body = status_json(error.code, error.message, list(error.details), self.descriptors.pool)
        status = error.http_status or HTTP_STATUS[error.code]
        headers = {**(error.headers or {}), "X-Request-Id": request_id}
        codec = self.codecs.get(binding.method.full_name) if binding is not None else None
        if codec is not None and binding is not None:
            info = ErrorInfo(status, error.code, error.message, error.details, body)
            return self._codec_error(codec, binding, info, headers)
        return JSONResponse(body, status_code=status, headers=headers)

    def grpc_error_response(
        self, error: grpc.aio.AioRpcError, request_id: str, binding: Binding | None = None
    ) -> Response:
        """The answer to a failed upstream call; by the codec of ``binding``'s method, if any."""
        self.metrics.upstream_errors.labels(error.code().name).inc()
        codec = self.codecs.get(binding.method.full_name) if binding is not None else None
        if codec is None or binding is None:
            status, body, headers = from_grpc_error(error, self.descriptors.pool)
            return JSONResponse(
                body, status_code=status, headers={**headers, "X-Request-Id": request_id}
            )
        code, message, details, headers = grpc_error_parts(error)
        body = status_json(code, message, details, self.descriptors.pool)
        info = ErrorInfo(HTTP_STATUS.get(code, 500), code, message, tuple(details), body)
        return self._codec_error(codec, binding, info, {**headers, "X-Request-Id": request_id})

    def _codec_error(
        self, codec: Codec, binding: Binding, info: ErrorInfo, headers: dict[str, str]
    ) -> Response:
        try:
            answer = codec.encode_error(binding, info)
        except Exception:
            # A codec that cannot even render an error: the error still gets answered.
            log.exception("codec %s failed to encode an error", codec.name)
            return JSONResponse(info.status_json, status_code=info.status, headers=headers)
        return _codec_response(answer, headers)

    def _codec_step(
        self, codec: Codec, binding: Binding, what: str, step: Callable[..., T], *args: Any
    ) -> T:
        """``step(*args)``, with a codec's unexpected failure made a 500 without its traceback."""
        try:
            return step(*args)
        except GatewayError:
            raise
        except Exception:
            log.exception("codec %s failed to %s (%s)", codec.name, what, binding.method.full_name)
            raise GatewayError(
                grpc.StatusCode.INTERNAL, f"the gateway's {codec.name} codec failed to {what}"
            ) from None

    def _codec_decode(
        self, codec: Codec, coded: CodecRequest, message_class: type[Message]
    ) -> Message:
        method = coded.binding.method
        message = self._codec_step(
            codec, coded.binding, "decode the request", codec.decode_request, coded, message_class
        )
        if message.DESCRIPTOR.full_name != method.input_type.full_name:
            log.error(
                "codec %s made a %s for %s",
                codec.name,
                message.DESCRIPTOR.full_name,
                method.full_name,
            )
            raise GatewayError(
                grpc.StatusCode.INTERNAL,
                f"the gateway's {codec.name} codec made the wrong request message",
            )
        return message

    async def dispatch(self, request: Request) -> Response:
        # Decided by RequestIdMiddleware, which logs it; its rule again outside the middleware.
        request_id = current_request_id() or sane_request_id(
            request.headers.get("x-request-id", "")
        )
        started = time.perf_counter()
        try:
            response = await self._dispatch(request, request_id)
        except GatewayError as error:
            # Set by _dispatch once matched: the codec of its method answers its errors.
            binding = getattr(request.state, "binding", None)
            response = self.error_response(error, request_id, binding)
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
        request.state.binding = binding
        body = await read_body(request, self.max_body_bytes)
        message_class = GetMessageClass(binding.method.input_type)
        query = request.query_params.multi_items()
        codec = self.codecs.get(binding.method.full_name)
        coded: CodecRequest | None = None
        if codec is None:
            if body and binding.body:
                check_content_type(request.headers.get("content-type", ""))
            message = build_request(binding, match.path_params, query, body, message_class)
        else:
            coded = CodecRequest(binding, match.path_params, query, request.headers, body)
            message = self._codec_decode(codec, coded, message_class)
        deadline = request_deadline(request)
        metadata = outgoing_metadata(request, self.forwarded, request_id)
        if binding.method.server_streaming:
            return await self._stream(request, binding, message, deadline, metadata, request_id)
        return await self._unary(request, binding, message, deadline, metadata, request_id, coded)

    async def _unary(
        self,
        request: Request,
        binding: Binding,
        message: Message,
        deadline: float | None,
        metadata: list[tuple[str, str]],
        request_id: str,
        coded: CodecRequest | None = None,
    ) -> Response:
        call = self._callable(binding.method)(message, timeout=deadline, metadata=metadata)
        answer = await _unless_gone(request, call, call)
        if answer is None:
            log.info("%s: client went away; call cancelled", binding.method.name)
            return Response(status_code=CLIENT_CLOSED)
        try:
            response = answer.result()
        except grpc.aio.AioRpcError as error:
            return self.grpc_error_response(error, request_id, binding)
        headers = {
            "X-Request-Id": request_id,
            **metadata_headers(await call.initial_metadata(), "Grpc-Metadata-"),
            **metadata_headers(await call.trailing_metadata(), "Grpc-Trailer-"),
        }
        codec = self.codecs.get(binding.method.full_name)
        if codec is not None and coded is not None:
            encoded = self._codec_step(
                codec, binding, "encode the response", codec.encode_response, coded, response
            )
            return _codec_response(encoded, headers)
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
            **metadata_headers(await call.initial_metadata(), "Grpc-Metadata-"),
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


def _codec_response(answer: CodecResponse, headers: Mapping[str, str]) -> Response:
    # The gateway's X-Request-Id wins over a codec's; the codec's win over metadata.
    merged = {**headers, **answer.headers, "X-Request-Id": headers["X-Request-Id"]}
    return Response(
        answer.body, status_code=answer.status, media_type=answer.media_type, headers=merged
    )


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
    codecs: Mapping[str, Codec | None] | None = None,
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
        codecs: full method or service name -> the :class:`Codec` of its HTTP format, or
            None for protobuf's JSON mapping (see ``docs/gateway-codecs.md``). The Open
            Inference Protocol's codec is registered for ``inference.GRPCInferenceService``
            unless this names that service.

    Raises:
        ValueError: a method's ``google.api.http`` rule is invalid, or a codec is
            registered for a name not served or for a streaming method.
    """
    from protoserve.gateway._docs import docs_html
    from protoserve.gateway._openapi import build_openapi
    from protoserve.gateway._playground import playground_html

    descriptors = descriptors or from_compiled()
    method_codecs = resolve_codecs(descriptors.services, codecs or {})
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
        codecs=method_codecs,
    )
    document = build_openapi(
        gateway.bindings,
        title=title,
        version="1",
        comments=descriptors.comments,
        use_proto_names=use_proto_names,
        codecs=method_codecs,
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
