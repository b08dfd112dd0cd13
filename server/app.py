"""Assembling the gRPC server: inference, health, reflection, limits, graceful shutdown.

Shutdown (SIGTERM or SIGINT) goes in this order, so that load balancers and
clients see it coming and no call ends without a status:

1. Health turns NOT_SERVING for every service but ``liveness``; Health and
   reflection keep answering. Inference calls that arrive from now on get
   UNAVAILABLE before any header (Trailers-Only), which a client's retry policy
   may send to another server; those that arrived before are served.
2. Calls in flight get ``shutdown_grace`` seconds to finish. Shortly before the
   grace runs out, generations still going are ended at their next step with
   ``FINISH_REASON_CANCELLED`` (an orderly last message, status OK). Then, still
   within the grace, the server waits until no call has arrived for a quarter
   second (a second at most): clients watching health have gone elsewhere.
3. The gRPC server stops and the process exits 0. A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.server.auth import Auth, AuthInterceptor, warn_if_exposed
from protoserve.server.config import ServerConfig
from protoserve.server.health import HealthServicer
from protoserve.server.metrics import Metrics, MetricsEndpoint
from protoserve.server.oip import SERVICE_NAME as OIP_SERVICE
from protoserve.server.oip import OpenInferenceServicer
from protoserve.server.oip import add_to_server as add_oip_to_server
from protoserve.server.openai import SERVICE_NAME as OPENAI_SERVICE
from protoserve.server.openai import OpenAIServicer
from protoserve.server.openai import add_to_server as add_openai_to_server
from protoserve.server.reflection import enable_reflection
from protoserve.server.runtime.core import Runtime
from protoserve.server.runtime.model import Model
from protoserve.server.servicer import InferenceServicer, add_to_server
from protoserve.server.siblings import Siblings
from protoserve.server.tls import server_credentials
from protoserve.server.transport import WholeRequest, transport_options

__all__ = ["InferenceServer", "model_health_name"]

log = logging.getLogger("protoserve.server")

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name


def model_health_name(model: str) -> str:
    """The Health service name that reports one model: ``models/NAME``."""
    return f"models/{model}"


#: Seconds before the end of the grace period at which generations are ended.
_STOP_MARGIN = 1.0
#: Seconds without a new call that end a drain once nothing is in flight ...
_QUIET = 0.25
#: ... waited for this long at most.
_QUIET_MOST = 1.0


class InferenceServer:
    """A running gRPC server around a :class:`Runtime`.

    Use ``await InferenceServer.create(config)`` then ``await server.start()``;
    ``port`` is the port actually bound (useful with port 0); ``metrics_port``
    likewise for the ``/metrics`` endpoint once started (None when it is off).
    """

    def __init__(
        self,
        config: ServerConfig,
        models: Sequence[tuple[str, Model]],
        *,
        auth: Auth | None = None,
    ) -> None:
        self.config = config
        #: Who may call what: ``auth``, or what the config's token files say (read
        #: here: :class:`~protoserve.server.auth.TokenFileError` if they cannot be used).
        self.auth = Auth.from_config(config) if auth is None else auth
        if config.torch_threads is not None:
            import torch  # the runtime imports it anyway

            torch.set_num_threads(max(1, config.torch_threads))
        # grpcio's asyncio health servicer, with List answered (server/health.py).
        self.health = HealthServicer()
        # Counted always (cheap); exposed over HTTP only with ``metrics_port``.
        self.metrics = Metrics()
        self._metrics_endpoint: MetricsEndpoint | None = None
        self.metrics_port: int | None = None
        self.runtime = Runtime(
            models,
            max_queue=config.max_queue,
            max_active=config.max_active,
            batching=config.batching,
            batch_invariant=config.batch_invariant,
            max_batch_size=config.max_batch_size,
            max_batch_delay=(
                None if config.max_batch_delay_ms is None else config.max_batch_delay_ms / 1000
            ),
            max_streams=config.max_streams,
            on_change=self._update_health,
            metrics=self.metrics,
            repository=config.model_repository,
            model_control=config.model_control_on,
            # An unloaded model's calls in flight get the grace a shutdown gives them.
            unload_grace=config.shutdown_grace,
            device=config.device,
            dtype=config.dtype,
            instances=config.instances,
        )
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_receive_message_bytes),
                ("grpc.max_send_message_length", config.max_send_message_bytes),
                # Only a worker of --workers shares its port (common/workers.py): a lone
                # server started on a taken port fails rather than splitting its calls.
                ("grpc.so_reuseport", 0 if config.worker_index is None else 1),
                # Streams per connection, keepalive (server/transport.py, docs/adr/0017).
                *transport_options(config),
            ],
            interceptors=[
                # First, so that every handler below it, a refusal too, reads its request
                # whole or answers: grpcio's own reading leaves such calls open (ADR 17).
                WholeRequest(config.request_read_timeout, self.metrics, self.runtime),
                # One check for every call of every service (docs/adr/0016).
                *([AuthInterceptor(self.auth, self.metrics)] if self.auth.intercepts else []),
            ],
        )
        add_to_server(InferenceServicer(self.runtime, metrics=self.metrics), self.server)
        #: The other workers of --workers, which load and unload what this one does.
        self.siblings = Siblings.from_config(config)
        add_oip_to_server(
            OpenInferenceServicer(self.runtime, metrics=self.metrics, siblings=self.siblings),
            self.server,
        )
        add_openai_to_server(OpenAIServicer(self.runtime, metrics=self.metrics), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if config.reflection:  # --no-reflection: the schema is not served
            enable_reflection(
                self.server,
                (
                    INFERENCE_SERVICE,
                    OIP_SERVICE,
                    OPENAI_SERVICE,
                    health.SERVICE_NAME,
                    reflection.SERVICE_NAME,
                ),
            )
        address = f"{config.host}:{config.port}"
        try:
            # TLS files are checked here (TLSFileError), before anything listens.
            credentials = server_credentials(config)
            self.port = (
                self.server.add_insecure_port(address)
                if credentials is None
                else self.server.add_secure_port(address, credentials)
            )
        except RuntimeError as exc:  # grpc's way of saying the bind failed
            raise OSError(f"cannot listen on {address} (in use, or not an address here)") from exc
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        if config.worker_socket:  # for the sibling workers of --workers (server/siblings.py)
            try:
                self.server.add_insecure_port("unix:" + config.worker_socket)
            except RuntimeError as exc:
                raise OSError(f"cannot listen on the worker socket {config.worker_socket}") from exc
        self._health_updates: set[asyncio.Task[None]] = set()

    def _update_health(self) -> None:
        """Health per model (``models/NAME``) and for the whole server ("" and the service)."""
        statuses = {
            service: self.runtime.ready
            for service in ("", INFERENCE_SERVICE, OIP_SERVICE, OPENAI_SERVICE)
        }
        # Every model ever known, so that one unloaded (or failed in the repository)
        # turns NOT_SERVING rather than keeping its last status.
        for name in self.runtime.known_models():
            statuses[model_health_name(name)] = self.runtime.model_ready(name)
        loop = asyncio.get_running_loop()
        for service, ready in statuses.items():
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if ready
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            # set() is a coroutine on the aio servicer; it only records and notifies.
            task = loop.create_task(self.health.set(service, status))
            self._health_updates.add(task)  # held until done: the loop keeps weak references
            task.add_done_callback(self._health_updates.discard)

    async def start(self) -> None:
        """Listen, then load the models; health turns SERVING once all are ready
        (models of the repository that fail to load do not count: see Runtime)."""
        self._update_health()
        await self.server.start()
        log.info(
            "serving gRPC%s on %s:%d",
            " over mTLS" if self.config.client_ca else " over TLS" if self.config.certfile else "",
            self.config.host,
            self.port,
        )
        warn_if_exposed(
            self.config.host,
            self.auth,
            model_control=self.config.model_control_on and bool(self.config.model_repository),
        )
        if self.config.metrics_port is not None:
            host = self.config.host.strip("[]")  # "[::]" is gRPC's spelling
            self._metrics_endpoint = MetricsEndpoint(
                self.metrics.registry, host, self.config.metrics_port
            )
            self.metrics_port = self._metrics_endpoint.port
            log.info("serving metrics on http://%s:%d/metrics", host, self.metrics_port)
        # A worker of --workers that starts while its siblings serve matches them.
        siblings = self._siblings_to_match()
        await self.runtime.start(
            leave_out=await siblings.left_out() if siblings else frozenset(),
            then=(lambda: siblings.catch_up(self.runtime)) if siblings else None,
        )
        if self.config.port_file:
            Path(self.config.port_file).write_text(f"{self.port}\n")  # noqa: ASYNC240 - once, tiny

    def _siblings_to_match(self) -> Siblings | None:
        """The siblings whose repository models this worker must serve too; None without
        siblings, or with model control off (then nothing changes once they started)."""
        config = self.config
        if config.model_repository and config.model_control_on:
            return self.siblings
        return None

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop, as the module docstring describes."""
        grace = self.config.shutdown_grace if grace is None else grace
        log.info("shutting down: %d calls in flight, %.1fs grace", self.runtime.in_flight, grace)
        deadline = time.monotonic() + grace
        await self.health.enter_graceful_shutdown()
        self.runtime.begin_drain()
        if not await self.runtime.wait_idle(max(grace - _STOP_MARGIN, 0.0)):
            log.info("grace nearly over: ending %d calls", self.runtime.in_flight)
            self.runtime.stop_generations()
            await self.runtime.wait_idle(min(_STOP_MARGIN, grace))
        # Clients watching health (a gateway) stop sending within a round trip; until
        # then late calls are refused, to be retried elsewhere. grpc's stop would
        # cancel them instead: it waits until none came for a moment, for a second at
        # most (clients that do not watch health would keep it waiting; they reconnect).
        left = max(0.0, deadline - time.monotonic())
        await self.runtime.wait_unasked(_QUIET, min(_QUIET_MOST, left))
        await self.server.stop(0.5)
        self.runtime.close()
        self._close_metrics()
        log.info("stopped")

    def _close_metrics(self) -> None:
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.close()
            self._metrics_endpoint = None

    async def serve_until_signal(self) -> None:
        """Start, serve until SIGTERM or SIGINT, drain, stop."""
        loop = asyncio.get_running_loop()
        signalled = asyncio.Event()
        hurry = asyncio.Event()

        def on_signal(signum: int) -> None:
            if signalled.is_set():
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                hurry.set()
            else:
                log.info("%s received", signal.Signals(signum).name)
                signalled.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        await self.start()
        await signalled.wait()
        stopping = asyncio.create_task(self.stop())
        hurried = asyncio.create_task(hurry.wait())
        await asyncio.wait({stopping, hurried}, return_when=asyncio.FIRST_COMPLETED)
        if not stopping.done():
            stopping.cancel()
            await self.server.stop(0)
            self.runtime.close()
            self._close_metrics()
        hurried.cancel()
