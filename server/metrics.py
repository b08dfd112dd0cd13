"""Prometheus metrics for one server: the metric objects and the ``/metrics`` HTTP endpoint.

Each :class:`Metrics` has its own ``CollectorRegistry``, not prometheus-client's
global one, so that several servers in one process (tests) do not collide.
Labels are bounded: a model name (only models the server was configured
with, or the repository's folders; never a version), a method name (of our
service) and a status code; never a request id.

The calls' frame (:mod:`protoserve.server.calls`) counts calls here; the runtime
counts model work through the :class:`~protoserve.server.runtime.meter.Meter`
interface, which :class:`Metrics` implements.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from protoserve.server.runtime.devices import (
    MemoryReader,
    UtilizationReader,
    cuda_memory,
    gpu_utilization,
)
from protoserve.server.runtime.meter import GenerationMeter, Meter

__all__ = ["Metrics", "MetricsEndpoint"]

#: Seconds; from sub-millisecond steps up to long generations.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_MODEL = ("model",)


class Metrics(Meter):
    """The server's metrics, all in :attr:`registry`.

    Args:
        memory: reads torch's CUDA memory per device for the ``protoserve_cuda_memory_*``
            gauges, at each scrape (:func:`~protoserve.server.runtime.devices.cuda_memory`,
            which reads none without CUDA).
    """

    def __init__(
        self,
        memory: MemoryReader = cuda_memory,
        utilization: UtilizationReader = gpu_utilization,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        counter = functools.partial(Counter, registry=self.registry)
        gauge = functools.partial(Gauge, registry=self.registry)
        histogram = functools.partial(Histogram, registry=self.registry)
        # Calls, counted by the calls' frame (called()).
        self._calls: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self.requests = counter(
            "protoserve_requests",
            "gRPC calls finished, by method and status code.",
            ("method", "code"),
        )
        self.request_seconds = histogram(
            "protoserve_request_duration_seconds",
            "Seconds from a call's start to its status (whole stream for streaming calls).",
            ("method",),
            buckets=_LATENCY_BUCKETS,
        )
        # Model work, counted by the runtime (the Meter methods below).
        self.queue_seconds = histogram(
            "protoserve_queue_duration_seconds",
            "Seconds a job waited in its model's queue before its first step.",
            _MODEL,
            buckets=_LATENCY_BUCKETS,
        )
        self.batch_size = histogram(
            "protoserve_batch_size",
            "Items per model call: texts per embed batch, rows per predict batch, "
            "sequences per decode step (generate).",
            ("model", "kind"),
            buckets=_BATCH_BUCKETS,
        )
        self.queue_depth = gauge(
            "protoserve_queue_depth", "Jobs waiting to start, per model.", _MODEL
        )
        self.streams_in_flight = gauge(
            "protoserve_streams_in_flight",
            "Generations (unary or streaming) under way, per model.",
            _MODEL,
        )
        self.tokens = counter("protoserve_generated_tokens", "Tokens generated, per model.", _MODEL)
        self.time_to_first_token = histogram(
            "protoserve_time_to_first_token_seconds",
            "Seconds from a generation's submission to its first token.",
            _MODEL,
            buckets=_LATENCY_BUCKETS,
        )
        self.inter_token_seconds = histogram(
            "protoserve_inter_token_latency_seconds",
            "Seconds between successive chunks of tokens of a generation.",
            _MODEL,
            buckets=_TOKEN_BUCKETS,
        )
        self.cancellations = counter(
            "protoserve_cancellations",
            "Generations that ended before finishing (client gone, or shutdown), per model.",
            _MODEL,
        )
        self.decoding = gauge(
            "protoserve_model_decoding",
            "1 for how the served version of a model decodes its generations: batched "
            "(to float rounding), batched-exact (bit for bit, --batch-invariant) or "
            "sequential (one sequence at a time); 0 for the others, and for all of them "
            "while no version that generates text is served.",
            ("model", "decoding"),
        )
        self.rejections = counter(
            "protoserve_rejections",
            "Requests refused with RESOURCE_EXHAUSTED because the model was at capacity.",
            _MODEL,
        )
        self.instance_requests = counter(
            "protoserve_instance_requests",
            "Requests sent to each instance of a model that runs several (instances = N).",
            ("model", "instance"),
        )
        # Where models run, and torch's memory per CUDA device: read at each scrape.
        self.devices = _Devices(memory, utilization)
        self.registry.register(self.devices)

    def called(self, method: str, code: str, seconds: float) -> None:
        """A call of ``method`` ended with ``code`` after ``seconds`` (the calls' frame).

        Its series are looked up once per method and code (both bounded), not per call.
        """
        series = self._calls.get((method, code))
        if series is None:
            series = self._calls[method, code] = (
                self.requests.labels(method, code),
                self.request_seconds.labels(method),
            )
        series[0].inc()
        series[1].observe(seconds)

    def add_model(
        self,
        name: str,
        depth: Callable[[], int],
        decoding: Callable[[], str | None],
        decodings: Iterable[str],
    ) -> None:
        """Export a model's series at zero from the start (:meth:`Meter.add_model`).

        Safe to call again for a name (a model reloaded from the repository): the
        series stay as they are, and the readers replace those before.
        """
        self.queue_depth.labels(name).set_function(depth)
        for value in decodings:
            self.decoding.labels(name, value).set_function(_is(decoding, value))
        self.streams_in_flight.labels(name)
        for counter in (self.tokens, self.cancellations, self.rejections):
            counter.labels(name)

    def add_placement(self, name: str, placement: Callable[[], tuple[str, str] | None]) -> None:
        self.devices.placements[name] = placement

    def queued(self, model: str, seconds: float) -> None:
        self.queue_seconds.labels(model).observe(seconds)

    def batched(self, model: str, kind: str, size: int) -> None:
        self.batch_size.labels(model, kind).observe(size)

    def rejected(self, model: str) -> None:
        self.rejections.labels(model).inc()

    def instance_used(self, model: str, instance: int) -> None:
        self.instance_requests.labels(model, str(instance)).inc()

    def generation(self, model: str, submitted: float) -> GenerationMeter:
        return _GenerationSeries(self, model, submitted)


class _GenerationSeries(GenerationMeter):
    """One generation's series: in flight until it ends, tokens, time to first token,
    inter-token latency, and a cancellation when it ended early."""

    def __init__(self, metrics: Metrics, model: str, submitted: float) -> None:
        # The labelled series, looked up once: tokens() runs for every chunk.
        self._in_flight = metrics.streams_in_flight.labels(model)
        self._tokens = metrics.tokens.labels(model)
        self._first = metrics.time_to_first_token.labels(model)
        self._gaps = metrics.inter_token_seconds.labels(model)
        self._cancellations = metrics.cancellations.labels(model)
        self._last = submitted
        self._started = False
        self._in_flight.inc()

    def tokens(self, count: int) -> None:
        now = time.perf_counter()
        self._tokens.inc(count)
        (self._gaps if self._started else self._first).observe(now - self._last)
        self._started, self._last = True, now

    def end(self, cancelled: bool) -> None:
        self._in_flight.dec()
        if cancelled:
            self._cancellations.inc()


class _Devices(Collector):
    """``protoserve_model_device`` (an info gauge: one series per served model, 1, its
    device and dtype as labels) and torch's CUDA memory per device, read when scraped.
    The labels are bounded: the models, and this machine's devices."""

    def __init__(self, memory: MemoryReader, utilization: UtilizationReader) -> None:
        #: Per model name, what reads ``(device, dtype)`` of its served version.
        self.placements: dict[str, Callable[[], tuple[str, str] | None]] = {}
        self._memory = memory
        self._utilization = utilization

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info, allocated, reserved, busy = self._families()
        for name, read in list(self.placements.items()):
            found = read()
            if found is not None:
                info.add_metric([name, *found], 1.0)
        yield info
        rows = self._memory()
        if rows:  # absent without CUDA
            for device, used, held in rows:
                allocated.add_metric([device], float(used))
                reserved.add_metric([device], float(held))
            yield allocated
            yield reserved
        shares = self._utilization()
        if shares:  # absent without nvidia-ml-py, CUDA, or an NVML that answers
            for device, share in shares:
                busy.add_metric([device], share)
            yield busy

    @staticmethod
    def _families() -> tuple[
        GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily
    ]:
        return (
            GaugeMetricFamily(
                "protoserve_model_device",
                "1 for each served model, labelled with the device it runs on (cpu, "
                "cuda:N) and the dtype it computes in; absent while none of its versions "
                "is ready.",
                labels=("model", "device", "dtype"),
            ),
            GaugeMetricFamily(
                "protoserve_cuda_memory_allocated_bytes",
                "Bytes of CUDA memory torch's allocator holds in tensors now, per device; "
                "absent without CUDA.",
                labels=("device",),
            ),
            GaugeMetricFamily(
                "protoserve_cuda_memory_reserved_bytes",
                "Bytes of CUDA memory torch's caching allocator has reserved now (in "
                "tensors or cached for reuse), per device; absent without CUDA.",
                labels=("device",),
            ),
            GaugeMetricFamily(
                "protoserve_gpu_utilization_ratio",
                "Share of NVML's last sample period in which a kernel ran on the GPU (0 to "
                "1), per device; absent without nvidia-ml-py (protoserve[gpu]) or CUDA.",
                labels=("device",),
            ),
        )


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
