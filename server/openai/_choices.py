"""Running a request's choices at once: ``n`` generations (times the prompts) as one.

OpenAI's ``n`` (and a list of prompts) asks for several independent answers to one
request. Each is its own generation in the runtime, so continuous batching decodes
them together; here they become one result, or one stream, that succeeds or fails
as a whole: the first choice to fail ends the request with its error and cancels
the others at once, and a caller that leaves cancels them all (docs/architecture.md,
rule 6). Nothing here knows gRPC or OpenAI.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["gather_choices", "merge_choices"]

T = TypeVar("T")


async def gather_choices(runs: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Every run's result, in order; the runs go at once.

    Raises:
        The first error of a run, once the others are cancelled and have unwound
        (their generations left the batch). Cancelling the caller cancels every run.
    """
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(run) for run in runs]
    except BaseExceptionGroup as failed:
        # The one the caller should see: the first to fail. The others, if any, failed
        # alike at the same time (every choice is checked the same way).
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


@dataclass(frozen=True)
class _Item(Generic[T]):
    index: int
    item: T


@dataclass(frozen=True)
class _Ended:
    index: int


@dataclass(frozen=True)
class _Failed:
    error: Exception


async def merge_choices(
    streams: Sequence[AsyncGenerator[T, None]],
) -> AsyncGenerator[tuple[int, T], None]:
    """Each stream's items as they come, with the stream's index; each stream's in order.

    The streams are read at once, each by a task of its own, through a queue that
    holds at most as many items as there are streams: a slow reader holds the streams
    back (and the runtime then holds their generations back) rather than items piling
    up here. A stream ends by returning or raising an Exception (the runtime's never
    raises a CancelledError of its own); only the merge cancels its readers.

    Raises:
        The first error of a stream, after cancelling the others. Closing the merge
        (the caller left) cancels every stream still going; either way each stream
        is closed, and its generation has left the batch, before this returns.
    """
    queue: asyncio.Queue[_Item[T] | _Ended | _Failed] = asyncio.Queue(maxsize=max(len(streams), 1))

    async def read(index: int, stream: AsyncGenerator[T, None]) -> None:
        try:
            async with contextlib.aclosing(stream) as items:
                async for item in items:
                    await queue.put(_Item(index, item))
        except Exception as error:  # the caller's to raise; a cancellation is not
            await queue.put(_Failed(error))
        else:
            await queue.put(_Ended(index))

    readers = [asyncio.create_task(read(i, s)) for i, s in enumerate(streams)]
    try:
        going = len(readers)
        while going:
            got = await queue.get()
            if isinstance(got, _Failed):
                raise got.error
            if isinstance(got, _Ended):
                going -= 1
                continue
            yield got.index, got.item
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
