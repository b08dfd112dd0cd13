"""Prometheus metrics for one gateway app, exposed at ``/metrics``.

Each app has its own ``CollectorRegistry``, so several gateways in one process
do not collide. Labels are bounded: the route is the binding's path template
(``/v1/models/{name}``), never the raw path; an unmatched request is
``<unmatched>``. Nothing here knows about inference (docs/architecture.md, rule 3).
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.requests import Request
from starlette.responses import Response

__all__ = ["UNMATCHED", "GatewayMetrics"]

#: The route label of a request that matched no binding.
UNMATCHED = "<unmatched>"
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    """The gateway's metrics, all in :attr:`registry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "protoserve_gateway_requests",
            "HTTP requests answered, by route template, HTTP method and status.",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "protoserve_gateway_request_duration_seconds",
            "Seconds until the response starts (for streams: until the first message).",
            ("route", "method"),
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.streams_in_flight = Gauge(
            "protoserve_gateway_streams_in_flight",
            "SSE and NDJSON streams being sent.",
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "protoserve_gateway_upstream_errors",
            "Calls to the upstream that ended with an error, by gRPC status code.",
            ("code",),
            registry=self.registry,
        )

    def observe(self, route: str, method: str, status: int, started: float) -> None:
        """Count one answered request that began at ``started`` (``time.perf_counter()``)."""
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route, method).observe(time.perf_counter() - started)

    async def endpoint(self, request: Request) -> Response:
        """The text exposition of every metric."""
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
