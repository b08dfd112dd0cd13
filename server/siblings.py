"""The workers of ``protoserve serve --workers N``: one model repository, kept alike on each.

Each worker holds its own copy of the models, and the kernel hands each client
connection to one of them, so a RepositoryModelLoad or RepositoryModelUnload
reaches one worker only. That worker applies it, then forwards the same request to
every sibling over the sibling's private unix socket (``worker_socket``), with
the supervisor's secret in :data:`SIBLING_HEADER`; a sibling applies a call so
vouched for and forwards it no further. The client's call returns OK once every
worker has the change; otherwise it fails naming the workers that do not
(:class:`SiblingsFailed`). A worker that starts while its siblings run catches
up with one of them (:meth:`Siblings.catch_up`).

docs/model-repository.md ("With --workers") says what a caller sees, partial
failures included; docs/security.md what the secret and the socket protect.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
from google.protobuf.message import Message

from protoserve.common.logs import REQUEST_ID
from protoserve.oip.v2 import grpc_service_pb2 as pb
from protoserve.oip.v2 import grpc_service_pb2_grpc as pb_grpc
from protoserve.server.config import ServerConfig
from protoserve.server.runtime.core import Runtime
from protoserve.server.runtime.errors import ProtoserveError, bounded
from protoserve.server.runtime.registry import NOT_LOADED, READY, UNLOADED

__all__ = [
    "SIBLING_HEADER",
    "Siblings",
    "SiblingsFailed",
    "over_unix_socket",
    "secret_matches",
    "sent_secret",
]

log = logging.getLogger("protoserve.server")

#: The metadata a sibling worker's call carries its supervisor's secret in.
SIBLING_HEADER = "x-protoserve-sibling"
#: Seconds a forwarded call gets at least, when the client's deadline is (nearly)
#: over: once a sibling has the call it finishes the change whatever becomes of the
#: call, so delivering it keeps the workers alike even for a client that gave up.
MIN_FORWARD_SECONDS = 2.0
#: Seconds a starting worker waits for a sibling's RepositoryIndex.
INDEX_SECONDS = 5.0
#: Why a model is not served that says it was meant so (it was unloaded, or never
#: loaded since that worker's start), not that it failed: a catching-up worker
#: unloads such a model, where it keeps one that failed elsewhere.
_LEFT_OUT = frozenset({UNLOADED, NOT_LOADED})


def sent_secret(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The value of the call's first :data:`SIBLING_HEADER`, None when it has none."""
    value = next((v for k, v in metadata or () if k == SIBLING_HEADER), None)
    return value if isinstance(value, str) else None


def secret_matches(given: str, secret: str | None) -> bool:
    """Whether ``given`` is ``secret``, compared in constant time; never with no secret."""
    if not secret or not given.isascii():
        return False
    return hmac.compare_digest(given.encode("ascii"), secret.encode("ascii"))


def over_unix_socket(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Whether the call came in on a unix socket (the worker socket: grpc's peer
    ``unix:...``), not over TCP."""
    return context.peer().startswith("unix:")


class SiblingsFailed(ProtoserveError):
    """A change made here that some sibling workers do not have. Its code is the first
    failure's, or UNAVAILABLE when a sibling could not be reached; its message names
    each worker that failed and why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass(frozen=True)
class _Failure:
    """One sibling that does not have the change: its name, the status, and whether
    it answered at all (False: its socket could not be reached)."""

    worker: str
    code: grpc.StatusCode
    reason: str
    reached: bool


class Siblings:
    """The other workers of this worker's supervisor, reached over their unix sockets.

    A channel is opened per call and closed after it: control calls are rare, and a
    long-lived channel to a sibling that restarted would sit in grpc's reconnect
    back-off, refusing calls for a while after the sibling is back.
    """

    def __init__(self, sockets: Sequence[str], secret: str) -> None:
        self.sockets = tuple(sockets)
        self._secret = secret
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_config(cls, config: ServerConfig) -> Siblings | None:
        """The siblings ``config`` names; None for a server that is the only worker.
        (:meth:`Auth.from_config <protoserve.server.auth.Auth.from_config>` has refused
        sibling sockets without a secret.)"""
        if not config.sibling_sockets or not config.sibling_secret:
            return None
        return cls(config.sibling_sockets, config.sibling_secret)

    def vouches_for(self, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        """Whether the call is a sibling's: this supervisor's secret, on the unix socket."""
        given = sent_secret(context.invocation_metadata())
        if given is None or not secret_matches(given, self._secret):
            return False
        return over_unix_socket(context)

    # Load and unload everywhere.
    async def everywhere(
        self,
        apply: Callable[[], Awaitable[None]],
        method: str,
        request: Message,
        deadline: float | None,
    ) -> None:
        """``apply`` here, then ``method`` with ``request`` on every sibling.

        The two run in a task of their own, which a caller that leaves does not
        stop: a change made here is always forwarded. An error of ``apply`` is
        raised as it is, and nothing is forwarded (the siblings read the same
        folders: they would fail alike, and keep what they serve).

        Args:
            deadline: the client's deadline (``time.monotonic()`` seconds), or None.

        Raises:
            SiblingsFailed: applied here, but not on every sibling.
        """
        task = asyncio.get_running_loop().create_task(
            self._everywhere(apply, method, request, deadline)
        )
        self._tasks.add(task)  # held until done: the loop keeps weak references
        task.add_done_callback(self._forget)
        await asyncio.shield(task)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()  # the caller has it, unless it left
        if error is not None and not isinstance(error, ProtoserveError):
            # Not one of ours (those are the caller's answer, SiblingsFailed logged in
            # _failed): a caller that left would never see it.
            log.error("a model load or unload across the workers failed", exc_info=error)

    async def _everywhere(
        self,
        apply: Callable[[], Awaitable[None]],
        method: str,
        request: Message,
        deadline: float | None,
    ) -> None:
        await apply()
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None:
            timeout = max(timeout, MIN_FORWARD_SECONDS)
        failures = [
            f
            for f in await asyncio.gather(
                *(self._forward(path, method, request, timeout) for path in self.sockets)
            )
            if f is not None
        ]
        if failures:
            raise self._failed(method, request, failures)

    async def _forward(
        self, path: str, method: str, request: Message, seconds: float | None
    ) -> _Failure | None:
        """Make the call on the sibling at ``path``, within ``seconds`` (None: no
        deadline); None when it succeeded."""
        async with grpc.aio.insecure_channel("unix:" + path) as channel:
            rpc = getattr(pb_grpc.GRPCInferenceServiceStub(channel), method)
            try:
                await rpc(request, timeout=seconds, metadata=self._metadata())
            except grpc.aio.AioRpcError as error:
                return _failure(_worker_name(path), error)
        return None

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """The secret, and the client's request id, so the workers' logs tell one change."""
        request_id = REQUEST_ID.get()
        return ((SIBLING_HEADER, self._secret),) + (
            (("x-request-id", request_id),) if request_id else ()
        )

    def _failed(self, method: str, request: Message, failures: list[_Failure]) -> SiblingsFailed:
        """The client's error, logged too: the client may have left (never the secret)."""
        unreachable = [f for f in failures if not f.reached]
        code = grpc.StatusCode.UNAVAILABLE if unreachable else failures[0].code
        what = "loaded" if method == "RepositoryModelLoad" else "unloaded"
        name = bounded(getattr(request, "model_name", ""))
        said = "; ".join(f"{f.worker}: {f.code.name}: {f.reason}" for f in failures)
        message = (
            f"model {name!r} was {what} on this worker but not on {len(failures)} of the "
            f"{len(self.sockets)} other workers ({said}); calling again retries it on every "
            "worker"
        )
        log.warning("%s", message)
        return SiblingsFailed(code, message)

    # Catching up at the start.
    async def left_out(self) -> frozenset[str]:
        """The repository models a ready sibling does not serve on purpose: unloaded,
        or never loaded since its start (a folder added since). A starting worker does
        not load them (it would unload them right after). None answering: none."""
        found = await self._first_index()
        if found is None:
            return frozenset()
        worker, theirs = found
        names = _left_out(theirs)
        if names:
            log.info("sibling worker %s does not serve %s: left out", worker, ", ".join(names))
        return frozenset(names)

    async def catch_up(self, runtime: Runtime) -> None:
        """Make this worker serve the repository models a sibling serves, once its own
        start-up loads are over: the siblings may have changed meanwhile.

        Asks the first ready sibling for its RepositoryIndex, then loads here the
        models it has READY and this worker does not (one that failed here at the
        start is tried again), and unloads the ones this worker serves and it left
        out on purpose (:meth:`left_out`). A model that failed there is kept here.
        No sibling ready (the first start of every worker): nothing to do. Failures
        are logged; the worker serves on.
        """
        found = await self._first_index()
        if found is None:
            log.info("no sibling worker is ready: serving the repository as read at the start")
            return
        worker, theirs = found
        served_here = {row.name for row in runtime.repository_index() if row.state == READY}
        load = sorted({row.name for row in theirs if row.state == READY} - served_here)
        unload = sorted(served_here & set(_left_out(theirs)))
        if not (load or unload):
            log.info("sibling worker %s serves the same repository models", worker)
            return
        log.info(
            "catching up with sibling worker %s: loading %s; unloading %s",
            worker,
            ", ".join(load) or "none",
            ", ".join(unload) or "none",
        )
        changes = [runtime.load_model(n) for n in load] + [runtime.unload_model(n) for n in unload]
        results = await asyncio.gather(*changes, return_exceptions=True)
        for name, result in zip(load + unload, results, strict=True):
            if isinstance(result, BaseException):
                log.error("catching up: model %s: %s", name, result)

    async def _first_index(
        self,
    ) -> tuple[str, list[pb.RepositoryIndexResponse.ModelIndex]] | None:
        """(worker name, its repository index) of the first sibling that is ready.

        Not one that is starting: its index says "not loaded" of every model until its
        own loads begin, nor one shutting down.
        """
        for path in self.sockets:
            async with grpc.aio.insecure_channel("unix:" + path) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                options: dict[str, Any] = {"timeout": INDEX_SECONDS, "metadata": self._metadata()}
                try:
                    ready = await stub.ServerReady(pb.ServerReadyRequest(), **options)
                    if not ready.ready:
                        continue
                    response = await stub.RepositoryIndex(pb.RepositoryIndexRequest(), **options)
                except grpc.aio.AioRpcError as error:
                    log.debug("sibling worker %s: %s", _worker_name(path), error.code().name)
                    continue
            return _worker_name(path), list(response.models)
        return None


def _left_out(index: Sequence[pb.RepositoryIndexResponse.ModelIndex]) -> list[str]:
    """The models of a sibling's index it does not serve on purpose (:data:`_LEFT_OUT`)."""
    served = {row.name for row in index if row.state == READY}
    return sorted({row.name for row in index if row.reason in _LEFT_OUT} - served)


def _worker_name(path: str) -> str:
    """How messages name a sibling: its socket's file name (the folder is nobody's business)."""
    return Path(path).name


def _failure(worker: str, error: grpc.aio.AioRpcError) -> _Failure:
    """What a failed forward says. A sibling's own answer carries ``google.rpc`` details
    (every protoserve error does); an UNAVAILABLE without them is grpc's own: the
    socket could not be reached. grpc's text for that names the path: not repeated."""
    # grpc.aio.Metadata, of (key, value) pairs (grpc-stubs say otherwise), or None.
    trailers = cast("Iterable[tuple[str, Any]] | None", error.trailing_metadata())
    reached = any(key == "grpc-status-details-bin" for key, _ in trailers or ())
    code = error.code()
    if reached:
        reason = bounded(error.details() or "", 256)
    elif code is grpc.StatusCode.UNAVAILABLE:
        reason = "cannot reach it (not running, or restarting)"
    elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
        reason = "no answer within the client's deadline; it finishes the change on its own"
        reached = True
    else:
        reason = bounded(error.details() or "", 256)
    return _Failure(worker, code, reason, reached)
