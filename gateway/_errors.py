"""Errors over HTTP: the one table from gRPC status codes to HTTP statuses, and the body.

Rule 4 of docs/architecture.md: gRPC status codes are the error vocabulary. Every
error the gateway answers, whether the upstream raised it or the gateway did, is a
``google.rpc.Status`` rendered in proto3 JSON
(``{"code": 3, "message": "...", "details": [...]}``, the body grpc-gateway and
Google's REST APIs answer), with the HTTP status taken from :data:`HTTP_STATUS`,
the only place in protoserve that maps codes to HTTP.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import grpc
import grpc.aio
from google.protobuf import any_pb2, descriptor_pool, duration_pb2, json_format, message_factory
from google.protobuf.descriptor import Descriptor
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message import DecodeError, Message

# Importing error_details_pb2 also registers google.rpc's detail types (BadRequest,
# RetryInfo, ...) in the default pool, which is how they are always known.
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "HTTP_STATUS",
    "ErrorInfo",
    "GatewayError",
    "bad_request",
    "error_info",
    "status_json",
]

#: gRPC status code -> HTTP status: the "HTTP Mapping" of each code in
#: google/rpc/code.proto, which grpc-gateway v2's ``runtime.HTTPStatusFromCode``
#: (runtime/errors.go) follows too, but for CANCELLED (see below).
HTTP_STATUS: Mapping[grpc.StatusCode, int] = MappingProxyType(
    {
        grpc.StatusCode.OK: 200,
        # 499 is nginx's "client closed request", as code.proto says: the caller gave
        # up, not the server. (grpc-gateway answers 408, which blames the client's
        # slowness; the gateway's own cancelled-by-disconnect answer is 499 too.)
        grpc.StatusCode.CANCELLED: 499,
        grpc.StatusCode.UNKNOWN: 500,
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.ALREADY_EXISTS: 409,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        # Deliberately 400, not 412: HTTP's 412 is about conditional request headers
        # (If-Match and friends), while FAILED_PRECONDITION means the system is not in
        # a state the request needs. code.proto says 400, and grpc-gateway v2 notes it
        # "deliberately doesn't translate to the similarly named '412 Precondition
        # Failed'" (v1 did answer 412).
        grpc.StatusCode.FAILED_PRECONDITION: 400,
        grpc.StatusCode.ABORTED: 409,
        grpc.StatusCode.OUT_OF_RANGE: 400,
        grpc.StatusCode.UNIMPLEMENTED: 501,
        grpc.StatusCode.INTERNAL: 500,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DATA_LOSS: 500,
    }
)

_DETAILS_KEY = "grpc-status-details-bin"
# Codes after which waiting helps, so a RetryInfo detail becomes a Retry-After header.
_RETRYABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})
# Types whose JSON is not an object: inside an Any they go under "value" (proto3 JSON).
_WKT_WITH_VALUE = frozenset(
    f"google.protobuf.{name}"
    for name in (
        "Any", "Duration", "FieldMask", "ListValue", "Struct", "Timestamp", "Value",
        "DoubleValue", "FloatValue", "Int64Value", "UInt64Value", "Int32Value",
        "UInt32Value", "BoolValue", "StringValue", "BytesValue",
    )
)  # fmt: skip


class GatewayError(Exception):
    """An error the gateway itself answers: bad JSON, unknown route, body too large...

    Args:
        code: the gRPC status code, which the body carries.
        message: the message for people; never a traceback.
        details: ``google.rpc`` detail messages (or Anys) for machines.
        headers: extra response headers (``Allow`` for a 405, for example).
        http_status: an HTTP status other than ``HTTP_STATUS[code]``, for the cases
            HTTP has a better word for (413 body too large, 405 wrong verb, 415).

    Attributes:
        code, message, details, headers: as given (details a tuple, headers a dict).
        http_status: the HTTP status to answer: the override, else ``HTTP_STATUS[code]``.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        details: Sequence[Message] = (),
        headers: Mapping[str, str] | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: tuple[Message, ...] = tuple(details)
        self.headers: dict[str, str] = dict(headers or {})
        self.http_status: int = http_status if http_status is not None else HTTP_STATUS[code]

    def __repr__(self) -> str:
        return f"GatewayError({self.code.name}, {self.message!r}, http_status={self.http_status})"


def bad_request(message: str, field: str, description: str, *, reason: str = "") -> GatewayError:
    """An INVALID_ARGUMENT error carrying one ``google.rpc.BadRequest`` field violation.

    Args:
        message: the error's message (names the field, for people).
        field: the field's path (``parameters.max_new_tokens``), "" for the body as a whole.
        description: what is wrong with it.
        reason: a short UPPER_SNAKE_CASE word for machines (``UNKNOWN_FIELD``), or "".
    """
    violation = error_details_pb2.BadRequest.FieldViolation(
        field=_utf8(field), description=_utf8(description), reason=reason
    )
    detail = error_details_pb2.BadRequest(field_violations=[violation])
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, _utf8(message), details=[detail])


def _utf8(text: str) -> str:
    # Client text can hold lone surrogates (JSON's "\ud800"), which no protobuf string
    # or UTF-8 response body can carry.
    return text.encode("utf-8", "replace").decode("utf-8")


def status_json(
    code: grpc.StatusCode,
    message: str,
    details: Sequence[any_pb2.Any | Message],
    pool: DescriptorPool | None = None,
) -> dict[str, Any]:
    """The ``google.rpc.Status`` body in proto3 JSON (lowerCamelCase names, as Google's APIs).

    ``details`` always appears, as a list, so that clients need not test for it. Each
    detail is rendered as a typed Any (``{"@type": ..., <fields>}``): google.rpc types
    are always known, others are looked up in ``pool`` and then in the default pool. An
    Any whose type cannot be found, or whose bytes do not parse, is rendered as
    ``{"@type": ..., "value": "<base64>"}``: an error body never fails to render.
    """
    return {
        "code": code.value[0],
        "message": _utf8(message),
        "details": [_detail_json(detail, pool) for detail in details],
    }


@dataclass(frozen=True)
class ErrorInfo:
    """An error to answer, from the upstream call or from the gateway itself.

    Attributes:
        status: the HTTP status from the gateway's table (``HTTP_STATUS``), or the
            gateway's own choice (413, 415, 405).
        code: the gRPC status code.
        message: the message for people.
        details: the ``google.rpc`` details, as Anys (upstream) or messages (gateway).
        status_json: the ``google.rpc.Status`` JSON the gateway answers by default.
    """

    status: int
    code: grpc.StatusCode
    message: str
    details: tuple[Message, ...]
    status_json: dict[str, Any]


def error_info(
    error: GatewayError | grpc.RpcError, pool: DescriptorPool | None = None
) -> tuple[ErrorInfo, dict[str, str]]:
    """Either kind of error as what the gateway answers: the :class:`ErrorInfo`, and the
    headers that go with it (``Allow`` of a 405, ``Retry-After``, ``WWW-Authenticate``).

    An upstream error's details come from the ``grpc-status-details-bin`` trailer (a
    serialized ``google.rpc.Status``). The code and message are the call's own: if the
    trailer disagrees with them (a server bug), the details are still shown. A trailer
    that does not parse is ignored. When a RESOURCE_EXHAUSTED or UNAVAILABLE error
    carries a ``google.rpc.RetryInfo``, the headers hold ``Retry-After`` (whole seconds,
    rounded up, at least 1). A 401 (UNAUTHENTICATED) carries ``WWW-Authenticate: Bearer``.
    ``pool`` finds detail types other than google.rpc's.
    """
    if isinstance(error, GatewayError):
        body = status_json(error.code, error.message, error.details, pool)
        info = ErrorInfo(error.http_status, error.code, error.message, error.details, body)
        return info, _challenged(info, dict(error.headers))
    code, message, trailers = _call_status(error)
    details = list(_rich_status(trailers).details)
    headers: dict[str, str] = {}
    if code in _RETRYABLE:
        delay = _retry_delay(details)
        if delay is not None:
            headers["Retry-After"] = str(max(1, math.ceil(delay)))
    body = status_json(code, message, details, pool)
    info = ErrorInfo(HTTP_STATUS[code], code, message, tuple(details), body)
    return info, _challenged(info, headers)


def _challenged(info: ErrorInfo, headers: dict[str, str]) -> dict[str, str]:
    # A 401 must say how to authenticate (RFC 9110, 15.5.2); protoserve's servers take
    # bearer tokens (RFC 6750), which the gateway forwards as the Authorization header.
    if info.status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return headers


def _call_status(
    error: grpc.aio.AioRpcError | grpc.RpcError,
) -> tuple[grpc.StatusCode, str, Sequence[tuple[str, str | bytes]]]:
    # AioRpcError and the sync stack's errors (which are also grpc.Call) both have
    # code()/details()/trailing_metadata(); a bare RpcError has none of them.
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code(), error.details() or "", _pairs(error.trailing_metadata())
    if isinstance(error, grpc.Call):
        code = error.code()
        return (
            code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN,
            error.details() or "",
            _pairs(error.trailing_metadata()),
        )
    # Say nothing about an error of unknown shape: its str() may hold internals.
    return grpc.StatusCode.UNKNOWN, "the upstream call failed", ()


def _pairs(metadata: Any) -> list[tuple[str, str | bytes]]:
    # aio's Metadata and the sync stack's tuple of _Metadatum both iterate as pairs.
    return [(key, value) for key, value in metadata or ()]


def _rich_status(trailers: Sequence[tuple[str, str | bytes]]) -> Any:
    """The ``google.rpc.Status`` of the details trailer, or an empty one."""
    # Parsed here rather than by grpc_status.rpc_status.from_call, which raises
    # ValueError when the trailer's code or message differ from the call's.
    for key, value in trailers:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                break
    return status_pb2.Status()


def _retry_delay(details: Sequence[any_pb2.Any]) -> float | None:
    for detail in details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                # Not ToTimedelta(), which drops nanoseconds below a microsecond.
                delay: duration_pb2.Duration = info.retry_delay
                return delay.seconds + delay.nanos / 1e9
    return None


def _detail_json(detail: any_pb2.Any | Message, pool: DescriptorPool | None) -> dict[str, Any]:
    if not isinstance(detail, any_pb2.Any):
        packed = any_pb2.Any()
        packed.Pack(detail)
        try:
            return _typed_json(detail, packed.type_url, pool)
        except (json_format.Error, TypeError, ValueError):
            detail = packed  # rendered below: by type if it can be, else as bytes
    raw = {"@type": detail.type_url, "value": base64.b64encode(detail.value).decode("ascii")}
    descriptor = _find_type(detail.type_url.rpartition("/")[2], pool)
    if descriptor is None:
        return raw
    try:
        message = message_factory.GetMessageClass(descriptor).FromString(detail.value)
        return _typed_json(message, detail.type_url, pool)
    except (DecodeError, json_format.Error, TypeError, ValueError):
        # Bytes that do not parse as their type, or a nested Any of an unknown type,
        # or a value with no JSON form (NaN in a Value): still answer, with the bytes.
        return raw


def _typed_json(message: Message, type_url: str, pool: DescriptorPool | None) -> dict[str, Any]:
    body = json_format.MessageToDict(message, descriptor_pool=pool)
    if message.DESCRIPTOR.full_name in _WKT_WITH_VALUE:
        return {"@type": type_url, "value": body}
    return {"@type": type_url, **body}


def _find_type(name: str, pool: DescriptorPool | None) -> Descriptor | None:
    pools = [pool, descriptor_pool.Default()] if pool is not None else [descriptor_pool.Default()]
    for candidate in pools:
        try:
            return candidate.FindMessageTypeByName(name)
        except Exception:  # KeyError; or whatever a pool backed by a database raises
            # Rendering an error must never fail: an unknown type is kept as bytes.
            continue
    return None
