"""Prometheus metrics for one server: the metric objects and the ``/metrics`` HTTP endpoint.

Each :class:`Metrics` has its own ``CollectorRegistry``, not prometheus-client's
global one, so that several servers in one process (tests) do not collide.
Labels are bounded: a model name (only models the server was configured
with, or the repository's folders; never a version), a method name (of our
service) and a status code; never a request id.

The runtime uses this module too, so it stays transport-independent: nothing
here imports grpc; status codes arrive as their names.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["Metrics", "MetricsEndpoint"]

#: Seconds; from sub-millisecond steps up to long generations.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """The server's metrics, all in :attr:`registry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "protoserve_requests",
            "gRPC calls finished, by method and status code.",
            ("method", "code"),
            registry=r,
        )
        self.request_seconds = Histogram(
            "protoserve_request_duration_seconds",
            "Seconds from a call's start to its status (whole stream for streaming calls).",
            ("method",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "protoserve_queue_duration_seconds",
            "Seconds a job waited in its model's queue before its first step.",
            ("model",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "protoserve_batch_size",
            "Items per model call: texts per embed batch, rows per predict batch, "
            "sequences per decode step (generate).",
            ("model", "kind"),
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "protoserve_queue_depth",
            "Jobs waiting to start, per model.",
            ("model",),
            registry=r,
        )
        self.streams_in_flight = Gauge(
            "protoserve_streams_in_flight",
            "Generations (unary or streaming) under way, per model.",
            ("model",),
            registry=r,
        )
        self.tokens = Counter(
            "protoserve_generated_tokens",
            "Tokens generated, per model.",
            ("model",),
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "protoserve_time_to_first_token_seconds",
            "Seconds from a generation's submission to its first token.",
            ("model",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_seconds = Histogram(
            "protoserve_inter_token_latency_seconds",
            "Seconds between successive chunks of tokens of a generation.",
            ("model",),
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.cancellations = Counter(
            "protoserve_cancellations",
            "Generations that ended before finishing (client gone, or shutdown), per model.",
            ("model",),
            registry=r,
        )
        self.decoding = Gauge(
            "protoserve_model_decoding",
            "1 for how the served version of a model decodes its generations: batched "
            "(to float rounding), batched-exact (bit for bit, --batch-invariant) or "
            "sequential (one sequence at a time); 0 for the others, and for all of them "
            "while no version that generates text is served.",
            ("model", "decoding"),
            registry=r,
        )
        self.rejections = Counter(
            "protoserve_rejections",
            "Requests refused with RESOURCE_EXHAUSTED because the model was at capacity.",
            ("model",),
            registry=r,
        )

    def add_model(
        self,
        name: str,
        depth: Callable[[], int],
        decoding: Callable[[], str | None],
        decodings: Iterable[str],
    ) -> None:
        """Export a model's series at zero from the start; ``depth`` reads its queue depth,
        ``decoding`` how its served version decodes (one of ``decodings``, or None).

        Safe to call again for a name (a model reloaded from the repository): the
        series stay as they are, and the readers replace those before.
        """
        self.queue_depth.labels(name).set_function(depth)
        for value in decodings:
            self.decoding.labels(name, value).set_function(_is(decoding, value))
        self.streams_in_flight.labels(name)
        for counter in (self.tokens, self.cancellations, self.rejections):
            counter.labels(name)


def _is(read: Callable[[], str | None], value: str) -> Callable[[], float]:
    """1.0 while ``read()`` gives ``value``, else 0.0: one labelled series of an enum."""
    return lambda: 1.0 if read() == value else 0.0


class MetricsEndpoint:
    """prometheus-client's HTTP server (a daemon thread) serving ``/metrics``.

    Args:
        registry: what to expose.
        host: address to listen on.
        port: port to listen on; 0 picks a free one (see :attr:`port`).
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, host, registry=registry)
        self.port: int = self._server.server_address[1]

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
