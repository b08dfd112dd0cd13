"""``inference.GRPCInferenceService``: the Open Inference Protocol over the same runtime.

Thin like the v1 servicer (docs/architecture.md, rule 7), and in the same call frame
(:func:`protoserve.server.calls.unary`): request ids, access lines, metrics
labelled with the RPC's name, and runtime errors as the same statuses with the
same ``google.rpc`` details.

A worker of ``protoserve serve --workers`` applies a client's RepositoryModelLoad
and RepositoryModelUnload, then has its sibling workers apply it too
(:mod:`protoserve.server.siblings`); a sibling's own call it applies only.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from protoserve.oip.v2 import grpc_service_pb2 as pb
from protoserve.oip.v2 import grpc_service_pb2_grpc as pb_grpc
from protoserve.server.calls import add_service, unary
from protoserve.server.metrics import Metrics
from protoserve.server.oip.infer import infer
from protoserve.server.oip.signatures import model_config, model_metadata
from protoserve.server.runtime.core import Runtime
from protoserve.server.runtime.errors import InvalidArgument, NotFound, bounded
from protoserve.server.siblings import Siblings

__all__ = ["EXTENSIONS", "SERVICE_NAME", "OpenInferenceServicer", "add_to_server"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
#: The protocol extensions ServerMetadata announces.
EXTENSIONS = ("model_repository", "model_configuration", "parameters")
SERVER_NAME = "protoserve"

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]


@dataclass(frozen=True)
class _Caller:
    """What a model control call's method needs of its call, which ``@unary`` does not
    hand it: whether a sibling worker made it, and the client's deadline
    (``time.monotonic()`` seconds; None: none)."""

    sibling: bool
    deadline: float | None


_CALLER: contextvars.ContextVar[_Caller | None] = contextvars.ContextVar(
    "protoserve_oip_caller", default=None
)


def _with_caller(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """``handler`` with its :class:`_Caller` in :data:`_CALLER` while it runs; read from
    the context here, while the call is surely live."""

    async def with_caller(
        self: OpenInferenceServicer, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        remaining = context.time_remaining()
        caller = _Caller(
            sibling=self.siblings is not None and self.siblings.vouches_for(context),
            deadline=None if remaining is None else time.monotonic() + remaining,
        )
        token = _CALLER.set(caller)
        try:
            return await handler(self, request, context)
        finally:
            _CALLER.reset(token)

    with_caller.__name__ = handler.__name__
    return with_caller


def _server_version() -> str:
    try:
        return metadata.version("protoserve")
    except metadata.PackageNotFoundError:  # running from a checkout that is not installed
        return "unknown"


def add_to_server(servicer: OpenInferenceServicer, server: grpc.aio.Server) -> None:
    """Register every method of the service, from its descriptor, with lenient parsing."""
    add_service(servicer, server, pb.DESCRIPTOR.services_by_name["GRPCInferenceService"])


def _repository(name: str) -> None:
    """The server has one repository, named ""; any other name is NOT_FOUND."""
    if name:
        raise NotFound(
            f'repository {bounded(name)!r} not found; the server has one, named ""',
            resource_type="repository",
            resource_name=name,
        )


def _model_name(name: str, field: str = "model_name") -> str:
    if not name:
        raise InvalidArgument.field(field, "must name a model")
    return name


#: Unload parameters protoserve understands: Triton's ``unload_dependents`` (tritonclient
#: always sends it) needs no work, since protoserve has no models that depend on others.
_UNLOAD_PARAMETERS = {"unload_dependents": "bool_param"}


def _no_parameters(
    parameters: Mapping[str, pb.ModelRepositoryParameter], allowed: Mapping[str, str] | None = None
) -> None:
    allowed = allowed or {}
    for name, kind in allowed.items():
        if name in parameters and parameters[name].WhichOneof("parameter_choice") != kind:
            raise InvalidArgument.field(f"parameters.{name}", "must be a bool")
    names = sorted(set(parameters) - set(allowed))
    if names:
        raise InvalidArgument(
            f"load and unload parameters are not supported: {', '.join(names)}",
            [(f"parameters.{name}", "is not supported") for name in names],
        )


class OpenInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol face of a :class:`Runtime`."""

    def __init__(
        self, runtime: Runtime, *, metrics: Metrics | None = None, siblings: Siblings | None = None
    ) -> None:
        self.runtime = runtime
        self.metrics = metrics
        #: The other workers of --workers, or None for a server that is the only one.
        self.siblings = siblings
        self._version = _server_version()

    @unary
    async def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @unary
    async def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.runtime.ready)

    @unary
    async def ModelReady(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        # An unknown model is not ready, not an error: the protocol's health semantics.
        return pb.ModelReadyResponse(ready=self.runtime.model_ready(request.name, request.version))

    @unary
    async def ServerMetadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self._version, extensions=list(EXTENSIONS)
        )

    @unary
    async def ModelMetadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        entry = self.runtime.get_model(_model_name(request.name, "name"), request.version)
        versions = tuple(self.runtime.versions(entry.name))
        # Built once per state of the version (ModelEntry.described), and shared.
        return entry.described(
            "oip.ModelMetadata", lambda e: model_metadata(e, versions), extra=versions
        )

    @unary
    async def ModelConfig(self, request: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
        entry = self.runtime.get_model(_model_name(request.name, "name"), request.version)
        return pb.ModelConfigResponse(config=model_config(entry))

    @unary
    async def ModelInfer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        return await infer(self.runtime, request)

    @unary
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest
    ) -> pb.RepositoryIndexResponse:
        _repository(request.repository_name)
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version, state=e.state, reason=e.reason
                )
                for e in self.runtime.repository_index(request.ready)
            ]
        )

    @_with_caller
    @unary
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest
    ) -> pb.RepositoryModelLoadResponse:
        _repository(request.repository_name)
        _no_parameters(request.parameters)
        name = _model_name(request.model_name)
        await self._everywhere(
            lambda: self.runtime.load_model(name), "RepositoryModelLoad", request
        )
        return pb.RepositoryModelLoadResponse()

    @_with_caller
    @unary
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest
    ) -> pb.RepositoryModelUnloadResponse:
        _repository(request.repository_name)
        _no_parameters(request.parameters, _UNLOAD_PARAMETERS)
        name = _model_name(request.model_name)
        await self._everywhere(
            lambda: self.runtime.unload_model(name), "RepositoryModelUnload", request
        )
        return pb.RepositoryModelUnloadResponse()

    async def _everywhere(
        self, apply: Callable[[], Awaitable[None]], method: str, request: Message
    ) -> None:
        """``apply`` here; a client's call then on every sibling worker too, a sibling's
        not again (:meth:`Siblings.everywhere`)."""
        caller = _CALLER.get()
        if self.siblings is None or caller is None or caller.sibling:
            await apply()
            return
        await self.siblings.everywhere(apply, method, request, caller.deadline)
