"""The server's Health service: grpcio-health-checking's, with ``List`` answered and
a liveness name.

``liveness`` (:data:`LIVENESS`) is SERVING from the start until the process ends, a
drain included: a liveness probe asks it, where asking ``""`` (NOT_SERVING while
models load and while draining) would get a draining or reloading server killed.

grpc.health.v1 added ``List`` (every service's status in one call); grpcio's
asyncio servicer (1.85) leaves it to the generated base class, which answers
UNIMPLEMENTED "Unexpected <class 'NotImplementedError'>". The gateway's OpenAPI
document lists every method of the services it serves, ``List`` included, so it
is answered here, from the statuses ``Check`` and ``Watch`` read.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

__all__ = ["LIVENESS", "MAX_LISTED", "HealthServicer"]

#: The health name that stays SERVING while the process runs, a drain included.
LIVENESS = "liveness"

#: Services ``List`` answers at most; past it, RESOURCE_EXHAUSTED, as health.proto says.
#: The server has one per model plus three: a repository of thousands of models would
#: make an answer no prober wants.
MAX_LISTED = 4096


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc,name-defined]
    """grpcio's asyncio Health servicer, plus ``List`` and :data:`LIVENESS`."""

    _gracefully_shutting_down: bool  # grpcio's, set in its __init__

    def __init__(self) -> None:
        super().__init__()
        self._server_status[LIVENESS] = health_pb2.HealthCheckResponse.SERVING

    async def enter_graceful_shutdown(self) -> None:
        """Every status but :data:`LIVENESS` turns NOT_SERVING for good (grpcio's, which
        would turn that one too)."""
        if self._gracefully_shutting_down:
            return
        self._gracefully_shutting_down = True
        for service in list(self._server_status):
            if service != LIVENESS:
                await self._set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        """Every service's status: ``""`` (the server), each service, ``models/NAME``."""
        statuses: dict[str, int] = dict(self._server_status)
        if len(statuses) > MAX_LISTED:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(statuses)} services; List answers at most {MAX_LISTED}: ask Check for one",
            )
        return health_pb2.HealthListResponse(
            statuses={
                service: health_pb2.HealthCheckResponse(status=status)
                for service, status in statuses.items()
            }
        )
