"""A model's worker thread: bounded queues in, batched model work, results out to asyncio.

The event loop never runs a model. Request handlers submit work and await its
results; the worker thread owns the model and, round after round, does:

1. **Dynamic batches** (Embed, Predict): requests submitted with the same
   batch key wait together, and one model call serves up to
   ``max_batch_size`` items of them. A batch that is not full waits at most
   ``max_batch_delay`` for stragglers, and only while the model has nothing
   else to do.
2. **Continuous batching** (generation with a :class:`BatchDecoder`): a new
   sequence is prefilled, then joins the running ones; one decode step serves
   them all. Prefills are spread over rounds (``PREFILL_TOKENS_PER_ROUND``),
   so that a burst of new requests does not stall the running ones. A
   sequence that finishes, is cancelled or times out leaves before the next
   step.
3. **Step jobs** (everything else: loading, models without batching, and
   generation through ``Model.generate``): iterators stepped once per round,
   in turn, so a long generation never starves a short request.

Every queue is bounded: work waiting to start and work running together are
at most ``max_queue + max_active`` (beyond that ResourceExhausted at once),
and each job's unread output at most ``buffer`` items (a slow reader pauses
its own job, not the others).

Running out of memory (a CUDA out-of-memory error, or the CPU allocator's) is not the
requests' fault, nor the end of the model: the requests of that batch (or decode step)
end with :class:`OutOfMemory` (RESOURCE_EXHAUSTED, retry), and the model goes on with
batches of half that size (dynamic batches) or half as many sequences decoded together;
after ``OOM_RECOVERY`` good rounds at the smaller size it tries twice as many again, up
to its own limit. A prompt whose prefill runs out fails alone, with no back-off (it
runs alone whatever the limit). Any other CUDA error leaves the device not to be
trusted: the round's requests end UNAVAILABLE and the runtime turns the model FAILED
(health NOT_SERVING) until it is loaded again; the server and its other models go on.

A generation's reader that falls behind is not sent its chunks one by one: when
it asks for the next, every chunk already delivered and not yet read comes as one
(:meth:`Chunk.joined`). Nothing waits to be joined: a reader that keeps up gets
each token's chunk as soon as it is made, and one that lags catches up in one read.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from typing import Any, ClassVar, Generic, TypeVar

from protoserve.server.runtime.errors import OutOfMemory, ResourceExhausted, Unavailable
from protoserve.server.runtime.generation import Chunk, TextAssembly, run_generation
from protoserve.server.runtime.meter import Meter
from protoserve.server.runtime.model import BatchDecoder, GenerationParams, Model

__all__ = ["Job", "Scheduler"]

T = TypeVar("T")
J = TypeVar("J", bound="Job[Any]")

log = logging.getLogger("protoserve.server")

_ITEM, _DONE, _ERROR = range(3)
#: Good rounds (batches, decode steps) at a size an out-of-memory error imposed before
#: the scheduler tries twice that size again.
OOM_RECOVERY = 32
#: Prompt tokens prefilled per round at most (but always one sequence): a burst of
#: new requests must not stall the running sequences for all their prefills at once.
PREFILL_TOKENS_PER_ROUND = 512
#: What the worker hands to the event loop: (job, kind, value).
_Delivery = tuple["Job[Any]", int, object]


class Job(Generic[T]):
    """Submitted work; iterate it (async) for its items. It is its own async iterator,
    not a generator: leaving the iteration early does nothing, :meth:`cancel` drops it."""

    #: Whether items delivered and not yet read are read as one (:meth:`_join`):
    #: a generation's chunks are; the results of other work never are.
    joins: ClassVar[bool] = False

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._loop = asyncio.get_running_loop()
        # Delivered, not yet read; filled on the loop by _post, which wakes _waiter.
        self._out: deque[tuple[int, object]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.submitted = time.perf_counter()
        self.unread = 0  # items handed to the loop, not yet read; guarded by the scheduler lock
        self.cancelled = False
        self.finished = False
        self._ended = False  # its last item was read
        #: Set by the server to end a generation early (it checks this between steps).
        self.stop = threading.Event()
        #: A caller's request (False: the server's own work, such as loading, whose
        #: queue time and refusals are no request's).
        self.request = True

    def cancel(self) -> None:
        """Drop the job: out of the queue if waiting, out of the batch before its next step."""
        self._scheduler._cancel(self)

    def __aiter__(self) -> Job[T]:
        return self

    async def __anext__(self) -> T:
        """The next item, as the worker delivers it; raises what the work raised.

        For a job that :attr:`joins`, the next item is every item already delivered
        and not yet read, joined: a reader that falls behind catches up in one read,
        and one that keeps up gets each item alone. An end or an error after them
        comes at the next call.
        """
        if self._ended:
            raise StopAsyncIteration
        out = self._out
        while not out:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        kind, value = out.popleft()
        if kind == _ITEM and self.joins and out and out[0][0] == _ITEM:
            items = [value]
            while out and out[0][0] == _ITEM:
                items.append(out.popleft()[1])
            self._scheduler._consumed(self, len(items))
            return self._join(items)  # type: ignore[arg-type]
        self._scheduler._consumed(self, 1)
        if kind == _ITEM:
            return value  # type: ignore[return-value]
        self._ended = True
        if kind == _DONE:
            raise StopAsyncIteration
        assert isinstance(value, BaseException)
        raise value

    def _join(self, items: list[T]) -> T:
        """``items`` (two or more, in order) as one; only for a job that :attr:`joins`."""
        raise NotImplementedError


class _StepJob(Job[T]):
    """An iterator stepped once per round; each ``next()`` is one unit of model work."""

    def __init__(
        self,
        scheduler: Scheduler,
        factory: Callable[[], Iterator[T]],
        request: bool,
        once: bool = False,
    ) -> None:
        super().__init__(scheduler)
        self._factory = factory
        self.request = request
        self._once = once
        self._iterator: Iterator[T] | None = None

    def _step(self, out: list[_Delivery]) -> bool:
        """One step; False when the job ended (its last delivery is in ``out``).

        A job of one item (``once``) ends on the step that makes it: it must not
        stay among the active jobs after its caller has its result, or the model
        would look busy to the next request (which then skips the batch delay).
        """
        try:
            if self._iterator is None:
                if self.request:
                    self._scheduler._observe_queue(self)
                self._iterator = iter(self._factory())
            item = next(self._iterator)
        except StopIteration:
            out.append((self, _DONE, None))
            return False
        except Exception as exc:  # model code failed: the request ends with an error
            scheduler = self._scheduler
            if self.request:  # out of memory: fewer requests at once (a load fails as is)
                running = len(scheduler._active)
                exc = scheduler._failed(exc, scheduler._oom_active, running, "requests", self)
            out.append((self, _ERROR, exc))
            return False
        out.append((self, _ITEM, item))
        if self._once:
            out.append((self, _DONE, None))
            return False
        return True

    def _close(self) -> None:
        closer = getattr(self._iterator, "close", None)
        if closer is not None:
            try:
                closer()
            except Exception:  # a model failing while it is being closed changes nothing
                pass


class _GenerationJob(_StepJob[Chunk]):
    """One generation through ``Model.generate``, stepped like any step job; its
    :attr:`~Job.stop` ends it at the next step. Chunks its reader is behind on are
    read as one."""

    joins = True

    def __init__(
        self,
        scheduler: Scheduler,
        model: Model,
        text: str,
        params: GenerationParams,
        prompt_tokens: int,
    ) -> None:
        super().__init__(scheduler, self._chunks, request=True)
        self.model, self.text, self.params, self.prompt_tokens = model, text, params, prompt_tokens

    def _chunks(self) -> Iterator[Chunk]:
        return run_generation(
            self.model, self.text, self.params, prompt_tokens=self.prompt_tokens, stop=self.stop
        )

    def _join(self, items: list[Chunk]) -> Chunk:
        return Chunk.joined(items)


class _BatchItem(Job[T]):
    """One request's part of a dynamic batch: a payload of ``weight`` items."""

    def __init__(
        self,
        scheduler: Scheduler,
        kind: str,
        key: Hashable,
        payload: object,
        weight: int,
        run_batch: Callable[[list[Any]], list[T]],
    ) -> None:
        super().__init__(scheduler)
        self.kind, self.key = kind, (kind, key)
        self.payload, self.weight, self.run_batch = payload, weight, run_batch


class _Sequence(Job[Chunk]):
    """One generation decoded in the continuous batch; chunks its reader is behind on
    are read as one."""

    joins = True

    def __init__(
        self, scheduler: Scheduler, text: str, params: GenerationParams, prompt_tokens: int
    ) -> None:
        super().__init__(scheduler)
        self.text, self.params, self.prompt_tokens = text, params, prompt_tokens
        self.assembly = TextAssembly(params, prompt_tokens)
        self.state: Any = None
        self.prefilled = False

    def _join(self, items: list[Chunk]) -> Chunk:
        return Chunk.joined(items)


class Scheduler:
    """Runs one model's work in its own thread; see the module docstring.

    Args:
        name: the model's name, for the thread's name, errors and metrics.
        max_queue: most requests waiting to start; beyond that, ResourceExhausted.
        max_active: most step jobs and sequences running at once.
        buffer: most unread items per job before its steps pause (a generation's
            chunks, one a token, count one by one, though its reader gets them joined).
        max_batch_size: most items (texts, rows) in one dynamic batch.
        max_batch_delay: seconds a batch that is not full may wait for more.
        metrics: where queue times, batch sizes and refusals are counted; None: nowhere.
        instance: which of the model's instances it runs (its thread's name says so).
    """

    def __init__(
        self,
        name: str,
        *,
        max_queue: int = 64,
        max_active: int = 8,
        buffer: int = 16,
        max_batch_size: int = 1,
        max_batch_delay: float = 0.0,
        metrics: Meter | None = None,
        instance: int = 0,
    ) -> None:
        self.name = name
        self.max_queue = max_queue
        self.max_active = max_active
        self.buffer = buffer
        self.max_batch_size = max(1, max_batch_size)
        self.max_batch_delay = max(0.0, max_batch_delay)
        #: Set (from the worker thread, after the model loaded) to decode generations together.
        self.decoder: BatchDecoder | None = None
        self._meter = metrics if metrics is not None else Meter()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[Job[Any]] = deque()  # step jobs and sequences
        self._batches: dict[Hashable, deque[_BatchItem[Any]]] = {}
        self._active: list[Job[Any]] = []
        self._closed = False
        #: After an out-of-memory error: the most items in one dynamic batch, and the most
        #: sequences decoded together, for now (None: the configured limit), and the good
        #: rounds since (OOM_RECOVERY of them double the limit back). Worker thread only.
        self._oom_batch: _Backoff = _Backoff(self.max_batch_size)
        #: Called on the event loop, once, when the model's device failed for good (a
        #: CUDA error): the runtime turns the model FAILED. Set by the runtime.
        self.on_device_failure: Callable[[BaseException], None] | None = None
        self._device_failed = False
        self._oom_active: _Backoff = _Backoff(self.max_active)
        thread = f"model-{name}" if instance == 0 else f"model-{name}-{instance}"
        self._thread = threading.Thread(target=self._run, name=thread, daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting to start."""
        return len(self._waiting) + sum(len(q) for q in self._batches.values())

    @property
    def active(self) -> int:
        """Step jobs and sequences running."""
        return len(self._active)

    # Submitting (from the event loop).
    def submit(self, factory: Callable[[], Iterator[T]], *, request: bool = True) -> Job[T]:
        """Queue a step job; raises ResourceExhausted at once when the model is full.

        ``request=False`` marks the server's own work: its queue time and refusal
        are not a request's. (The runtime's calls go through :meth:`run`,
        :meth:`run_batched` and :meth:`submit_generation`; this is the general form.)
        """
        return self._enqueue(_StepJob(self, factory, request))

    def submit_generation(
        self, model: Model, text: str, params: GenerationParams, prompt_tokens: int
    ) -> Job[Chunk]:
        """Queue a generation: into the continuous batch when the model has a
        :attr:`decoder`, else as a step job over ``model.generate``. Raises as :meth:`submit`."""
        job: Job[Chunk]
        if self.decoder is not None:
            job = _Sequence(self, text, params, prompt_tokens)
        else:
            job = _GenerationJob(self, model, text, params, prompt_tokens)
        return self._enqueue(job)

    def _enqueue(self, job: J) -> J:
        """Admit ``job`` (or raise) and queue it for the worker's next round."""
        with self._lock:
            self._admit(job)
            self._waiting.append(job)
            self._wake.notify()
        return job

    async def run(self, fn: Callable[[], T], *, request: bool = True) -> T:
        """Run ``fn()`` as one step in the worker thread and return its result."""
        job = _StepJob(self, lambda: iter((fn(),)), request, once=True)
        return await self._result(self._enqueue(job))

    async def run_batched(
        self,
        kind: str,
        key: Hashable,
        payload: object,
        weight: int,
        run_batch: Callable[[list[Any]], list[T]],
    ) -> T:
        """Run ``payload`` in a dynamic batch with others of the same ``kind`` and ``key``.

        ``run_batch`` gets the payloads of one batch (``weight`` items each,
        at most ``max_batch_size`` in all unless one payload alone is larger)
        and returns one result per payload, in order.
        """
        job: _BatchItem[T] = _BatchItem(self, kind, key, payload, weight, run_batch)
        with self._lock:
            self._admit(job)
            self._batches.setdefault(job.key, deque()).append(job)
            self._wake.notify()
        return await self._result(job)

    async def _result(self, job: Job[T]) -> T:
        try:
            async for item in job:
                return item
        except ResourceExhausted:
            # The model itself refused (it ran out of room): counted as one at capacity.
            if job.request:
                self._meter.rejected(self.name)
            raise
        finally:
            job.cancel()
        raise AssertionError("a one-result job ended without a result")

    def _admit(self, job: Job[Any]) -> None:
        """Refuse ``job`` unless there is room, counting the refusal; called with the
        lock held. The runtime's own admission is ``Runtime._admitted``."""
        if self._closed:
            raise Unavailable(f"model {self.name!r} is shutting down")
        # Free active slots count as room: the worker admits waiting jobs only
        # between rounds, and capacity must not depend on that timing.
        held = self.depth + len(self._active)
        if held >= self.max_queue + self.max_active:
            if job.request:
                self._meter.rejected(self.name)
            raise ResourceExhausted(
                f"model {self.name!r} is at capacity: {len(self._active)} requests "
                f"running and {self.depth} queued; retry later",
                retry_after=1.0,
            )

    def request_stop(self) -> None:
        """Ask every generation to end early (they finish with CANCELLED)."""
        with self._lock:
            for job in (*self._waiting, *self._active):
                job.stop.set()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker thread; requests still waiting fail with UNAVAILABLE."""
        with self._lock:
            self._closed = True
            waiting: list[Job[Any]] = [*self._waiting]
            for queue in self._batches.values():
                waiting.extend(queue)
            self._waiting.clear()
            self._batches.clear()
            self._wake.notify()
        error = Unavailable(f"model {self.name!r} is shutting down")
        self._deliver([(job, _ERROR, error) for job in waiting])
        self._thread.join(timeout)

    # Called from the event loop.
    def _cancel(self, job: Job[Any]) -> None:
        with self._lock:
            if job.finished or job.cancelled:
                return
            job.cancelled = True
            if isinstance(job, _BatchItem):
                queue = self._batches.get(job.key)
                if queue is not None and job in queue:
                    queue.remove(job)
                    if not queue:
                        del self._batches[job.key]
            elif job in self._waiting:
                self._waiting.remove(job)
            self._wake.notify()

    def _consumed(self, job: Job[Any], count: int) -> None:
        """``count`` of ``job``'s items were read: a job paused for its reader may go on."""
        with self._lock:
            paused = job.unread >= self.buffer
            job.unread -= count
            if paused and job.unread < self.buffer:
                self._wake.notify()

    # The worker thread.
    def _deliver(self, out: list[_Delivery]) -> None:
        """Hand results to their event loops: one wake-up per loop, not per item."""
        if not out:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[_Delivery]] = {}
        with self._lock:
            for delivery in out:
                job = delivery[0]
                job.unread += 1
                by_loop.setdefault(job._loop, []).append(delivery)
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_post, deliveries)
            except RuntimeError:  # the event loop is gone: nobody is waiting any more
                for job, _, _ in deliveries:
                    job.cancelled = True

    def _observe_queue(self, job: Job[Any]) -> None:
        self._meter.queued(self.name, time.perf_counter() - job.submitted)

    def _finish(self, jobs: list[Job[Any]]) -> None:
        with self._lock:
            for job in jobs:
                job.finished = True
                if job in self._active:
                    self._active.remove(job)

    def _take_batches(self, now: float, idle: bool) -> tuple[list[list[_BatchItem[Any]]], float]:
        """Batches due now (taken out of their queues), and the next time one falls due.

        A batch is due when it is full, when its oldest request has waited
        ``max_batch_delay``, or at once when the model has other work (a busy
        model makes requests wait anyway). Called with the lock held.
        """
        taken: list[list[_BatchItem[Any]]] = []
        next_due = float("inf")
        limit = self._oom_batch.limit
        for key in list(self._batches):
            queue = self._batches[key]
            total = sum(item.weight for item in queue)
            due_at = queue[0].submitted + self.max_batch_delay
            if idle and total < limit and now < due_at:
                next_due = min(next_due, due_at)
                continue
            batch = [queue.popleft()]
            size = batch[0].weight
            while queue and size + queue[0].weight <= limit:
                size += queue[0].weight
                batch.append(queue.popleft())
            if not queue:
                del self._batches[key]
            taken.append(batch)
        return taken, next_due

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    while self._waiting and len(self._active) < self._oom_active.limit:
                        self._active.append(self._waiting.popleft())
                    dropped = [j for j in self._active if j.cancelled]
                    for job in dropped:
                        self._active.remove(job)
                    steps: list[_StepJob[Any]] = []
                    prefills: list[_Sequence] = []
                    decodes: list[_Sequence] = []
                    budget = PREFILL_TOKENS_PER_ROUND
                    for job in self._active:
                        if isinstance(job, _Sequence) and not job.prefilled:
                            if budget > 0 or not prefills:
                                prefills.append(job)
                                budget -= max(1, job.prompt_tokens)
                        elif job.unread >= self.buffer:
                            continue  # its reader is behind: it waits, the others go on
                        elif isinstance(job, _Sequence):
                            decodes.append(job)
                        else:
                            assert isinstance(job, _StepJob)
                            steps.append(job)
                    # Dropping a job is bookkeeping, not model work: it does not make
                    # the model busy, so a lone request still waits for stragglers.
                    busy = bool(steps or prefills or decodes)
                    now = time.perf_counter()
                    batches, next_due = self._take_batches(now, idle=not busy)
                    if busy or batches or dropped:
                        break
                    if self._closed and not self._active:
                        return
                    self._wake.wait(None if next_due == float("inf") else next_due - now)
            self._drop(dropped)
            for batch in batches:
                self._run_batch(batch)
            self._step(steps)
            self._prefill(prefills)
            self._decode(decodes)

    def _drop(self, dropped: list[Job[Any]]) -> None:
        for job in dropped:
            if isinstance(job, _StepJob):
                job._close()
            elif isinstance(job, _Sequence) and job.prefilled:
                self._release(job)

    def _release(self, job: _Sequence) -> None:
        assert self.decoder is not None
        try:
            self.decoder.release(job.state)
        except Exception:  # a model failing to free a sequence changes nothing for the caller
            pass

    def _run_batch(self, batch: list[_BatchItem[Any]]) -> None:
        live = [item for item in batch if not item.cancelled]
        if not live:
            return
        for item in live:
            self._observe_queue(item)
        self._meter.batched(self.name, live[0].kind, sum(item.weight for item in live))
        out: list[_Delivery] = []
        try:
            results = live[0].run_batch([item.payload for item in live])
            if len(results) != len(live):
                raise RuntimeError(f"a batch of {len(live)} requests gave {len(results)} results")
        except Exception as exc:  # the model failed: every request of the batch ends with it
            size = sum(item.weight for item in live)
            error = self._failed(exc, self._oom_batch, size, "batched items", live[0])
            out.extend((item, _ERROR, error) for item in live)
        else:
            self._oom_batch.went_well(sum(item.weight for item in live))
            for item, result in zip(live, results, strict=True):
                out.append((item, _ITEM, result))
                out.append((item, _DONE, None))
        self._finish(list(live))
        self._deliver(out)

    def _step(self, steps: list[_StepJob[Any]]) -> None:
        requests = sum(1 for job in steps if job.request and not job.cancelled)
        failed_before = self._oom_active.halvings
        for job in steps:
            if job.cancelled:
                continue
            out: list[_Delivery] = []
            more = job._step(out)
            if not more:
                self._finish([job])
            self._deliver(out)
        if requests and self._oom_active.halvings == failed_before:
            self._oom_active.went_well(requests)

    def _prefill(self, prefills: list[_Sequence]) -> None:
        if not prefills:
            return
        decoder = self.decoder
        assert decoder is not None
        for job in prefills:
            if job.cancelled:
                continue
            self._observe_queue(job)
            out: list[_Delivery] = []
            if job.stop.is_set():
                out.append((job, _ITEM, job.assembly.cancel()))
            else:
                try:
                    job.state, token = decoder.prefill(job.text, job.params)
                except Exception as exc:
                    # A prefill runs alone: out of memory, fewer sequences at once would
                    # not help it (its prompt's length decides): no back-off.
                    error = self._failed(exc, None, 1, "prompt", job)
                    self._finish([job])
                    self._deliver([(job, _ERROR, error)])
                    continue
                job.prefilled = True
                out.append((job, _ITEM, job.assembly.push(token)))
            if job.assembly.done:
                self._end(job, out)
            self._deliver(out)

    def _decode(self, decodes: list[_Sequence]) -> None:
        out: list[_Delivery] = []
        stepping: list[_Sequence] = []
        for job in decodes:
            if job.cancelled:
                continue
            if job.stop.is_set():
                out.append((job, _ITEM, job.assembly.cancel()))
                self._end(job, out)
            else:
                stepping.append(job)
        if stepping:
            assert self.decoder is not None
            self._meter.batched(self.name, "generate", len(stepping))
            try:
                tokens = self.decoder.step([job.state for job in stepping])
                if len(tokens) != len(stepping):
                    raise RuntimeError(
                        f"a decode step of {len(stepping)} sequences gave {len(tokens)} tokens"
                    )
            except Exception as exc:  # the model failed: every sequence in the step ends
                error = self._failed(exc, self._oom_active, len(stepping), "sequences", job)
                for job in stepping:
                    self._release(job)
                    out.append((job, _ERROR, error))
                self._finish(list(stepping))
            else:
                self._oom_active.went_well(len(stepping))
                for job, token in zip(stepping, tokens, strict=True):
                    out.append((job, _ITEM, job.assembly.push(token)))
                    if job.assembly.done:
                        self._end(job, out)
        self._deliver(out)

    def _failed(
        self, error: Exception, backoff: _Backoff | None, size: int, unit: str, job: Job[Any]
    ) -> Exception:
        """What the requests of a round of ``size`` ``unit`` that raised ``error`` get:
        :class:`OutOfMemory` when the device (or the CPU allocator) ran out of memory, with
        ``backoff`` halved and the device's cached blocks given back; :class:`Unavailable`
        when the device failed for good (a CUDA error), the runtime told (on ``job``'s
        loop) to turn the model FAILED; else ``error`` itself."""
        if _is_out_of_memory(error):
            # The failed round's tensors live on in the traceback's frames: let them go
            # before the cached blocks are given back.
            if error.__traceback__ is not None:
                traceback.clear_frames(error.__traceback__)
            _empty_device_cache()
            if backoff is None:
                message = f"model {self.name!r} ran out of memory for one {unit}; retry"
            else:
                limit = backoff.halve(size)
                message = (
                    f"model {self.name!r} ran out of memory with {size} {unit} at once; it "
                    f"now takes at most {limit} at once; retry"
                )
            log.warning("%s (%s)", message, error)
            return OutOfMemory(message, retry_after=1.0)
        if _is_device_failure(error):
            if not self._device_failed:
                self._device_failed = True
                log.error("model %r: its device failed: %s", self.name, error)
                if self.on_device_failure is not None:
                    job._loop.call_soon_threadsafe(self.on_device_failure, error)
            return Unavailable(
                f"model {self.name!r} cannot serve: its device failed ({error}); it serves "
                "again once it is loaded again"
            )
        return error

    def _end(self, job: _Sequence, out: list[_Delivery]) -> None:
        """A sequence's last chunk is in ``out``: end its stream and free its place."""
        out.append((job, _DONE, None))
        if job.prefilled:
            self._release(job)
        self._finish([job])


class _Backoff:
    """A limit (batch size, sequences at once) that out-of-memory errors halve and
    good rounds restore: doubled after ``OOM_RECOVERY`` of them, up to ``ceiling``."""

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self.limit = ceiling
        self.halvings = 0
        self._good = 0

    def halve(self, size: int) -> int:
        """The new limit after ``size`` things at once did not fit: half of that."""
        self.limit = max(1, min(self.limit, size // 2))
        self.halvings += 1
        self._good = 0
        return self.limit

    def went_well(self, size: int) -> None:
        """A round of ``size`` went well: it counts when it ran at the limit."""
        if self.limit >= self.ceiling or size < self.limit:
            return
        self._good += 1
        if self._good >= OOM_RECOVERY:
            self.limit, self._good = min(self.ceiling, self.limit * 2), 0
            log.info("batch limit raised back to %d", self.limit)


def _is_out_of_memory(error: BaseException) -> bool:
    """A device out of memory (torch's ``OutOfMemoryError``, CUDA or other), or the CPU
    allocator's failure (a RuntimeError that says so), or Python's MemoryError."""
    if isinstance(error, MemoryError):
        return True
    import torch  # the model's worker has it loaded

    if isinstance(error, torch.OutOfMemoryError):
        return True
    # cuBLAS's and cuDNN's allocation failures say so in their own words.
    words = ("out of memory", "can't allocate memory", "ALLOC_FAILED", "NOT_ENOUGH_WORKSPACE")
    return isinstance(error, RuntimeError) and any(w in str(error) for w in words)


def _is_device_failure(error: BaseException) -> bool:
    """A CUDA (or other accelerator) error, after which the device's context is not to be
    trusted: torch's ``AcceleratorError`` (torch 2.8 and later), or a RuntimeError that
    begins "CUDA error" (earlier ones). An out-of-memory error is not one."""
    import torch

    accelerator = getattr(torch, "AcceleratorError", None)
    if accelerator is not None and isinstance(error, accelerator):
        return True
    return isinstance(error, RuntimeError) and str(error).startswith("CUDA error")


def _empty_device_cache() -> None:
    """Give the blocks torch's CUDA allocator keeps cached back to the device, so the
    next, smaller, batch finds them."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.empty_cache()


def _post(deliveries: list[_Delivery]) -> None:
    for job, kind, value in deliveries:
        job._out.append((kind, value))
        waiter = job._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
