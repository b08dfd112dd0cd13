"""The gateway core: a Starlette app built at runtime from descriptors, talking gRPC upstream.

The app has one route. A request for one of the gateway's pages (``/healthz``,
``/readyz``, ``/openapi.json``, ``/docs``, ``/metrics``, and those an extension
registers) goes to it by its path; every other request is matched by the
:class:`Router` built from the services' ``google.api.http`` rules, becomes one
:class:`~protoserve.gateway._call.Call`, and is called upstream over a grpc.aio
channel: its answer comes back through the method's codec, or as a stream in the
format the codec chooses (SSE or NDJSON unless it frames its own).

The core knows nothing about inference and names no service (docs/architecture.md,
rule 3): what protoserve's own API gets on top (the OIP codec, the playground) is
registered by the public ``build_gateway`` (``gateway/_assembly.py``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypedDict

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from protoserve.gateway._balancing import channel_options
from protoserve.gateway._call import Call, answer_error, build_call, grpc_path
from protoserve.gateway._callmeta import metadata_headers
from protoserve.gateway._cancel import CLIENT_CLOSED, disconnected, race
from protoserve.gateway._codecs import (
    Codec,
    ProtobufCodec,
    check_shared_routes,
    chooses,
    resolve_codecs,
)
from protoserve.gateway._descriptors import Descriptors
from protoserve.gateway._errors import GatewayError, error_info
from protoserve.gateway._fallback import starlette_error
from protoserve.gateway._metrics import UNMATCHED, GatewayMetrics
from protoserve.gateway._openapi import build_openapi
from protoserve.gateway._page import docs_html
from protoserve.gateway._request_id import GRPC_METHOD, RequestIdMiddleware, current_request_id
from protoserve.gateway._routing import MethodNotAllowed, RouteMatch, RouteNotFound, Router
from protoserve.gateway._rules import bindings_for
from protoserve.gateway._streaming import StreamFormat, StreamResponse

__all__ = ["DEFAULT_FORWARDED_HEADERS", "DEFAULT_TITLE", "AppOptions", "Endpoint", "build_app"]

log = logging.getLogger("protoserve.gateway")

MiB = 1024 * 1024
#: Request headers passed upstream as gRPC metadata (plus every ``Grpc-Metadata-*``).
DEFAULT_FORWARDED_HEADERS = ("authorization", "traceparent", "tracestate")
DEFAULT_TITLE = "protoserve gateway"
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
#: A page of the gateway: what answers ``GET`` (and ``HEAD``) on its path.
Endpoint = Callable[[Request], Awaitable[Response]]


class _Gateway:
    """The per-app state behind the one route: pages, bindings, codecs, the channel."""

    def __init__(
        self,
        upstream: str | grpc.aio.Channel,
        descriptors: Descriptors,
        *,
        codecs: Mapping[str, Codec],
        max_body_bytes: int,
        keepalive: float,
        forwarded: Sequence[str],
        use_proto_names: bool,
        channel_options: Sequence[tuple[str, Any]],
        channel_credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.upstream = upstream
        #: TLS (and mTLS) to the upstream when the gateway opens the channel; None: plaintext.
        self.channel_credentials = channel_credentials
        self.descriptors = descriptors
        self.pool = descriptors.pool
        self.bindings = [b for s in descriptors.services for b in bindings_for(s)]
        self.router = Router(self.bindings)
        #: Method full name -> its codec, for the methods that have one registered.
        self.codecs = dict(codecs)
        #: The codec of every other method: protobuf's JSON mapping.
        self.protobuf = ProtobufCodec(use_proto_names=use_proto_names)
        #: Path -> the page served there (GET and HEAD).
        self.pages: dict[str, Endpoint] = {}
        self.max_body_bytes = max_body_bytes
        self.keepalive = keepalive
        self.forwarded = frozenset(h.lower() for h in forwarded)
        self.channel_options = list(channel_options)
        self.channel: grpc.aio.Channel | None = (
            upstream if isinstance(upstream, grpc.aio.Channel) else None
        )
        self._owns_channel = self.channel is None
        self._callables: dict[str, Any] = {}
        self.metrics = GatewayMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Starlette's lifespan: a grpc.aio channel belongs to the loop it is made in."""
        if self.channel is None:
            assert isinstance(self.upstream, str)
            self.channel = (
                grpc.aio.insecure_channel(self.upstream, options=self.channel_options)
                if self.channel_credentials is None
                else grpc.aio.secure_channel(
                    self.upstream, self.channel_credentials, options=self.channel_options
                )
            )
        log.info(
            "gateway serving %d routes from %s, upstream %s",
            len(self.bindings),
            self.descriptors.source,
            self.upstream if isinstance(self.upstream, str) else "channel",
        )
        try:
            yield
        finally:
            if self.channel is not None and self._owns_channel:
                await self.channel.close(grace=None)
                self.channel = None

    def _open(self, call: Call) -> Any:
        """The gRPC call of ``call``, started: a grpc.aio unary or server-streaming call."""
        return self._callable(call.method)(
            call.message, timeout=call.deadline, metadata=call.metadata
        )

    def _callable(self, method: MethodDescriptor) -> Any:
        found = self._callables.get(method.full_name)
        if found is None:
            assert self.channel is not None, "the gateway's channel is not open"
            make = (
                self.channel.unary_stream if method.server_streaming else self.channel.unary_unary
            )
            found = make(
                grpc_path(method),
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=GetMessageClass(method.output_type).FromString,
            )
            self._callables[method.full_name] = found
        return found

    async def endpoint(self, request: Request) -> Response:
        """The app's one route: a page by its path, every other request to :meth:`dispatch`."""
        page = self.pages.get(_route_path(request)) if request.method in ("GET", "HEAD") else None
        return await (page(request) if page is not None else self.dispatch(request))

    async def dispatch(self, request: Request) -> Response:
        """Match a binding, build the call, make it, and count it (by route template)."""
        started = time.perf_counter()
        try:
            match = self._match(request)
        except GatewayError as error:
            response = answer_error(error, self.pool)
            self.metrics.observe(UNMATCHED, request.method, response.status_code, started)
            return response
        binding = match.binding
        setattr(request.state, GRPC_METHOD, grpc_path(binding.method))  # for the access line
        # One codec for all the methods of a shared route that chooses (check_shared_routes).
        codec = self.codecs.get(binding.method.full_name, self.protobuf)
        try:
            call = await build_call(
                request,
                match.bindings if chooses(codec) else (binding,),
                match.path_params,
                codec,
                max_body_bytes=self.max_body_bytes,
                forwarded=self.forwarded,
                request_id=current_request_id(),
            )
            binding = call.binding  # the codec's choice, on a route methods share
            setattr(request.state, GRPC_METHOD, grpc_path(binding.method))
            make = self._stream if binding.method.server_streaming else self._unary
            response = await make(call)
        except GatewayError as error:
            # Once matched, the method's codec answers the gateway's own errors too.
            response = answer_error(error, self.pool, codec, binding)
        # The binding's template: bounded, unlike the path.
        route = binding.template.pattern
        self.metrics.observe(route, request.method, response.status_code, started)
        return response

    def _match(self, request: Request) -> RouteMatch:
        raw_path = request.scope.get("raw_path") or request.scope["path"].encode()
        # The raw path keeps %2F apart from "/" (http.proto's rules need that); a
        # client that sent raw UTF-8 instead of percent-encoding still gets its text.
        path = raw_path.decode("utf-8", "replace").split("?", 1)[0]
        try:
            return self.router.match(request.method, path)
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

    async def _unary(self, call: Call) -> Response:
        rpc = self._open(call)
        answer = await race(rpc, disconnected(call.http.receive))
        if answer is None:
            return self._gone(call, rpc)
        try:
            response = answer.result()
        except grpc.aio.AioRpcError as error:
            return self._upstream_error(call, error)
        headers = {
            **metadata_headers(await rpc.initial_metadata(), "Grpc-Metadata-"),
            **metadata_headers(await rpc.trailing_metadata(), "Grpc-Trailer-"),
        }
        return call.encode_response(response, headers)

    async def _stream(self, call: Call) -> Response:
        stream_format = call.stream_format()
        status = stream_format.reconnect_status(call.http.headers)
        if status is not None:
            return Response(status_code=status)
        rpc = self._open(call)
        messages = aiter(rpc)
        # Wait for the first message (or the error) before answering, so that a call
        # refused at once (bad parameters, unknown model) gets its own HTTP status.
        first = await race(anext(messages), disconnected(call.http.receive))
        if first is None:
            return self._gone(call, rpc)
        try:
            head = [first.result()]
        except StopAsyncIteration:
            head = []
        except grpc.aio.AioRpcError as error:
            return self._upstream_error(call, error)
        headers = {
            "Content-Type": stream_format.content_type,
            "Cache-Control": "no-cache",
            # Tell nginx-style proxies not to buffer: every event must flush as it comes.
            "X-Accel-Buffering": "no",
            **metadata_headers(await rpc.initial_metadata(), "Grpc-Metadata-"),
        }
        return StreamResponse(
            self._frames(call, stream_format, rpc, head, messages),
            headers=headers,
            keepalive=stream_format.keepalive,
            keepalive_every=self.keepalive,
            on_disconnect=lambda: log.info(
                "%s: client went away; stream cancelled", call.method.name
            ),
        )

    async def _frames(
        self,
        call: Call,
        stream_format: StreamFormat,
        rpc: Any,
        head: list[Message],
        rest: AsyncIterator[Message],
    ) -> AsyncIterator[bytes]:
        """A stream's body: each message in ``stream_format``, then its end or its error."""
        self.metrics.streams_in_flight.inc()
        try:
            index = 0
            async for item in _chain(head, rest):
                index += 1
                yield call.frame(stream_format, index, item)
            if end := stream_format.done():
                yield end
        except grpc.aio.AioRpcError as error:
            self.metrics.upstream_errors.labels(error.code().name).inc()
            info, _ = error_info(error, self.pool)
            yield stream_format.error(info.status_json)
        except GatewayError as error:  # the codec failed (logged): the stream still ends
            info, _ = error_info(error, self.pool)
            yield stream_format.error(info.status_json)
        finally:
            self.metrics.streams_in_flight.dec()
            rpc.cancel()  # a no-op once the call has ended

    def _upstream_error(self, call: Call, error: grpc.aio.AioRpcError) -> Response:
        self.metrics.upstream_errors.labels(error.code().name).inc()
        return answer_error(error, self.pool, call.codec, call.binding)

    def _gone(self, call: Call, rpc: Any) -> Response:
        """The client went away before the answer: the call is cancelled (rule 6)."""
        rpc.cancel()
        log.info("%s: client went away; call cancelled", call.method.name)
        return Response(status_code=CLIENT_CLOSED)

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


async def _chain(first: list[Message], rest: AsyncIterator[Message]) -> AsyncIterator[Message]:
    for item in first:
        yield item
    async for item in rest:
        yield item


class AppOptions(TypedDict, total=False):
    """The options of :func:`build_app` that ``build_gateway`` passes on, documented there."""

    cors_origins: Sequence[str]
    max_body_bytes: int
    keepalive: float
    forwarded_headers: Sequence[str]
    use_proto_names: bool
    max_message_bytes: int
    title: str
    channel_credentials: grpc.ChannelCredentials | None
    upstream_retries: int
    upstream_health_check: bool | None
    docs: bool
    metrics: bool


def build_app(
    upstream: str | grpc.aio.Channel,
    descriptors: Descriptors,
    *,
    cors_origins: Sequence[str] = (),
    max_body_bytes: int = 4 * MiB,
    keepalive: float = 15.0,
    forwarded_headers: Sequence[str] = DEFAULT_FORWARDED_HEADERS,
    use_proto_names: bool = True,
    max_message_bytes: int = 16 * MiB,
    title: str = DEFAULT_TITLE,
    codecs: Mapping[str, Codec | None] | None = None,
    pages: Mapping[str, Endpoint] | None = None,
    channel_credentials: grpc.ChannelCredentials | None = None,
    upstream_retries: int = 2,
    upstream_health_check: bool | None = None,
    docs: bool = True,
    metrics: bool = True,
) -> Starlette:
    """The gateway core: every method of ``descriptors`` over HTTP, calling ``upstream``.

    Nothing is added for any service in particular: ``protoserve.gateway.build_gateway``
    is this plus protoserve's own pieces.

    Args:
        upstream: a gRPC target (``host:port``, ``dns:///name:port``,
            ``ipv4:a:p,b:q``; a channel is opened at startup, balanced round robin
            over its addresses: ``gateway/_balancing.py``), or an open
            ``grpc.aio.Channel``, used as it is.
        descriptors: what to serve.
        cors_origins: origins allowed by CORS; none (CORS off) by default.
        max_body_bytes: larger request bodies are refused with 413.
        keepalive: seconds of silence on an SSE stream before a keep-alive comment.
        forwarded_headers: request headers passed upstream as metadata, besides
            ``Grpc-Metadata-*`` (prefix stripped) and ``X-Request-Id``.
        use_proto_names: JSON field names as in the .proto (``generated_text``);
            False for lowerCamelCase (``generatedText``). Input accepts both.
        max_message_bytes: largest gRPC message sent or received upstream.
        title: the OpenAPI document's and the docs page's title.
        codecs: full method or service name -> the :class:`Codec` of its HTTP format, or
            None for protobuf's JSON mapping (see ``docs/gateway-codecs.md``).
        pages: path -> an endpoint answering GET there, beside the gateway's own.
        channel_credentials: TLS (and mTLS) for the channel the gateway opens to a
            ``host:port`` upstream (``grpc.ssl_channel_credentials``); None, the
            default, is plaintext. Not used with an open channel.
        upstream_retries: retries of a call an upstream server refused with
            UNAVAILABLE before any header (a draining protoserve), on another
            server; 0 to 4, 0: none. Not used with an open channel.
        upstream_health_check: send calls only to upstream servers whose health
            ``""`` is SERVING (gRPC client-side health checking); None, the default:
            when ``upstream`` may name several servers (``dns:``, an address list).
            Not used with an open channel.
        docs: serve ``/openapi.json`` and the ``/docs`` page; False: both answer 404.
        metrics: serve the gateway's Prometheus ``/metrics``; False: it answers 404
            (the gateway still counts).

    Raises:
        ValueError: a method's ``google.api.http`` rule is invalid, a codec is
            registered for a name not served or for a method it cannot frame, methods
            share a route without one codec that chooses between them
            (``Codec.choose_binding``), or a page takes the path of one of the
            gateway's own.
    """
    method_codecs = resolve_codecs(descriptors.services, codecs or {})
    gateway = _Gateway(
        upstream,
        descriptors,
        codecs=method_codecs,
        max_body_bytes=max_body_bytes,
        keepalive=keepalive,
        forwarded=forwarded_headers,
        use_proto_names=use_proto_names,
        channel_options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *(
                channel_options(
                    upstream,
                    retries=upstream_retries,
                    health_check=upstream_health_check,
                    max_message_bytes=max_message_bytes,
                )
                if isinstance(upstream, str)
                else ()
            ),
        ],
        channel_credentials=channel_credentials,
    )
    check_shared_routes(gateway.router.shared_routes(), method_codecs)
    document = build_openapi(
        gateway.bindings,
        title=title,
        version="1",
        comments=descriptors.comments,
        use_proto_names=use_proto_names,
        codecs=method_codecs,
    )
    gateway.pages = _own_pages(gateway, document, title)
    _turn_off(gateway.pages, docs=docs, metrics=metrics)
    for path, page in (pages or {}).items():
        if path in gateway.pages:
            raise ValueError(f"the page {path} is the gateway's own")
        gateway.pages[path] = page
    verbs = sorted({*_METHODS, *(b.verb for b in gateway.bindings)})
    route = Route("/{path:path}", gateway.endpoint, methods=verbs)
    app = Starlette(
        routes=[route],
        middleware=_middleware(cors_origins, verbs),
        lifespan=gateway.lifespan,
        # What Starlette answers by itself (a verb not listed: 405) as Status JSON.
        exception_handlers={HTTPException: starlette_error},
    )
    # A path the route's convertor does not match (one holding %0A) is answered by the
    # one route like any other, not by Starlette's plain-text 404 (gateway/_fallback.py).
    app.router.default = route.app
    app.state.gateway = gateway
    return app


def _own_pages(gateway: _Gateway, document: dict[str, Any], title: str) -> dict[str, Endpoint]:
    docs = docs_html("/openapi.json", title)

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    async def docs_page(request: Request) -> Response:
        return HTMLResponse(docs)

    return {
        "/healthz": gateway.healthz,
        "/readyz": gateway.readyz,
        "/openapi.json": openapi,
        "/docs": docs_page,
        "/metrics": gateway.metrics.endpoint,
    }


def _turn_off(pages: dict[str, Endpoint], *, docs: bool, metrics: bool) -> None:
    """Drop the own pages turned off (exposure is a choice, docs/security.md)."""
    off = [*(() if docs else ("/openapi.json", "/docs")), *(() if metrics else ("/metrics",))]
    for path in off:
        del pages[path]


def _middleware(cors_origins: Sequence[str], verbs: Sequence[str]) -> list[Middleware]:
    # RequestIdMiddleware outermost: every response, CORS's own included, gets its id.
    middleware = [Middleware(RequestIdMiddleware)]
    if cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=list(verbs),
                allow_headers=["*"],
                expose_headers=["X-Request-Id", "Retry-After"],
            )
        )
    return middleware


def _route_path(request: Request) -> str:
    """The request's path below the app's ``root_path`` (a proxy prefix or a ``Mount``),
    where the gateway's pages are found, as Starlette's routes find theirs."""
    path: str = request.scope["path"]
    root: str = request.scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path
