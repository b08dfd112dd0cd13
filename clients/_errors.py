"""Typed exceptions, one per gRPC status code, the same over gRPC and over HTTP.

Every failed call raises a :class:`ProtoserveError` subclass carrying the code,
the server's message and its ``google.rpc`` details as Python objects:
``InvalidArgument.field_violations``, ``ResourceExhausted.retry_after``,
``.request_id`` (from ``RequestInfo``, or the call's ``x-request-id``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ProtoserveError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "from_grpc_error",
    "from_http_error",
    "from_status",
]

_DETAIL_TYPES: tuple[type[Message], ...] = (
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
    error_details_pb2.ResourceInfo,
    error_details_pb2.RequestInfo,
    error_details_pb2.ErrorInfo,
    error_details_pb2.DebugInfo,
    error_details_pb2.QuotaFailure,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.Help,
    error_details_pb2.LocalizedMessage,
)


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: its dotted path and what is wrong with it."""

    field: str
    description: str


class ProtoserveError(Exception):
    """A call that ended with a non-OK status.

    Attributes:
        code: the gRPC status code.
        message: the server's message, for people.
        details: the ``google.rpc`` detail messages, unpacked where their type is known.
        request_id: the request id the server logged the call under, when known.
        http_status: the HTTP status, for calls made over HTTP.
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        details: Sequence[Message] = (),
        request_id: str = "",
        http_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = list(details)
        info = self.detail(error_details_pb2.RequestInfo)
        self.request_id = request_id or (info.request_id if info else "")
        self.http_status = http_status

    def detail(self, kind: type[Any]) -> Any:
        """The first detail of the given message type, or None."""
        return next((d for d in self.details if isinstance(d, kind)), None)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class Cancelled(ProtoserveError):
    code = grpc.StatusCode.CANCELLED


class Unknown(ProtoserveError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(ProtoserveError):
    """The request was malformed; ``field_violations`` say which fields and why."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    @property
    def field_violations(self) -> list[FieldViolation]:
        bad = self.detail(error_details_pb2.BadRequest)
        if bad is None:
            return []
        return [FieldViolation(v.field, v.description) for v in bad.field_violations]


class DeadlineExceeded(ProtoserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(ProtoserveError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ProtoserveError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(ProtoserveError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ProtoserveError):
    """The server is at capacity; ``retry_after`` says when to try again (seconds)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    @property
    def retry_after(self) -> float | None:
        info = self.detail(error_details_pb2.RetryInfo)
        if info is None:
            return None
        return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)


class FailedPrecondition(ProtoserveError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(ProtoserveError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(ProtoserveError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(ProtoserveError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(ProtoserveError):
    """The server failed; ``request_id`` finds the traceback in its log."""

    code = grpc.StatusCode.INTERNAL


class Unavailable(ProtoserveError):
    """The server (or the model) cannot serve now; retrying later may work."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(ProtoserveError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(ProtoserveError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[ProtoserveError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
# The code of an HTTP error whose body is no google.rpc.Status (a proxy's page):
# the gateway's table (HTTP_STATUS, gateway/_errors.py) read backwards, one code
# for a status that several share (409: ABORTED). Any other status is UNKNOWN.
_CODE_OF_HTTP_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _unpack(details: Sequence[any_pb2.Any]) -> list[Message]:
    found: list[Message] = []
    for packed in details:
        for kind in _DETAIL_TYPES:
            if packed.TypeName() == kind.DESCRIPTOR.full_name:
                message = kind()
                packed.Unpack(message)
                found.append(message)
                break
    return found


def from_status(
    code: grpc.StatusCode | int,
    message: str,
    details: Sequence[Message] = (),
    *,
    request_id: str = "",
    http_status: int | None = None,
) -> ProtoserveError:
    """The exception for a status code (a ``grpc.StatusCode`` or its number)."""
    if isinstance(code, int):
        code = _BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    cls = _BY_CODE.get(code, Unknown)
    return cls(message, details=details, request_id=request_id, http_status=http_status)


def from_grpc_error(error: grpc.RpcError) -> ProtoserveError:
    """The typed exception for a failed gRPC call (sync or asyncio)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else "") or ""
    details: list[Message] = []
    trailing: Any = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    request_id = ""
    for key, value in trailing or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            try:
                details = _unpack(status_pb2.Status.FromString(value).details)
            except Exception:  # a malformed trailer leaves the status as it is
                details = []
    initial: Any = error.initial_metadata() if hasattr(error, "initial_metadata") else None
    for key, value in initial or ():
        if key == "x-request-id" and isinstance(value, str):
            request_id = value
    return from_status(code, message, details, request_id=request_id)


def from_http_error(
    status: int, body: Any, headers: Mapping[str, str] | None = None
) -> ProtoserveError:
    """The typed exception for a gateway error: ``google.rpc.Status`` JSON, or anything else."""
    request_id = (headers or {}).get("x-request-id", "")
    if isinstance(body, Mapping) and isinstance(body.get("code"), int):
        details: list[Message] = []
        for item in body.get("details") or ():
            packed = any_pb2.Any()
            try:
                json_format.ParseDict(item, packed)
            except Exception:  # an unknown detail type is skipped, not fatal
                continue
            details.extend(_unpack([packed]))
        return from_status(
            body["code"],
            str(body.get("message", "")),
            details,
            request_id=request_id,
            http_status=status,
        )
    code = _CODE_OF_HTTP_STATUS.get(status, grpc.StatusCode.UNKNOWN)
    return from_status(
        code, f"HTTP {status}: {str(body)[:200]}", request_id=request_id, http_status=status
    )
