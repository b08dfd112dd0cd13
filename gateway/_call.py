"""One HTTP request to one gRPC method: the :class:`Call`, built once, and its answers.

Like Starlette's ``Request`` or grpc-gateway's ``AnnotateContext``, the call holds
everything a request to a method needs, decided once, in one place
(:func:`build_call`): the binding it matched, its codec, the request message, the
deadline, the metadata that goes upstream and the request id. The unary and the
streaming paths (``gateway/_app.py``) take the call, not its fields.

Every answer of a matched request goes through its codec (protobuf's JSON mapping
when none is registered), and a codec's own failure never reaches the client as
more than a 500 INTERNAL (docs/architecture.md, rule 4).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from protoserve.gateway._body import read_body
from protoserve.gateway._callmeta import outgoing_metadata, request_deadline
from protoserve.gateway._codecs import Codec, CodecRequest, CodecResponse
from protoserve.gateway._errors import ErrorInfo, GatewayError, error_info
from protoserve.gateway._rules import Binding
from protoserve.gateway._streaming import StreamFormat

__all__ = ["Call", "answer_error", "build_call", "codec_response", "grpc_path"]

T = TypeVar("T")
log = logging.getLogger("protoserve.gateway")


def grpc_path(method: MethodDescriptor) -> str:
    """``/package.Service/Method``: the method's name on the wire (and in the access line)."""
    return f"/{method.containing_service.full_name}/{method.name}"


@dataclass(frozen=True)
class Call:
    """One request to one gRPC method, ready to send upstream.

    Attributes:
        http: the HTTP request (its ``receive`` tells when the client leaves).
        codec: the codec of the method: what decoded the request, and encodes the answers.
        request: what the codec saw of the request (binding, path, query, headers, body).
        message: the request message.
        deadline: seconds the call may take, or None.
        metadata: what goes upstream as gRPC metadata (the request id included).
    """

    http: Request
    codec: Codec
    request: CodecRequest
    message: Message
    deadline: float | None
    metadata: list[tuple[str, str]]

    @property
    def binding(self) -> Binding:
        return self.request.binding

    @property
    def method(self) -> MethodDescriptor:
        return self.request.binding.method

    def encode_response(self, message: Message, headers: Mapping[str, str]) -> Response:
        """The answer to the upstream's ``message``, by the codec, with ``headers``."""
        codec = self.codec
        encoded = _guarded(
            codec, self.binding, "encode the response", codec.encode_response, self.request, message
        )
        return codec_response(encoded, headers)

    def stream_format(self) -> StreamFormat:
        """The format the codec chooses for this call's stream."""
        codec = self.codec
        what = "choose a stream format"
        return _guarded(codec, self.binding, what, codec.stream_format, self.request)

    def frame(self, stream_format: StreamFormat, index: int, message: Message) -> bytes:
        """The upstream's ``index``-th stream ``message`` (from 1), rendered by the codec and
        framed by ``stream_format``."""

        def render() -> bytes:
            data = self.codec.encode_stream_message(self.request, message)
            return stream_format.message(index, data)

        return _guarded(self.codec, self.binding, "encode a stream message", render)


async def build_call(
    http: Request,
    bindings: Sequence[Binding],
    path_params: Mapping[str, str],
    codec: Codec,
    *,
    max_body_bytes: int,
    forwarded: frozenset[str],
    request_id: str,
) -> Call:
    """The call of ``http``, which matched the route of ``bindings``: binding, body,
    message, deadline, metadata.

    ``bindings`` holds one binding, or several where methods share the route; then
    the codec chooses one (``Codec.choose_binding``) once the body is read.

    Raises:
        GatewayError: the body is too large or not inflatable, the codec refused
            the request, or a deadline header is malformed (in that order).
    """
    body = await read_body(http, max_body_bytes)
    query = http.query_params.multi_items()
    request = CodecRequest(bindings[0], path_params, query, http.headers, body)
    if len(bindings) > 1:
        request = dataclasses.replace(request, binding=_choose(codec, request, bindings))
    message = _decode(codec, request)
    deadline = request_deadline(http)
    metadata = outgoing_metadata(http, forwarded, request_id)
    return Call(http, codec, request, message, deadline, metadata)


def _choose(codec: Codec, request: CodecRequest, bindings: Sequence[Binding]) -> Binding:
    what = "choose a method"
    chosen = _guarded(codec, request.binding, what, codec.choose_binding, request, bindings)
    if not any(chosen is binding for binding in bindings):
        log.error("codec %s chose a binding not among the route's", codec.name)
        raise GatewayError(
            grpc.StatusCode.INTERNAL, f"the gateway's {codec.name} codec failed to {what}"
        )
    return chosen


def _decode(codec: Codec, request: CodecRequest) -> Message:
    method = request.binding.method
    message_class = GetMessageClass(method.input_type)
    message = _guarded(
        codec, request.binding, "decode the request", codec.decode_request, request, message_class
    )
    if message.DESCRIPTOR.full_name != method.input_type.full_name:
        log.error(
            "codec %s made a %s for %s", codec.name, message.DESCRIPTOR.full_name, method.full_name
        )
        raise GatewayError(
            grpc.StatusCode.INTERNAL,
            f"the gateway's {codec.name} codec made the wrong request message",
        )
    return message


def _guarded(codec: Codec, binding: Binding, what: str, step: Callable[..., T], *args: Any) -> T:
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


def answer_error(
    error: GatewayError | grpc.RpcError,
    pool: DescriptorPool | None,
    codec: Codec | None = None,
    binding: Binding | None = None,
) -> Response:
    """The answer to the gateway's own error or a failed upstream call.

    By ``codec`` once a request matched ``binding``; before that (no route), and when
    the codec fails even at that, ``google.rpc.Status`` JSON.
    """
    info, headers = error_info(error, pool)
    if codec is None or binding is None:
        return _status_response(info, headers)
    try:
        answer = codec.encode_error(binding, info)
    except Exception:
        # A codec that cannot even render an error: the error still gets answered.
        log.exception("codec %s failed to encode an error", codec.name)
        return _status_response(info, headers)
    return codec_response(answer, headers)


def _status_response(info: ErrorInfo, headers: Mapping[str, str]) -> Response:
    return JSONResponse(info.status_json, status_code=info.status, headers=headers)


def codec_response(answer: CodecResponse, headers: Mapping[str, str]) -> Response:
    """A codec's answer as a response, with the gateway's ``headers`` under the codec's own.

    ``X-Request-Id`` is not among them: ``RequestIdMiddleware`` puts the request's on
    every response, over any a codec set.
    """
    return Response(
        answer.body,
        status_code=answer.status,
        media_type=answer.media_type,
        headers={**headers, **answer.headers},
    )
