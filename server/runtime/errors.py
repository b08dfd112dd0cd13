"""The errors a request ends with, each carrying its gRPC status code.

Status codes are the error vocabulary (docs/architecture.md, rule 4). A request
fails by raising one of these from the runtime (or a servicer); the call's frame
(:mod:`protoserve.server.calls`) turns it into a gRPC status with ``google.rpc``
details (AIP-193, :func:`to_rpc_status`): a message for people, typed details for
machines. Anything else raised while serving is an internal error: logged with its
traceback on the server, sent to the client only as INTERNAL with the request id.

What an error echoes of a request is bounded (:func:`bounded`, :data:`MAX_ECHO`),
and so is the status as a whole: its message and details travel in the call's
trailers, and trailers past a client's metadata limit (8 KiB in grpc's clients)
would turn the answer into RESOURCE_EXHAUSTED, whatever it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

__all__ = [
    "Cancelled",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfMemory",
    "PermissionDenied",
    "ProtoserveError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "bounded",
    "to_rpc_status",
]

#: The ``domain`` of the ``google.rpc.ErrorInfo`` details protoserve sends (AIP-193).
ERROR_DOMAIN = "protoserve"

FieldViolation = tuple[str, str]
"""A bad request field: (dotted field path, what is wrong with it)."""

#: Characters of a client's text (a model name, a version) an error echoes at most.
MAX_ECHO = 128
#: UTF-8 bytes of an error's message at most. A message goes in the ``grpc-message``
#: trailer (percent-encoded: up to 3 KiB) and again in ``grpc-status-details-bin``.
MAX_MESSAGE_BYTES = 1024
#: Bytes of the serialized ``google.rpc.Status`` at most (base64 in the trailer: 4 KiB);
#: details that do not fit are left out, the last first.
MAX_STATUS_BYTES = 3072
#: Field violations one INVALID_ARGUMENT carries at most; their text is bounded too.
MAX_VIOLATIONS = 8


def bounded(text: str, limit: int = MAX_ECHO) -> str:
    """``text``, cut to ``limit`` characters with an ellipsis when longer: how an error
    echoes what a client sent."""
    return text if len(text) <= limit else text[:limit] + "…"


def _bounded_message(message: str) -> str:
    data = message.encode("utf-8", "surrogatepass")
    if len(data) <= MAX_MESSAGE_BYTES:
        return message
    # Cut on a character boundary, leaving room for the ellipsis (3 bytes).
    return data[: MAX_MESSAGE_BYTES - 3].decode("utf-8", "ignore") + "…"


class ProtoserveError(Exception):
    """Base of the errors a request can end with.

    Attributes:
        code: the gRPC status code the client receives.
        message: a message for people; it is sent to the client as is.
        details: ``google.rpc`` detail messages sent with the status.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, details: Sequence[Message] = ()) -> None:
        message = _bounded_message(message)
        super().__init__(message)
        self.message = message
        self.details: list[Message] = list(details)


class InvalidArgument(ProtoserveError):
    """The request is malformed; the field violations say which fields and why."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, violations: Sequence[FieldViolation] = ()) -> None:
        self.violations = list(violations)
        details: list[Message] = []
        if self.violations:
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=bounded(f), description=bounded(d, 2 * MAX_ECHO)
                        )
                        for f, d in self.violations[:MAX_VIOLATIONS]
                    ]
                )
            )
        super().__init__(message, details=details)

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        """One bad field; the message names it."""
        return cls(f"{field}: {description}", [(field, description)])


class NotFound(ProtoserveError):
    """The named thing (a model) does not exist."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, message: str, *, resource_type: str = "", resource_name: str = "") -> None:
        details: list[Message] = []
        if resource_name:
            details.append(
                error_details_pb2.ResourceInfo(
                    resource_type=resource_type, resource_name=bounded(resource_name)
                )
            )
        super().__init__(message, details=details)


class Unavailable(ProtoserveError):
    """The server or model cannot serve now (loading, failed, shutting down); retry later."""

    code = grpc.StatusCode.UNAVAILABLE


class Draining(Unavailable):
    """The server is shutting down and refused the call before any work on it: another
    server may take it. Answered without headers (Trailers-Only), which gRPC clients
    with a retry policy on UNAVAILABLE retry (docs/deploy.md, "Many servers")."""


class ResourceExhausted(ProtoserveError):
    """A bounded queue or limit is full; retry after ``retry_after`` seconds."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after * 1e9))
        super().__init__(message, details=[error_details_pb2.RetryInfo(retry_delay=delay)])


class OutOfMemory(ResourceExhausted):
    """The model's device ran out of memory for the batch this request was in: the model
    goes on serving with smaller batches (:class:`~protoserve.server.runtime.scheduler.
    Scheduler`); retry. ``ErrorInfo`` reason ``OUT_OF_MEMORY`` tells it from a full queue."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after=retry_after)
        self.details.append(_error_info("OUT_OF_MEMORY"))


class FailedPrecondition(ProtoserveError):
    """The request is valid but the server is not set up for it (no model repository,
    model control turned off); retrying will not help until the operator changes that."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(ProtoserveError):
    """The call carries no credential the server accepts (a missing or wrong bearer
    token); ``reason`` (an ``ErrorInfo``) says which, for machines."""

    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self, message: str, *, reason: str) -> None:
        self.reason = reason
        super().__init__(message, details=[_error_info(reason)])


class PermissionDenied(ProtoserveError):
    """The caller is known but may not do this (an inference token asking to unload a
    model); ``reason`` (an ``ErrorInfo``) says what it lacks."""

    code = grpc.StatusCode.PERMISSION_DENIED

    def __init__(self, message: str, *, reason: str) -> None:
        self.reason = reason
        super().__init__(message, details=[_error_info(reason)])


def _error_info(reason: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)


class Cancelled(ProtoserveError):
    """The work was cancelled before it finished."""

    code = grpc.StatusCode.CANCELLED


class Internal(ProtoserveError):
    """Model or server code failed; the message carries the request id, never a traceback."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        super().__init__(
            f"internal error; the server logged it with request id {request_id}",
            details=[error_details_pb2.RequestInfo(request_id=request_id)],
        )


def to_rpc_status(error: ProtoserveError) -> status_pb2.Status:
    """The ``google.rpc.Status`` a client receives for ``error``."""
    details = []
    for detail in error.details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        details.append(packed)
    code: int = error.code.value[0]
    assert code_pb2.Code.Name(code)  # the grpc and google.rpc enumerations agree
    status = status_pb2.Status(code=code, message=error.message, details=details)
    while status.ByteSize() > MAX_STATUS_BYTES and status.details:
        del status.details[-1]  # the message still says what went wrong
    return status
