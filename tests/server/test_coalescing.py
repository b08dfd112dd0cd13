"""A stream's reader that falls behind gets every token since its last read in one chunk.

The worker makes a chunk per token and delivers it at once. A reader that keeps up
reads each alone; one that lags (a slow client: its writes back up) reads, at its
next read, every chunk already delivered joined as one, so it catches up in one
message instead of paying a message per token. Nothing waits to be joined, and the
job's output stays bounded: ``buffer`` tokens unread pause the job, as before.

No test here depends on timing: the slow reader waits until the worker holds no
job (the generation made every token), the one that keeps up reads with a buffer
of one (the worker waits for it after every token).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import pytest

from protoserve.server.models.builtin import ByteLMModel
from protoserve.server.runtime import Chunk, FinishReason, Runtime
from protoserve.server.runtime.scheduler import Scheduler
from tests._observe import WITHIN, wait_until_async
from tests.server._runtime import run, started
from tests.server.models_for_tests import Batched, LetterDecoder

#: Twelve tokens, fewer than the scheduler's default buffer (16): a reader that
#: never reads does not pause this generation before it ends.
PARAMS = {"max_new_tokens": 12, "seed": 7, "top_k": 20}
PROMPT = "def "

#: Continuous batching (a job per sequence) and one sequence at a time (a step job
#: over ``Model.generate``): both join their chunks.
BATCHING = [pytest.param(True, id="batched"), pytest.param(False, id="alone")]


def worker_idle(runtime: Runtime, model: str) -> bool:
    """The model's worker holds no job, waiting or running: every token was made."""
    scheduler = runtime.get_model(model).scheduler
    return scheduler.depth + scheduler.active == 0


async def keeping_up(
    runtime: Runtime, model: str, params: dict[str, Any], **more: Any
) -> list[Chunk]:
    """A stream read with a buffer of one: the worker makes no token before the reader
    has read the one before, so the reader keeps up whatever the machine's speed."""
    scheduler = runtime.get_model(model).scheduler
    buffer, scheduler.buffer = scheduler.buffer, 1
    try:
        return [c async for c in runtime.generate_stream(model, PROMPT, params, **more)]
    finally:
        scheduler.buffer = buffer


async def falling_behind(
    runtime: Runtime, model: str, params: dict[str, Any], **more: Any
) -> list[Chunk]:
    """A stream whose reader reads its first chunk, then stops reading until the
    generation has made every token (``resume`` set once the worker is idle)."""
    begun, resume = asyncio.Event(), asyncio.Event()
    stream = runtime.generate_stream(model, PROMPT, params, **more)

    async def reader(stream: AsyncGenerator[Chunk, None]) -> list[Chunk]:
        chunks = [await anext(stream)]
        begun.set()
        await resume.wait()
        chunks += [c async for c in stream]
        return chunks

    task = asyncio.ensure_future(reader(stream))
    try:
        await asyncio.wait_for(begun.wait(), WITHIN)
        await wait_until_async(lambda: worker_idle(runtime, model), "every token made")
        resume.set()
        return await task
    finally:
        task.cancel()


def joined(chunks: list[Chunk]) -> tuple[str, list[int], list[int]]:
    return (
        "".join(c.text for c in chunks),
        [i for c in chunks for i in c.token_ids],
        [t.id for c in chunks for t in c.logprobs],
    )


@pytest.mark.parametrize("batching", BATCHING)
def test_a_reader_that_keeps_up_gets_one_chunk_per_token(batching: bool) -> None:
    async def main() -> list[Chunk]:
        async with started(ByteLMModel(), batching=batching) as runtime:
            return await keeping_up(runtime, "bytelm", PARAMS, logprobs=1)

    chunks = run(main())
    assert chunks[-1].finish_reason is FinishReason.LENGTH, chunks[-1]
    assert [len(c.token_ids) for c in chunks] == [1] * PARAMS["max_new_tokens"]
    assert all([t.id for t in c.logprobs] == c.token_ids for c in chunks)
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("batching", BATCHING)
def test_a_reader_that_falls_behind_gets_the_tokens_it_missed_in_one_chunk(
    batching: bool,
) -> None:
    async def main() -> tuple[list[Chunk], list[Chunk]]:
        async with started(ByteLMModel(), batching=batching) as runtime:
            slow = await falling_behind(runtime, "bytelm", PARAMS, logprobs=2)
            fast = await keeping_up(runtime, "bytelm", PARAMS, logprobs=2)
            return slow, fast

    slow, fast = run(main())
    tokens = PARAMS["max_new_tokens"]
    assert len(fast) == tokens
    # The first chunk alone (it was asked for before any other was made), then
    # what was delivered while the reader waited: at most two reads, however the
    # worker's last delivery and the reader's first read after waiting interleave.
    assert 2 <= len(slow) <= 3 < tokens, [len(c.token_ids) for c in slow]
    assert len(slow[0].token_ids) == 1
    # The same generation, read either way: text, ids, log probabilities, ending.
    assert joined(slow) == joined(fast)
    assert slow[-1].finish_reason is fast[-1].finish_reason is FinishReason.LENGTH
    assert slow[-1].usage == fast[-1].usage and slow[-1].usage is not None
    assert slow[-1].usage.completion_tokens == tokens
    assert all(c.finish_reason is None and c.usage is None for c in slow[:-1])
    # Each chunk's log probabilities are its own tokens', in order.
    for chunk in slow:
        assert [t.id for t in chunk.logprobs] == chunk.token_ids
    pairs = zip(
        (t for c in slow for t in c.logprobs), (t for c in fast for t in c.logprobs), strict=True
    )
    for a, b in pairs:
        assert a.logprob is not None and b.logprob is not None
        assert math.isclose(a.logprob, b.logprob, abs_tol=1e-5)
        assert [c.id for c in a.top_logprobs] == [c.id for c in b.top_logprobs]


def test_the_generate_call_is_the_same_whether_its_chunks_were_joined_or_not() -> None:
    async def main() -> tuple[Any, list[Chunk]]:
        async with started(ByteLMModel()) as runtime:
            whole = await runtime.generate("bytelm", PROMPT, PARAMS)
            return whole, await falling_behind(runtime, "bytelm", PARAMS)

    whole, slow = run(main())
    text, ids, _ = joined(slow)
    assert (text, ids) == (whole.text, whole.token_ids)
    assert (slow[-1].finish_reason, slow[-1].usage) == (whole.finish_reason, whole.usage)


def test_a_reader_that_never_reads_pauses_its_generation_at_buffer_tokens() -> None:
    """Joined reads keep the bound: unread tokens (not messages) pause the job."""
    buffer = 4
    other_tokens = 30

    def decoder() -> LetterDecoder:
        return Batched.decoders[-1]

    async def main() -> None:
        async with started(Batched()) as runtime:
            alone = await runtime.generate("batched", "lagging", {"max_new_tokens": 40})
            runtime.get_model("batched").scheduler.buffer = buffer
            decoder().steps.clear()
            stream = runtime.generate_stream("batched", "lagging", {"max_new_tokens": 40})
            first = len((await anext(stream)).token_ids)  # its prefill, and what followed
            # The reader reads no more: the job makes `buffer` tokens past what it
            # read (its first came from the prefill), then sits out.
            paused_at = buffer + first - 1
            await wait_until_async(lambda: sum(decoder().steps) >= paused_at, "the buffer full")
            # Another generation runs to its end meanwhile: every step is its alone.
            other = await runtime.generate("batched", "other", {"max_new_tokens": other_tokens})
            assert len(other.token_ids) == other_tokens
            assert sum(decoder().steps) == paused_at + other_tokens - 1, decoder().steps
            # Its next read is every token it was behind on, in one chunk.
            caught_up = await anext(stream)
            assert len(caught_up.token_ids) == buffer
            # Those `buffer` tokens count as read: the job makes `buffer` more, not fewer,
            # before it pauses again, and they too come in one read.
            steps = paused_at + other_tokens - 1
            await wait_until_async(
                lambda: sum(decoder().steps) >= steps + buffer, "the buffer full again"
            )
            assert len((await anext(stream)).token_ids) == buffer
            rest = [c async for c in stream]
            ids = [i for c in rest for i in c.token_ids]
            got = first + 2 * buffer + len(ids)
            assert got == len(alone.token_ids) == 40
            assert rest[-1].finish_reason is FinishReason.LENGTH

    run(main())


def test_results_of_other_work_are_read_one_by_one_however_far_behind() -> None:
    """Only a generation's chunks join; a step job's items stay one per read."""

    def items() -> Iterator[int]:
        yield from range(5)

    async def main() -> None:
        scheduler = Scheduler("m", buffer=100)
        try:
            job = scheduler.submit(items)
            # Five items and the end, all delivered before the first read.
            await wait_until_async(lambda: job.unread == 6, "every item delivered")
            assert [item async for item in job] == [0, 1, 2, 3, 4]
            assert job.unread == 0
        finally:
            scheduler.close()

    run(main())
