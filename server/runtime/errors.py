"""The errors a request ends with, each carrying its gRPC status code.

Status codes are the error vocabulary (docs/architecture.md, rule 4). A request
fails by raising one of these from the runtime (or a servicer); the call's frame
(:mod:`protoserve.server.calls`) turns it into a gRPC status with ``google.rpc``
details (AIP-193, :func:`to_rpc_status`): a message for people, typed details for
machines. Anything else raised while serving is an internal error: logged with its
traceback on the server, sent to the client only as INTERNAL with the request id.
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
    "ProtoserveError",
    "ResourceExhausted",
    "Unavailable",
    "to_rpc_status",
]

FieldViolation = tuple[str, str]
"""A bad request field: (dotted field path, what is wrong with it)."""


class ProtoserveError(Exception):
    """Base of the errors a request can end with.

    Attributes:
        code: the gRPC status code the client receives.
        message: a message for people; it is sent to the client as is.
        details: ``google.rpc`` detail messages sent with the status.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, details: Sequence[Message] = ()) -> None:
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
                        error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                        for f, d in self.violations
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
                    resource_type=resource_type, resource_name=resource_name
                )
            )
        super().__init__(message, details=details)


class Unavailable(ProtoserveError):
    """The server or model cannot serve now (loading, failed, shutting down); retry later."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ProtoserveError):
    """A bounded queue or limit is full; retry after ``retry_after`` seconds."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after * 1e9))
        super().__init__(message, details=[error_details_pb2.RetryInfo(retry_delay=delay)])


class FailedPrecondition(ProtoserveError):
    """The request is valid but the server is not set up for it (no model repository,
    model control turned off); retrying will not help until the operator changes that."""

    code = grpc.StatusCode.FAILED_PRECONDITION


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
    return status_pb2.Status(code=code, message=error.message, details=details)
