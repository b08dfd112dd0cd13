"""Per-method codecs: an HTTP format of its own for a method whose protocol is not protobuf's JSON.

The gateway's routes come from ``google.api.http`` rules and its JSON from
protobuf's mapping. Some protocols bind gRPC methods to REST paths but speak a
JSON of their own over them: the Open Inference Protocol (KServe V2) has
``{"inputs": [{"data": [...]}]}`` tensors and binary bodies, answers health with
400 for "not ready", and errors as ``{"error": "..."}``. A :class:`Codec`,
registered for a method or for a whole service, decides for those methods how
an HTTP request becomes the request message and how the response message and
errors become the HTTP response. Routing, deadlines, metadata, request ids,
metrics and cancelling stay the gateway's (see ``docs/gateway-codecs.md``).

The base class is protobuf's JSON mapping, and :class:`ProtobufCodec`, one of it, is
the codec of every method that has none registered: every call goes through a
codec. A codec that sets ``serves_streams`` owns its server streams' wire format
too (:meth:`Codec.stream_format`); any other is refused for streaming methods.
Methods whose HTTP rules share one route (HTTP method and path template) are
told apart by one codec that chooses among them per request
(:meth:`Codec.choose_binding`, :func:`check_shared_routes`); without codecs, the
first declared serves the route, as before.
The gateway core knows no codec by name but ``protobuf``; the public assembly
names more (``load_codec``'s ``named``).
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from protoserve.gateway._body import check_content_type
from protoserve.gateway._errors import ErrorInfo
from protoserve.gateway._rules import Binding
from protoserve.gateway._streaming import STREAM_FORMATS, StreamFormat, choose_format
from protoserve.gateway._transcode import build_request, render_message, render_response

__all__ = [
    "Codec",
    "CodecRequest",
    "CodecResponse",
    "ErrorInfo",
    "NamedCodecs",
    "ProtobufCodec",
    "check_shared_routes",
    "chooses",
    "load_codec",
    "parse_codec_option",
    "resolve_codecs",
]

log = logging.getLogger("protoserve.gateway")

#: Codec names known without an import path -> what makes the codec.
NamedCodecs = Mapping[str, Callable[[], "Codec"]]


@dataclass(frozen=True)
class CodecRequest:
    """One HTTP request to a method that has a codec.

    Attributes:
        binding: the rule the request matched (its method, template, body and
            response_body).
        path_params: dotted field path -> decoded value, from the URL path.
        query: the query string's (key, value) pairs, in order.
        headers: the request headers; lookups ignore case.
        body: the body, already inflated from its ``Content-Encoding`` and within the
            gateway's ``max_body_bytes``.
        state: the codec's scratch space for this request: what ``decode_request``
            puts here, ``encode_response`` finds (as Starlette's ``request.state``).
    """

    binding: Binding
    path_params: Mapping[str, str]
    query: Sequence[tuple[str, str]]
    headers: Mapping[str, str]
    body: bytes
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CodecResponse:
    """What a codec answers: the gateway adds the call's metadata headers, and
    ``RequestIdMiddleware`` its ``X-Request-Id``.

    Attributes:
        body: the body's bytes.
        status: the HTTP status.
        media_type: the Content-Type (``charset`` is the codec's to add), or None for none.
        headers: more response headers.
    """

    body: bytes
    status: int = 200
    media_type: str | None = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(
        cls, value: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> CodecResponse:
        """``value`` as compact UTF-8 JSON (non-finite floats as ``NaN``/``Infinity``)."""
        body = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
        return cls(body, status, "application/json", dict(headers or {}))


class Codec:
    """The HTTP format of the methods a codec is registered for.

    The base class speaks protobuf's JSON mapping, as the gateway does for methods
    without a codec: a subclass overrides what its protocol does differently and
    keeps the rest. Codec methods run on the event loop, once per request; they
    must not block. They may raise :class:`~protoserve.gateway.GatewayError` (for
    bad input, ``bad_request``); any other exception is logged and answered as a
    500 INTERNAL error, without the traceback.
    """

    #: JSON names of the default encoding: proto names (``generated_text``) or lowerCamelCase.
    use_proto_names: bool = True
    #: True for a codec that frames server streams too (:meth:`stream_format`,
    #: :meth:`encode_stream_message`); any other is refused for a streaming method.
    serves_streams: ClassVar[bool] = False

    @property
    def name(self) -> str:
        """The codec's name in logs and OpenAPI (``x-codec``): its class name by default."""
        return type(self).__name__

    def check(self, method: MethodDescriptor) -> None:
        """Called once per method at build time; raise ValueError if it cannot serve ``method``."""

    def choose_binding(self, request: CodecRequest, bindings: Sequence[Binding]) -> Binding:
        """The binding, one of ``bindings``, that serves ``request`` on a route several
        methods share (the same HTTP method and path template, all with this codec).

        Called after the body is read and before :meth:`decode_request`, which then
        gets a request whose ``binding`` is the one chosen, and the chosen method's
        input type; ``request.state`` carries over, so what the choice parsed need not
        be parsed again. ``request.binding`` is the first of ``bindings`` here.

        The base class chooses nothing: methods with codecs that share a route without
        one codec that overrides this are refused when the app is built
        (:func:`check_shared_routes`); methods without codecs keep the first declared.

        Raises:
            GatewayError: the request fits none of the methods (400 with a message).
        """
        raise NotImplementedError(f"codec {self.name} does not choose between methods")

    def decode_request(self, request: CodecRequest, message_class: type[Message]) -> Message:
        """The request message for ``request``; ``message_class`` is the method's input type.

        Raises:
            GatewayError: the request is not valid for this codec (400 with a message).
        """
        if request.body and request.binding.body:
            check_content_type(request.headers.get("content-type", ""))
        return build_request(
            request.binding, request.path_params, request.query, request.body, message_class
        )

    def encode_response(self, request: CodecRequest, message: Message) -> CodecResponse:
        """The HTTP response for the upstream's answer ``message`` to ``request``."""
        body = render_response(request.binding, message, use_proto_names=self.use_proto_names)
        return CodecResponse(body)

    def encode_error(self, binding: Binding, error: ErrorInfo) -> CodecResponse:
        """The HTTP response for an error of a request that matched ``binding``.

        Both the upstream's errors and the gateway's own (a body too large, a bad
        ``Grpc-Timeout``, what ``decode_request`` raised) come here.
        """
        return CodecResponse.json(error.status_json, status=error.status)

    def openapi_operation(self, binding: Binding) -> dict[str, Any] | None:
        """OpenAPI Operation fields for ``binding``, or None for "defined by the codec".

        The gateway writes operationId, tags, summary, description, ``x-grpc-method``,
        ``x-codec`` and the path parameters; the keys returned here (``requestBody``,
        ``responses``, more ``parameters``, ...) are set over those. ``$ref`` may point
        at the schemas of :meth:`openapi_schemas`.
        """
        return None

    def openapi_schemas(self) -> dict[str, Any]:
        """Schemas this codec adds to ``components.schemas``, by name."""
        return {}

    def stream_format(self, request: CodecRequest) -> StreamFormat:
        """The wire format of a server stream answering ``request``: its content type,
        framing, end, error and keep-alive. By default SSE when ``Accept`` names
        ``text/event-stream``, else NDJSON; a protocol with an event framing of its
        own returns its own :class:`~protoserve.gateway._streaming.StreamFormat`."""
        return choose_format(STREAM_FORMATS, request.headers.get("accept", ""))

    def encode_stream_message(self, request: CodecRequest, message: Message) -> Any:
        """The JSON of one message of a server stream, which the stream format frames."""
        return render_message(message, use_proto_names=self.use_proto_names)


class ProtobufCodec(Codec):
    """Protobuf's JSON mapping: the codec of every method that has none registered."""

    serves_streams = True

    def __init__(self, *, use_proto_names: bool = True) -> None:
        self.use_proto_names = use_proto_names

    @property
    def name(self) -> str:
        return "protobuf"


def resolve_codecs(
    services: Iterable[ServiceDescriptor], codecs: Mapping[str, Codec | None]
) -> dict[str, Codec]:
    """The codec of every method that has one, by the method's full name.

    ``codecs`` maps a full method name (``pkg.Service.Method``) or a full service
    name (``pkg.Service``) to a codec, or to None for protobuf's JSON mapping; a
    method's own entry wins over its service's. A service's codec covers its unary
    methods, and its server-streaming ones when it ``serves_streams``; its other
    methods keep the gateway's formats.

    Raises:
        ValueError: a codec is registered for a name that is neither a served
            service nor a served method, or for a streaming method it cannot frame,
            or its ``check`` refused a method.
    """
    served = list(services)
    methods = {m.full_name: m for s in served for m in s.methods}
    service_names = {s.full_name for s in served}
    for name, codec in codecs.items():
        if codec is not None and name not in methods and name not in service_names:
            known = ", ".join(sorted(service_names))
            raise ValueError(
                f"codec {codec.name} is registered for {name!r}, which is neither a served "
                f"service nor a method of one (served: {known})"
            )
        if codec is not None and not isinstance(codec, Codec):
            raise ValueError(f"the codec for {name!r} is not a protoserve.gateway.Codec")
    resolved: dict[str, Codec] = {}
    for full_name, method in methods.items():
        if full_name in codecs:
            codec = codecs[full_name]
            if codec is not None and not _frames(codec, method):
                kind = "server-streaming" if method.server_streaming else "client-streaming"
                raise ValueError(
                    f"codec {codec.name} is registered for {full_name}, a {kind} method; "
                    "codecs serve unary methods only, unless they set serves_streams"
                )
        else:
            codec = codecs.get(method.containing_service.full_name)
            codec = codec if codec is not None and _frames(codec, method) else None
        if codec is None:
            continue
        try:
            codec.check(method)
        except ValueError as exc:
            raise ValueError(f"codec {codec.name} cannot serve {full_name}: {exc}") from exc
        resolved[full_name] = codec
    return resolved


def chooses(codec: Codec) -> bool:
    """Whether ``codec`` chooses between methods that share a route (overrides
    :meth:`Codec.choose_binding`)."""
    return type(codec).choose_binding is not Codec.choose_binding


def check_shared_routes(shared: Iterable[Sequence[Binding]], codecs: Mapping[str, Codec]) -> None:
    """Refuse a route shared by several methods with codecs, unless one codec chooses.

    A route whose methods all have protobuf's JSON mapping (a foreign descriptor set,
    not ours to change) is served as before, by the first method declared, with a
    WARNING naming the methods left unreachable over HTTP.

    Args:
        shared: each shared route's bindings, one per method (``Router.shared_routes``).
        codecs: method full name -> its codec (:func:`resolve_codecs`); a method not
            here has protobuf's JSON mapping, which does not choose.

    Raises:
        ValueError: a method of a shared route has a codec, and the route's methods do
            not have one codec that overrides :meth:`Codec.choose_binding`; the message
            names the route and the methods.
    """
    for bindings in shared:
        first = bindings[0]
        names = " and ".join(b.method.full_name for b in bindings)
        route = f"{first.verb} {first.template.pattern}"
        found = {
            id(codecs.get(b.method.full_name)): codecs.get(b.method.full_name) for b in bindings
        }
        if set(found.values()) == {None}:
            log.warning(
                "%s share the route %s: %s serves it, and the others are not reachable over "
                "HTTP (a codec that chooses between them, Codec.choose_binding, would serve all)",
                names,
                route,
                first.method.full_name,
            )
            continue
        codec = next(iter(found.values())) if len(found) == 1 else None
        if codec is None or not chooses(codec):
            kinds = ", ".join(
                sorted({c.name if c is not None else "protobuf" for c in found.values()})
            )
            raise ValueError(
                f"{names} share the route {route} (codec: {kinds}); methods may share a "
                "route only under one codec that chooses between them (Codec.choose_binding)"
            )


def _frames(codec: Codec, method: MethodDescriptor) -> bool:
    """Whether ``codec`` can answer ``method``: unary, or server-streaming if it frames streams."""
    if method.client_streaming:
        return False
    return not method.server_streaming or codec.serves_streams


def load_codec(spec: str, named: NamedCodecs) -> Codec | None:
    """The codec ``spec`` names: ``protobuf`` (None: no codec), a name in ``named``, or
    ``package.module:attr``.

    The attribute is a :class:`Codec` instance, or a class or function that makes
    one when called with no arguments.

    Raises:
        ValueError: the module or attribute cannot be found, or is not a codec.
    """
    spec = spec.strip()
    if spec == "protobuf":
        return None
    if spec in named:
        return named[spec]()
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        names = ", ".join(repr(name) for name in ("protobuf", *named))
        raise ValueError(f"codec {spec!r} is not {names} or 'package.module:attribute'")
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"codec {spec!r}: cannot import {module_name}: {exc}") from exc
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise ValueError(f"codec {spec!r}: {module_name} has no attribute {attr!r}") from None
    if not isinstance(found, Codec) and callable(found):
        try:
            found = found()
        except Exception as exc:
            raise ValueError(f"codec {spec!r}: calling {attr}() failed: {exc}") from exc
    if not isinstance(found, Codec):
        raise ValueError(
            f"codec {spec!r} is a {type(found).__name__}, not a protoserve.gateway.Codec"
        )
    return found


def parse_codec_option(option: str, named: NamedCodecs) -> tuple[str, Codec | None]:
    """``NAME=SPEC`` (the CLI's ``--codec``) as (name, codec); see :func:`load_codec`.

    Raises:
        ValueError: no ``=``, an empty name, or a spec ``load_codec`` refuses.
    """
    name, equals, spec = option.partition("=")
    name = name.strip().lstrip("/").replace("/", ".")
    if not equals or not name:
        raise ValueError(
            f"--codec {option!r} is not NAME=CODEC (for example "
            "pkg.Service=protobuf, or pkg.Service.Method=package.module:attr)"
        )
    return name, load_codec(spec, named)
