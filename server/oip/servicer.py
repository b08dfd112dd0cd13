"""``inference.GRPCInferenceService``: the Open Inference Protocol over the same runtime.

Thin like the v1 servicer (docs/architecture.md, rule 7), and in the same call frame
(:func:`protoserve.server.calls.unary`): request ids, access lines, metrics
labelled with the RPC's name, and runtime errors as the same statuses with the
same ``google.rpc`` details.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata

import grpc

from protoserve.oip.v2 import grpc_service_pb2 as pb
from protoserve.oip.v2 import grpc_service_pb2_grpc as pb_grpc
from protoserve.server.calls import add_service, unary
from protoserve.server.metrics import Metrics
from protoserve.server.oip.infer import infer
from protoserve.server.oip.signatures import model_config, model_metadata
from protoserve.server.runtime.core import Runtime
from protoserve.server.runtime.errors import InvalidArgument, NotFound, bounded

__all__ = ["EXTENSIONS", "SERVICE_NAME", "OpenInferenceServicer", "add_to_server"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
#: The protocol extensions ServerMetadata announces.
EXTENSIONS = ("model_repository", "model_configuration", "parameters")
SERVER_NAME = "protoserve"


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

    def __init__(self, runtime: Runtime, *, metrics: Metrics | None = None) -> None:
        self.runtime = runtime
        self.metrics = metrics
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
        return model_metadata(entry, self.runtime.versions(entry.name))

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

    @unary
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest
    ) -> pb.RepositoryModelLoadResponse:
        _repository(request.repository_name)
        _no_parameters(request.parameters)
        await self.runtime.load_model(_model_name(request.model_name))
        return pb.RepositoryModelLoadResponse()

    @unary
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest
    ) -> pb.RepositoryModelUnloadResponse:
        _repository(request.repository_name)
        _no_parameters(request.parameters, _UNLOAD_PARAMETERS)
        await self.runtime.unload_model(_model_name(request.model_name))
        return pb.RepositoryModelUnloadResponse()
