"""protoserve.clients: call a model the same way wherever it runs.

``Client`` / ``AsyncClient`` speak gRPC, ``HttpClient`` / ``AsyncHttpClient``
go through the gateway, ``LocalClient`` runs the model in this process. All
share their methods (``models``, ``generate``, ``generate_stream``, ``embed``,
``predict``), return types and exceptions, so moving a model behind the network
changes only the line that builds the client.

Inside, the remote clients' methods are written once, blocking and asyncio
(``_api.py``), over a transport that only moves messages: gRPC (``_grpc.py``,
``_grpc_aio.py``) or the gateway's HTTP (``_http.py``, ``_http_aio.py``, on the
routes of the API's ``google.api.http`` rules, ``_routes.py``). Messages become
Python values in ``_convert.py``; every stream is a ``_stream.py`` class over
its transport's source.
"""

from __future__ import annotations

from protoserve.clients._errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ProtoserveError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)
from protoserve.clients._grpc import Client
from protoserve.clients._grpc_aio import AsyncClient
from protoserve.clients._http import HttpClient
from protoserve.clients._http_aio import AsyncHttpClient
from protoserve.clients._local import LocalClient, LocalTextStream
from protoserve.clients._stream import AsyncTextStream, TextStream
from protoserve.clients._types import FinishReason, Generation, ModelInfo, ParameterInfo, Usage

__all__ = [
    "Aborted",
    "AlreadyExists",
    "AsyncClient",
    "AsyncHttpClient",
    "AsyncTextStream",
    "Cancelled",
    "Client",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "FinishReason",
    "Generation",
    "HttpClient",
    "Internal",
    "InvalidArgument",
    "LocalClient",
    "LocalTextStream",
    "ModelInfo",
    "NotFound",
    "OutOfRange",
    "ParameterInfo",
    "PermissionDenied",
    "ProtoserveError",
    "ResourceExhausted",
    "TextStream",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "Usage",
]
