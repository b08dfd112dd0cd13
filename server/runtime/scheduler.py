"""A model's worker thread: bounded queue in, one step at a time, results out to asyncio.

The event loop never runs a model. Request handlers submit a *job* (a
function that returns an iterator; each ``next()`` is one step of model work)
and await its items. The worker thread owns the model: it admits up to
``max_active`` jobs and steps them round-robin, so a long generation never
starves a short one, and a cancelled job is dropped before its next step.

Every queue is bounded: the admission queue by ``max_queue`` (a full queue
raises ResourceExhausted at once), and each job's output by ``buffer`` items
(a slow reader pauses its own job, not the others).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Generic, TypeVar

from protoserve.server.errors import ResourceExhausted, Unavailable

__all__ = ["Job", "Scheduler"]

T = TypeVar("T")

_ITEM, _DONE, _ERROR = range(3)


class Job(Generic[T]):
    """One submitted piece of work; iterate it (async) for its items."""

    def __init__(self, scheduler: Scheduler, factory: Callable[[], Iterator[T]]) -> None:
        self._scheduler = scheduler
        self._factory = factory
        self._iterator: Iterator[T] | None = None
        self._loop = asyncio.get_running_loop()
        self._out: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
        self.unread = 0  # items handed to the loop, not yet read; guarded by the scheduler lock
        self.cancelled = False
        self.finished = False
        #: Set by the server to end a generation early (it checks this between steps).
        self.stop = threading.Event()

    def cancel(self) -> None:
        """Drop the job: out of the queue if waiting, out of the batch before its next step."""
        self._scheduler._cancel(self)

    def __aiter__(self) -> AsyncIterator[T]:
        return self._items()

    async def _items(self) -> AsyncIterator[T]:
        while True:
            kind, value = await self._out.get()
            self._scheduler._consumed(self)
            if kind == _ITEM:
                yield value  # type: ignore[misc]
            elif kind == _DONE:
                return
            else:
                assert isinstance(value, BaseException)
                raise value

    # Worker-thread side.
    def _step(self) -> int:
        try:
            if self._iterator is None:
                self._iterator = iter(self._factory())
            item = next(self._iterator)
        except StopIteration:
            return self._deliver(_DONE, None)
        except Exception as exc:  # model code failed: the request ends with an error
            return self._deliver(_ERROR, exc)
        self._deliver(_ITEM, item)
        return _ITEM

    def _close(self) -> None:
        closer = getattr(self._iterator, "close", None)
        if closer is not None:
            try:
                closer()
            except Exception:  # a model failing while it is being closed changes nothing
                pass

    def _deliver(self, kind: int, value: object) -> int:
        with self._scheduler._lock:
            self.unread += 1
        try:
            self._loop.call_soon_threadsafe(self._out.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone: nobody is waiting any more
            self.cancelled = True
        return kind


class Scheduler:
    """Runs one model's jobs in its own thread; see the module docstring.

    Args:
        name: the model's name, for the thread's name and error messages.
        max_queue: most jobs waiting to start; beyond that, ResourceExhausted.
        max_active: most jobs stepped in turn at once.
        buffer: most unread items per job before its steps pause.
    """

    def __init__(self, name: str, *, max_queue: int = 64, max_active: int = 8, buffer: int = 16):
        self.name = name
        self.max_queue = max_queue
        self.max_active = max_active
        self.buffer = buffer
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[Job[object]] = deque()
        self._active: list[Job[object]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"model-{name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting to start."""
        return len(self._queue)

    @property
    def active(self) -> int:
        """Jobs being stepped."""
        return len(self._active)

    def submit(self, factory: Callable[[], Iterator[T]]) -> Job[T]:
        """Queue a job; raises ResourceExhausted at once when the queue is full."""
        job: Job[T] = Job(self, factory)
        with self._lock:
            if self._closed:
                raise Unavailable(f"model {self.name!r} is shutting down")
            # Free active slots count as room: the worker admits queued jobs only
            # between steps, and capacity must not depend on that timing.
            if len(self._queue) + len(self._active) >= self.max_queue + self.max_active:
                raise ResourceExhausted(
                    f"model {self.name!r} is at capacity: {len(self._active)} requests "
                    f"running and {len(self._queue)} queued; retry later",
                    retry_after=1.0,
                )
            self._queue.append(job)  # type: ignore[arg-type]
            self._wake.notify()
        return job

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` as one step in the worker thread and return its result."""
        job = self.submit(lambda: iter((fn(),)))
        try:
            async for item in job:
                return item
        finally:
            job.cancel()
        raise AssertionError("a one-step job ended without a result")

    async def stream(self, job: Job[T]) -> AsyncGenerator[T, None]:
        """The items of a submitted job; leaving early cancels it."""
        try:
            async for item in job:
                yield item
        finally:
            job.cancel()

    def request_stop(self) -> None:
        """Ask every job to end early (generations finish with CANCELLED)."""
        with self._lock:
            for job in (*self._queue, *self._active):
                job.stop.set()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker thread; jobs still waiting fail with UNAVAILABLE."""
        with self._lock:
            self._closed = True
            waiting = list(self._queue)
            self._queue.clear()
            self._wake.notify()
        for job in waiting:
            job._deliver(_ERROR, Unavailable(f"model {self.name!r} is shutting down"))
        self._thread.join(timeout)

    # Called from the event loop.
    def _cancel(self, job: Job[T]) -> None:
        with self._lock:
            if job.finished or job.cancelled:
                return
            job.cancelled = True
            if job in self._queue:
                self._queue.remove(job)  # type: ignore[arg-type]
            self._wake.notify()

    def _consumed(self, job: Job[T]) -> None:
        with self._lock:
            job.unread -= 1
            if job.unread == self.buffer - 1:
                self._wake.notify()

    # The worker thread.
    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    while self._queue and len(self._active) < self.max_active:
                        self._active.append(self._queue.popleft())
                    dropped = [j for j in self._active if j.cancelled]
                    for job in dropped:
                        self._active.remove(job)
                    runnable = [j for j in self._active if j.unread < self.buffer]
                    if runnable or dropped:
                        break
                    if self._closed and not self._active:
                        return
                    self._wake.wait()
            for job in dropped:
                job._close()
            for job in runnable:
                if job.cancelled:
                    continue
                if job._step() != _ITEM:
                    with self._lock:
                        job.finished = True
                        if job in self._active:
                            self._active.remove(job)
