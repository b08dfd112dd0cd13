"""The worker's view of "idle": what lets a lone request wait for its batch to fill.

A batch that is not full waits ``max_batch_delay`` for stragglers only while the
model has nothing else to do. Work that has ended, and jobs whose callers left,
must not count as something to do: CI once saw a request that followed the
model's loading go alone, because the loading job was still on the worker's
books for one more round.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from protoserve.server.runtime.scheduler import Scheduler
from tests._observe import WITHIN, wait_until_async


@contextlib.contextmanager
def gil_contention(threads: int = 2) -> Iterator[None]:
    """Threads that keep the GIL busy, as a loaded server's do.

    They make the event loop and the worker thread interleave in every order,
    which is what exposed the race.
    """
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    spinners = [threading.Thread(target=spin, daemon=True) for _ in range(threads)]
    for spinner in spinners:
        spinner.start()
    try:
        yield
    finally:
        stop.set()
        for spinner in spinners:
            spinner.join()


def on_scheduler(body: Callable[[Scheduler], Awaitable[None]], **settings: Any) -> None:
    """Run ``body`` with a scheduler of ``settings``, closed afterwards."""

    async def main() -> None:
        scheduler = Scheduler("m", **settings)
        try:
            await body(scheduler)
        finally:
            scheduler.close()

    asyncio.run(asyncio.wait_for(main(), 120))


async def two_requests(scheduler: Scheduler, i: int) -> list[list[str]]:
    """Two one-item batch requests, the second once the first is queued; the model calls
    that served them."""
    calls: list[list[str]] = []

    def run_batch(payloads: list[str]) -> list[str]:
        calls.append(list(payloads))
        return [p.upper() for p in payloads]

    first = asyncio.ensure_future(scheduler.run_batched("embed", (), f"a{i}", 1, run_batch))
    # A wrong worker sends the first request alone meanwhile; a right one holds it.
    await wait_until_async(lambda: scheduler.depth == 1 or calls, "the first request queued")
    assert calls == [], f"round {i}: a lone request went without waiting for its batch"
    second = scheduler.run_batched("embed", (), f"b{i}", 1, run_batch)
    assert await asyncio.wait_for(asyncio.gather(first, second), WITHIN) == [f"A{i}", f"B{i}"]
    return calls


#: Two items fill a batch, so a correct round ends as soon as the second request
#: arrives. The delay (an hour) is never reached: the first request waits for the
#: second whatever the machine's speed.
PAIRS = {"max_batch_size": 2, "max_batch_delay": 3600}


def test_a_one_off_job_has_left_the_model_when_its_caller_has_its_result() -> None:
    async def body(scheduler: Scheduler) -> None:
        with gil_contention():
            for i in range(50):
                assert await scheduler.run(lambda i=i: i * 2) == i * 2
                assert scheduler.active == 0, f"round {i}: the job is still running"

    on_scheduler(body)


def test_a_lone_request_after_a_one_off_job_waits_for_its_batch_to_fill() -> None:
    async def body(scheduler: Scheduler) -> None:
        with gil_contention():
            for i in range(25):
                await scheduler.run(lambda: None, request=False)  # as loading does
                assert await two_requests(scheduler, i) == [[f"a{i}", f"b{i}"]], f"round {i}"

    on_scheduler(body, **PAIRS)


def test_a_job_whose_caller_left_does_not_keep_the_model_busy() -> None:
    def endless() -> Iterator[int]:
        n = 0
        while True:
            n += 1
            yield n

    async def body(scheduler: Scheduler) -> None:
        for i in range(10):
            job = scheduler.submit(endless)
            # Unread items pause the job once its buffer is full; then its reader leaves.
            await wait_until_async(
                lambda job=job: job.unread >= scheduler.buffer,  # type: ignore[misc]
                "the buffer full",
            )
            job.cancel()
            assert await two_requests(scheduler, i) == [[f"a{i}", f"b{i}"]], f"round {i}"
            assert scheduler.active == 0

    on_scheduler(body, buffer=2, **PAIRS)
