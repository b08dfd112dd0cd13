"""The transport-independent core: every servicer converts messages and calls this.

The runtime holds the models, their states and their schedulers; it admits and
validates requests, runs them in the models' worker threads, counts requests in
flight and drains them at shutdown. It raises only
:mod:`~protoserve.server.runtime.errors` for request problems, and counts through
the :class:`~protoserve.server.runtime.meter.Meter` it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import functools
import logging
import time
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Collection,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from protoserve.server.runtime.batching import (
    embed_batch,
    predict_batch,
    predict_batch_key,
    predict_on_device,
)
from protoserve.server.runtime.decoding import DecodingChoice, choose_decoder
from protoserve.server.runtime.devices import check_device, check_dtype, place
from protoserve.server.runtime.errors import (
    Draining,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from protoserve.server.runtime.generation import Chunk, FinishReason, Usage
from protoserve.server.runtime.meter import GenerationMeter, Meter
from protoserve.server.runtime.model import (
    BatchDecoder,
    ChatMessage,
    Decoding,
    GenerationParams,
    Model,
    Task,
    Token,
    check_messages,
)
from protoserve.server.runtime.params import check_logprobs, validate_generation
from protoserve.server.runtime.registry import (
    IndexEntry,
    Instance,
    ModelEntry,
    ModelRegistry,
    ModelState,
)
from protoserve.server.runtime.repository import Batching, Warmup
from protoserve.server.runtime.scheduler import Scheduler
from protoserve.server.runtime.tensors import RawTensor, check_declared, from_raw, to_raw

__all__ = ["GenerateResult", "IndexEntry", "ModelEntry", "ModelState", "Runtime"]

log = logging.getLogger("protoserve.server")

#: Set in a call's context when it arrived while the server took calls (Runtime.admit).
_ADMITTED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "protoserve_admitted", default=False
)

T = TypeVar("T")

_TASK_NAMES = {
    Task.TEXT_GENERATION: "text generation (Generate, GenerateStream)",
    Task.EMBEDDING: "embedding (Embed)",
    Task.TENSOR_PREDICTION: "tensor prediction (Predict)",
}


@dataclass
class GenerateResult:
    """A whole generation; ``logprobs`` holds its tokens with their log probabilities,
    in ``token_ids`` order, when the request asked for them."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.LENGTH
    usage: Usage = field(default_factory=lambda: Usage(0, 0))
    logprobs: list[Token] = field(default_factory=list)


class Runtime:
    """Holds the models and serves requests on them.

    Models come from the command line (``models``), loaded at :meth:`start`, and from
    a model repository, loaded at :meth:`start` and then loaded, reloaded and unloaded
    while the server runs (:meth:`load_model`, :meth:`unload_model`; the rules are in
    :mod:`~protoserve.server.runtime.registry`). Each model version has its own
    scheduler and worker thread.

    A model of the repository that cannot be read or loaded is not served: it is
    absent from :meth:`list_models`, and UNAVAILABLE with the reason in
    :meth:`repository_index`, so it does not hold :attr:`ready` down. A model given
    on the command line that fails to load stays listed as FAILED, and the server is
    not ready: its operator asked for that model by name.

    Args:
        models: ``(served name, model)`` pairs, in the order ListModels reports them.
        max_queue: per model version, most requests waiting; more get RESOURCE_EXHAUSTED.
        max_active: per model version, most requests stepped in turn at once.
        batching, max_batch_size, max_batch_delay: the server's batching settings
            (None: each model's own); a repository model's ``[batching]`` overrides them.
        batch_invariant: generations decoded together must get bit for bit the tokens
            each gets alone (:mod:`~protoserve.server.runtime.decoding`); a repository
            model's ``[batching] batch_invariant`` overrides it.
        on_change: called (on the event loop) whenever a model's state or the
            server's readiness changes; the health service listens here.
        metrics: where to count queueing, tokens, cancellations and rejections
            (the server's :class:`~protoserve.server.metrics.Metrics`); None: nowhere.
        repository: the model repository folder, or None for none.
        model_control: allow :meth:`load_model` and :meth:`unload_model`.
        unload_grace: seconds the requests in flight on an unloaded (or replaced)
            version get before its generations are ended and its thread stopped.
        device, dtype: where models run and the dtype they compute in, unless a
            model says otherwise (its ``model.toml``, its class): ``auto``, ``cpu``,
            ``cuda`` or ``cuda:N``; ``float32``, ``float16`` or ``bfloat16``. Each
            model's is resolved before it loads; a device this machine lacks fails
            that model's load (:class:`~protoserve.server.runtime.devices.DeviceError`).
        instances: copies of each model that says no number of its own
            (``Model.instances``, ``instances`` in ``model.toml``), each loaded and run
            by a worker thread of its own; a request goes to the least busy.
    """

    def __init__(
        self,
        models: Sequence[tuple[str, Model]],
        *,
        max_queue: int = 64,
        max_active: int = 32,
        batching: bool = True,
        batch_invariant: bool = False,
        max_batch_size: int | None = None,
        max_batch_delay: float | None = None,
        max_streams: int = 256,
        on_change: Callable[[], None] | None = None,
        metrics: Meter | None = None,
        repository: str | Path | None = None,
        model_control: bool = True,
        unload_grace: float = 30.0,
        device: str = "auto",
        dtype: str = "float32",
        instances: int = 1,
    ) -> None:
        self.metrics = metrics if metrics is not None else Meter()
        #: The server's device and dtype for models that name none (module docstring of
        #: :mod:`~protoserve.server.runtime.devices`); checked for their form here.
        self.device, self.dtype = check_device(device), check_dtype(dtype)
        #: Instances of each model that says none of its own (``Model.instances``).
        if instances < 1:
            raise ValueError(f"instances must be 1 or more, not {instances}")
        self.instances = instances
        self.batching = batching
        self.batch_invariant = batch_invariant
        self.max_streams = max_streams
        self._limits = (max_queue, max_active, max_batch_size, max_batch_delay)
        self._streams = 0
        self._metered: set[str] = set()
        self._on_change = on_change or (lambda: None)
        self._models = ModelRegistry(
            [self._new_entry(name, model, str(model.version)) for name, model in models],
            new_entry=self._new_entry,
            warm=self._warm,
            on_change=lambda: self._on_change(),
            repository=repository,
            model_control=model_control,
            unload_grace=unload_grace,
        )
        self._started = False
        self._draining = False
        #: When a call last arrived during the drain (or the drain began): wait_unasked.
        self._last_late_call = 0.0
        self._in_flight = 0
        #: Calls admitted (admit) and not yet ended (release), reading their request or
        #: served: wait_idle waits for them too.
        self._arriving = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def _new_entry(
        self, name: str, model: Model, version: str, own: Batching | None = None
    ) -> ModelEntry:
        """A version with its scheduler (and worker thread) started, not yet loaded."""
        own = own or Batching()
        max_queue, max_active, max_batch_size, max_batch_delay = self._limits
        batching = self.batching if own.enabled is None else own.enabled
        invariant = self.batch_invariant if own.batch_invariant is None else own.batch_invariant
        size = _first(own.max_batch_size, max_batch_size, model.max_batch_size)
        own_delay = None if own.max_batch_delay_ms is None else own.max_batch_delay_ms / 1000

        def scheduler_for(index: int) -> Scheduler:
            return Scheduler(
                name,
                max_queue=max_queue,
                max_active=max_active,
                max_batch_size=size if batching else 1,
                max_batch_delay=_first(own_delay, max_batch_delay, model.max_batch_delay),
                metrics=self.metrics,
                instance=index,
            )

        # Instances: copies of the model made before it loads, each loaded in a worker
        # thread of its own (and on its own device of ``devices``, in turn).
        count = model.instances or self.instances
        devices = list(model.devices or ())
        copies = [model, *(copy.deepcopy(model) for _ in range(count - 1))]
        for index, copied in enumerate(copies if devices else ()):
            copied.device = devices[index % len(devices)]
        scheduler = scheduler_for(0)
        if name not in self._metered:
            # Once per name: a reload or another version adds no series, and the depth
            # read sums the versions served at the time (0 once unloaded).
            self._metered.add(name)
            decodings = [d.value for d in Decoding]
            self.metrics.add_model(name, self._depth_of(name), self._decoding_of(name), decodings)
            self.metrics.add_placement(name, self._placement_of(name))
        entry = ModelEntry(
            name,
            model,
            scheduler,
            version=version,
            batching=batching,
            batch_invariant=invariant,
            others=[Instance(c, scheduler_for(i), i) for i, c in enumerate(copies) if i],
        )
        for instance_scheduler in entry.schedulers:
            instance_scheduler.on_device_failure = functools.partial(self._device_failed, entry)
        return entry

    def _pick(self, entry: ModelEntry) -> Instance:
        """The instance of ``entry`` a request goes to, counted (``instance`` label)."""
        instance = entry.pick()
        if entry.others:
            self.metrics.instance_used(entry.name, instance.index)
        return instance

    def _device_failed(self, entry: ModelEntry, error: BaseException) -> None:
        """A CUDA error in the model's work (scheduler.py): the device is not to be
        trusted, and the version is FAILED (health NOT_SERVING) until loaded again."""
        entry.state, entry.state_message = ModelState.FAILED, f"its device failed: {error}"
        self._on_change()

    def _depth_of(self, name: str) -> Callable[[], int]:
        return lambda: sum(s.depth for e in self._models.versions_of(name) for s in e.schedulers)

    def _decoding_of(self, name: str) -> Callable[[], str | None]:
        """How the latest version served under ``name`` decodes, read when scraped: a
        version loading, or one that failed, is not served; after an unload, None."""

        def read() -> str | None:
            served = self._models.versions_of(name)
            decoding = served[-1].decoding if served else None
            return None if decoding is None else decoding.value

        return read

    def _placement_of(self, name: str) -> Callable[[], tuple[str, str] | None]:
        """Where the latest version served under ``name`` runs, ``(device, dtype)``, read
        when scraped; None while none is served (loading, failed, unloaded)."""

        def read() -> tuple[str, str] | None:
            served = self._models.versions_of(name)
            entry = served[-1] if served else None
            if entry is None or entry.device is None or entry.state is not ModelState.READY:
                return None
            return entry.device_name, entry.dtype_name

        return read

    # Life cycle.
    async def start(
        self,
        *,
        leave_out: Collection[str] = frozenset(),
        then: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Load and warm up every model, each version in its own worker thread, all at once.

        A model given on the command line that fails to load is FAILED (its message
        says why); one of the repository is not served (the index says why). The
        others serve. A worker of ``--workers`` that starts while its siblings serve
        (server/siblings.py) leaves out the repository models they do not serve
        (``leave_out``), and catches up with them in ``then``, which runs once the
        loads are over and before the server is ready.
        """
        loads = [self._load_given(entry) for entry in self._models.given()]
        if self._models.repository is not None:
            loads.append(self._models.load_all(leave_out))
        await asyncio.gather(*loads)
        if then is not None:
            await then()
        self._started = True
        self._on_change()

    async def _load_given(self, entry: ModelEntry) -> None:
        started = time.perf_counter()
        try:
            await self._warm(entry, None)
        except Exception as exc:
            log.exception("model %s failed to load", entry.name)
            entry.state, entry.state_message = ModelState.FAILED, f"failed to load: {exc}"
        else:
            entry.mark_ready()
            log.info("model %s ready in %.2fs", entry.name, time.perf_counter() - started)
        self._on_change()

    async def _warm(self, entry: ModelEntry, warmup: Warmup | None) -> None:
        """Load and warm up one version, each instance in its worker thread, all at once;
        raises what a model raised."""
        choices = await asyncio.gather(*(self._warm_one(entry, i, warmup) for i in entry.instances))
        choice = choices[0]
        entry.decoding = choice.decoding
        if choice.message:
            log.log(choice.level, "%s", choice.message)

    async def _warm_one(
        self, entry: ModelEntry, instance: Instance, warmup: Warmup | None
    ) -> DecodingChoice:
        scheduler, model = instance.scheduler, instance.model

        def load() -> DecodingChoice:
            # Resolved here, in the worker thread: asking torch about CUDA may take time.
            placed = place(model, self.device, self.dtype)
            if instance.index == 0:  # what GetModel and /metrics report
                entry.device, entry.dtype = placed
            if placed[0].type == "cuda":  # this thread's "cuda" is the model's GPU
                torch.cuda.set_device(placed[0])
            model.load()
            model.warmup()
            if warmup is not None:
                warmup.run(model)
            choice = choose_decoder(
                model,
                entry.name,
                max_active=scheduler.max_active,
                batching=entry.batching,
                batch_invariant=entry.batch_invariant,
            )
            if choice.decoder is not None:
                _warm_up_decoder(choice.decoder)
                scheduler.decoder = choice.decoder
            return choice

        return await scheduler.run(load, request=False)

    @property
    def ready(self) -> bool:
        """True once started, while every model served is READY and the server is not
        shutting down (repository models that failed are not served: they do not count)."""
        return (
            self._started
            and not self._draining
            and all(e.state is ModelState.READY for e in self._models.served())
        )

    def model_ready(self, name: str, version: str = "") -> bool:
        """True when the model (that version; "" for the latest) is READY (loaded and run
        once) and the server is not draining."""
        try:
            entry = self._models.get(name, version)
        except NotFound:
            return False
        return not self._draining and entry.state is ModelState.READY

    def versions(self, name: str) -> list[str]:
        """The versions of a model the server holds, oldest first. Raises NotFound."""
        self._models.get(name)
        return [e.version for e in self._models.versions_of(name)]

    def known_models(self) -> list[str]:
        """Every model name served now, or reported by the repository since the start
        (failed, unloaded): the names health reports on."""
        return self._models.known()

    @property
    def in_flight(self) -> int:
        """Requests being served now."""
        return self._in_flight

    def admit(self) -> bool:
        """Whether the server takes a call arriving now (it is not draining): a call
        admitted is served although the drain begins before it reaches its model (its
        answer may have begun), and the drain waits for it until :meth:`release`; one
        that arrives during the drain gets :class:`Draining`, and counts as a late call
        for :meth:`wait_unasked`. Called in the call's own context (the transport's)."""
        if self._draining:
            self._last_late_call = time.monotonic()
            return False
        _ADMITTED.set(True)
        self._arriving += 1  # counted until release(): a drain waits for it
        self._idle.clear()
        return True

    def release(self) -> None:
        """A call :meth:`admit` took has ended (its transport says so, once)."""
        self._arriving -= 1
        if self._arriving == 0 and self._in_flight == 0:
            self._idle.set()

    def begin_drain(self) -> None:
        """Refuse new requests with UNAVAILABLE (:class:`Draining`); those in flight go on,
        and so do those admitted before (:meth:`admit`)."""
        self._draining = True
        self._last_late_call = time.monotonic()
        self._on_change()

    async def wait_idle(self, within: float) -> bool:
        """Wait until no request is in flight and no admitted call is still going (its
        request still being read, say); False when ``within`` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), within)
        except TimeoutError:
            return False
        return True

    async def wait_unasked(self, quiet: float, within: float) -> bool:
        """Draining, wait until no call has arrived for ``quiet`` seconds (clients that
        watch health have gone elsewhere); False when ``within`` seconds passed first."""
        deadline = time.monotonic() + within
        while (left := self._last_late_call + quiet - time.monotonic()) > 0:
            if time.monotonic() + left > deadline:
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                return False
            await asyncio.sleep(left)
        return True

    def stop_generations(self) -> None:
        """End every generation in flight at its next step, with FinishReason.CANCELLED."""
        for entry in self._models.everything():
            for scheduler in entry.schedulers:
                scheduler.request_stop()

    def close(self) -> None:
        """Stop loads and unloads under way, and every model version's worker thread."""
        self._models.cancel()
        for entry in self._models.everything():
            for scheduler in entry.schedulers:
                scheduler.close()

    # Models.
    def list_models(self) -> list[ModelEntry]:
        """Every model, ready or not, in configuration order; for a model with several
        versions, the one a request naming no version gets (the latest)."""
        return self._models.latest()

    def get_model(self, name: str, version: str = "") -> ModelEntry:
        """The named model (that version; "" for the latest). Raises NotFound naming the
        models, or the versions, there are."""
        return self._models.get(name, version)

    # The model repository (the Open Inference Protocol's repository extension).
    def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model version of the repository, loaded or not; only READY ones with
        ``ready_only``. Raises FailedPrecondition when the server has no repository.

        The folders are read again, so a folder added since the start is listed
        (UNAVAILABLE, "not loaded"), and a malformed one with what is wrong with it
        now (version "").
        """
        return self._models.index(ready_only)

    async def load_model(self, name: str) -> None:
        """Load (or reload) a model from the repository; returns once it is READY.

        The folder is read again, so a new version folder or a fixed ``model.toml``
        is picked up. The new versions load beside those serving, and take over
        once all are READY; a failed reload leaves the old ones serving.

        Raises:
            FailedPrecondition: no repository, or model control is off, or the model
                was given with --model.
            NotFound: the repository has no such model.
            InvalidArgument: its folder is malformed (the message says how).
            Unavailable: it failed to load (the message says why), or the server is
                shutting down.
        """
        self._models.check_control(name)
        if self._draining:
            raise Unavailable("the server is shutting down; it loads no more models")
        await self._models.load(name)

    async def unload_model(self, name: str) -> None:
        """Stop serving a model: new requests are refused, those in flight finish, then
        its worker thread stops. Raises NotFound, or FailedPrecondition as load_model.

        Requests in flight get ``unload_grace`` seconds; then generations still going
        end (FINISH_REASON_CANCELLED) and requests still waiting fail with UNAVAILABLE.
        Unloading a model of the repository that is not loaded does nothing.
        """
        self._models.check_control(name)
        await self._models.unload(name)

    # Admission.
    def capacity(self, name: str, *, stream: bool = False) -> int:
        """The most requests of model ``name`` (any version) that can be held at once,
        queued or running, and streams (``stream``) that the server holds at once: a
        request that needs more at the same time can never be admitted.

        Raises:
            NotFound: no such model.
        """
        entry = self.get_model(name)
        held = sum(s.max_queue + s.max_active for s in entry.schedulers)
        return min(held, self.max_streams) if stream else held

    @contextlib.contextmanager
    def _admitted(
        self, name: str, task: Task, version: str = "", *, stream: bool = False
    ) -> Iterator[ModelEntry]:
        """The version a request gets, counted in flight (on the server and on the
        version) until the block ends. Every refusal for want of room or readiness before
        the model's queue is here (a request's own faults are checked inside the
        block); the queue's own bound is ``Scheduler._admit``.

        Raises:
            ResourceExhausted: ``stream``, and ``max_streams`` streams are in flight.
            Unavailable: the server is draining, or the model is not READY.
            NotFound: no such model or version.
            InvalidArgument: no model named, or it does not serve ``task``.
        """
        if stream:
            if self._streams >= self.max_streams:
                if name in self._models:
                    self.metrics.rejected(name)
                raise ResourceExhausted(
                    f"the server has {self._streams} streams in flight, its limit; retry later",
                    retry_after=1.0,
                )
        entry = self._serving(name, task, version)
        # No await since _serving: a version taken out of service is then either
        # counted here or never handed out.
        slots = 1 if stream else 0  # a stream holds one of max_streams until it ends
        self._streams += slots
        self._in_flight += 1
        self._idle.clear()
        entry.in_flight += 1
        entry.idle.clear()
        try:
            yield entry
        finally:
            self._streams -= slots
            self._in_flight -= 1
            if self._in_flight == 0 and self._arriving == 0:
                self._idle.set()
            entry.in_flight -= 1
            if entry.in_flight == 0:
                entry.idle.set()

    def _serving(self, name: str, task: Task, version: str) -> ModelEntry:
        if self._draining and not _ADMITTED.get():
            raise Draining("the server is shutting down; retry on another instance")
        if not name:
            raise InvalidArgument.field("model", "must name a model")
        entry = self.get_model(name, version)
        if entry.state is not ModelState.READY:
            raise Unavailable(f"model {name!r} is not ready: {entry.state_message}")
        if task not in entry.model.tasks():
            raise InvalidArgument.field(
                "model", f"model {name!r} does not serve {_TASK_NAMES[task]}"
            )
        return entry

    def _prompt_tokens(self, entry: ModelEntry, text: str, field: str) -> int:
        count = entry.model.count_tokens(text)
        limit = entry.model.max_input_tokens
        if count > limit:
            raise InvalidArgument.field(
                field, f"is {count} tokens; the model takes at most {limit}"
            )
        return count

    # The tasks.
    def generate_stream(
        self,
        model: str,
        prompt: str | Sequence[ChatMessage],
        parameters: Mapping[str, Any],
        *,
        version: str = "",
        logprobs: int | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """Chunks of a generation as they are produced; the last has finish reason and usage.

        ``prompt`` is a text to continue, or a conversation to answer: the model's
        :meth:`~Model.chat_prompt` renders it, and its :meth:`~Model.chat_stops` are
        added to the request's. ``logprobs`` (0 to :data:`MAX_TOP_LOGPROBS`) asks for
        each token's log probability and that many alternatives (:attr:`Chunk.logprobs`).

        Counts toward ``max_streams``. Nothing happens until the first chunk is asked
        for; leaving the iteration early (``aclose``) cancels the generation before
        its next step.

        Raises:
            InvalidArgument: naming ``inputs`` (a text prompt) or ``messages`` (a
                conversation, ``messages[i].role``), ``parameters.<name>``, or
                ``logprobs`` (out of range, or the model does not return them).
        """
        return self._generation(model, prompt, parameters, version, logprobs, stream=True)

    async def generate(
        self,
        model: str,
        prompt: str | Sequence[ChatMessage],
        parameters: Mapping[str, Any],
        *,
        version: str = "",
        logprobs: int | None = None,
    ) -> GenerateResult:
        """A whole generation at once; the arguments and errors are :meth:`generate_stream`'s."""
        result = GenerateResult("")
        parts: list[str] = []
        generation = self._generation(model, prompt, parameters, version, logprobs)
        async with contextlib.aclosing(generation) as chunks:
            async for chunk in chunks:
                parts.append(chunk.text)
                result.token_ids.extend(chunk.token_ids)
                result.logprobs.extend(chunk.logprobs)
                if chunk.finish_reason is not None and chunk.usage is not None:
                    result.finish_reason, result.usage = chunk.finish_reason, chunk.usage
        result.text = "".join(parts)
        return result

    async def _generation(
        self,
        model: str,
        prompt: str | Sequence[ChatMessage],
        parameters: Mapping[str, Any],
        version: str,
        logprobs: int | None,
        *,
        stream: bool = False,
    ) -> AsyncGenerator[Chunk, None]:
        """The one generation pipeline, for both calls: admitted, validated, queued on
        the model's scheduler, and its job's chunks counted as they pass. Closing it (the
        caller left) cancels the job, which leaves the batch before its next step."""
        with self._admitted(model, Task.TEXT_GENERATION, version, stream=stream) as entry:
            text, params, prompt_tokens = self._generation_request(
                entry, prompt, parameters, logprobs
            )
            instance = self._pick(entry)
            job = instance.scheduler.submit_generation(instance.model, text, params, prompt_tokens)
            meter: GenerationMeter | None = None
            finished = cancelled = False
            try:
                meter = self.metrics.generation(model, job.submitted)
                async for chunk in job:
                    if chunk.token_ids:
                        meter.tokens(len(chunk.token_ids))
                    if chunk.finish_reason is not None:
                        finished = True
                        # Shutdown ended it early (stop_generations).
                        cancelled = chunk.finish_reason is FinishReason.CANCELLED
                    yield chunk
            except (GeneratorExit, asyncio.CancelledError):
                # The caller left before the end; a model error is not a cancellation.
                cancelled = cancelled or not finished
                raise
            finally:
                job.cancel()  # first: a failing meter must not keep the job's slot
                if meter is not None:
                    meter.end(cancelled)

    def _generation_request(
        self,
        entry: ModelEntry,
        prompt: str | Sequence[ChatMessage],
        parameters: Mapping[str, Any],
        logprobs: int | None,
    ) -> tuple[str, GenerationParams, int]:
        """A generation request checked: the prompt's text, the parameters (a chat's
        stop sequences added, ``logprobs`` set) and the prompt's token count."""
        model = entry.model
        params = validate_generation(model, parameters)
        if logprobs is not None:
            check_logprobs(entry.name, model, logprobs)
            params = replace(params, logprobs=logprobs)
        if isinstance(prompt, str):
            return prompt, params, self._prompt_tokens(entry, prompt, "inputs")
        check_messages(prompt)
        text = model.chat_prompt(prompt)
        # The request's stops first, then the template's; each once.
        stops = tuple(dict.fromkeys((*params.stop_sequences, *model.chat_stops())))
        params = replace(params, stop_sequences=stops)
        return text, params, self._prompt_tokens(entry, text, "messages")

    async def embed(
        self, model: str, texts: Sequence[str], *, normalize: bool = True, version: str = ""
    ) -> tuple[torch.Tensor, Usage]:
        """One float32 vector per text, shape ``[len(texts), dim]``, and the token usage."""
        with self._admitted(model, Task.EMBEDDING, version) as entry:
            if not texts:
                raise InvalidArgument.field("inputs", "must hold at least one text")
            limit = entry.model.max_batch_texts
            if len(texts) > limit:
                raise InvalidArgument.field(
                    "inputs", f"holds {len(texts)} texts; the model takes at most {limit}"
                )
            tokens = sum(self._prompt_tokens(entry, t, f"inputs[{i}]") for i, t in enumerate(texts))
            payload = (list(texts), normalize)
            instance = self._pick(entry)
            run_batch = functools.partial(embed_batch, instance.model)
            vectors = await instance.scheduler.run_batched(
                "embed", (), payload, len(texts), run_batch
            )
            return vectors, Usage(tokens, 0)

    async def predict(
        self,
        model: str,
        inputs: Sequence[RawTensor],
        parameters: Mapping[str, Any],
        *,
        version: str = "",
    ) -> list[RawTensor]:
        """Run a model on named tensors; outputs come back raw, in the model's order."""
        with self._admitted(model, Task.TENSOR_PREDICTION, version) as entry:
            tensors = from_raw(inputs)
            check_declared(entry.model.inputs, tensors)
            params = dict(parameters)
            instance = self._pick(entry)
            model_, scheduler = instance.model, instance.scheduler
            key = None
            if model_.predict_batches and scheduler.max_batch_size > 1:
                key = predict_batch_key(tensors, params)
            if key is None:

                def run() -> list[RawTensor]:
                    outputs = predict_on_device(model_, tensors, params)
                    return [to_raw(name, value) for name, value in outputs.items()]

                return await scheduler.run(run)
            rows = next(iter(tensors.values())).shape[0]
            return await scheduler.run_batched(
                "predict",
                key,
                tensors,
                rows,
                lambda batch: predict_batch(model_, batch, params),
            )


def _first(*values: T | None) -> T:
    """The first value that is not None (the last is never None)."""
    found = next((v for v in values if v is not None), None)
    assert found is not None
    return found


def _warm_up_decoder(decoder: BatchDecoder) -> None:
    """Prefill one sequence and step it once, so the first request pays no one-off costs."""
    params = GenerationParams(max_new_tokens=2, temperature=1.0, top_k=0, top_p=1.0, seed=0)
    state, _ = decoder.prefill("warm up", params)
    try:
        decoder.step([state])
    finally:
        decoder.release(state)
