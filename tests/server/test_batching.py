"""Dynamic batching (Embed, Predict) and continuous batching (generation), seen from the runtime.

The runtime is the transport-independent core every servicer calls; these tests
drive it directly with real models and watch what the model was asked to do.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
import torch

from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from protoserve.server import ResourceExhausted
from protoserve.server.metrics import Metrics
from protoserve.server.runtime import FinishReason, Runtime
from protoserve.server.runtime.tensors import RawTensor, from_raw, to_raw
from tests._observe import WITHIN, counted, wait_until, wait_until_async
from tests._threads import start_grpc_server, stop_grpc_server
from tests.server._runtime import run, started
from tests.server.models_for_tests import (
    BatchDoubler,
    Batched,
    BatchEmbedder,
    HeldEmbedder,
    LetterDecoder,
    OutOfRoom,
    Scripted,
    WrongRows,
)


def gen(max_new_tokens: int = 20, seed: int = 1, **more: Any) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "seed": seed, **more}


async def collect(runtime: Runtime, model: str, text: str, parameters: dict[str, Any]) -> Any:
    result = await runtime.generate(model, text, parameters)
    return result.text, result.token_ids, result.finish_reason


# Dynamic batching: Embed.
REQUESTS = [[f"text {i} " * (i % 4 + 1)] for i in range(20)] + [["a", "bb", "ccc"]]


def test_concurrent_embeds_share_model_calls_and_equal_their_alone_results() -> None:
    async def main() -> None:
        async with started(BatchEmbedder()) as runtime:
            alone = [(await runtime.embed("batch-embedder", texts))[0] for texts in REQUESTS]
            BatchEmbedder.calls.clear()
            results = await asyncio.gather(
                *(runtime.embed("batch-embedder", texts) for texts in REQUESTS)
            )
            calls = list(BatchEmbedder.calls)
        assert len(calls) < len(REQUESTS) / 2, calls
        assert max(len(c) for c in calls) <= BatchEmbedder.max_batch_size
        # Every text was embedded exactly once, and each caller got its own rows.
        assert sorted(t for c in calls for t in c) == sorted(t for r in REQUESTS for t in r)
        for (vectors, usage), expected, texts in zip(results, alone, REQUESTS, strict=True):
            assert torch.equal(vectors, expected)
            assert vectors.shape[0] == len(texts)
            assert usage.prompt_tokens == sum(len(t.encode()) for t in texts)

    run(main())


def test_batching_off_makes_one_model_call_per_request() -> None:
    async def main() -> None:
        async with started(BatchEmbedder(), batching=False) as runtime:
            BatchEmbedder.calls.clear()
            await asyncio.gather(*(runtime.embed("batch-embedder", t) for t in REQUESTS))
        assert sorted(BatchEmbedder.calls) == sorted(REQUESTS)

    run(main())


def test_an_idle_model_waits_for_stragglers_but_a_full_batch_goes_at_once() -> None:
    async def main() -> None:
        # An hour's delay: the first request waits for company, which fills the batch,
        # and the full batch goes at once instead of waiting out the hour.
        async with started(BatchEmbedder(), max_batch_delay=3600) as runtime:
            scheduler = runtime.get_model("batch-embedder").scheduler
            BatchEmbedder.calls.clear()
            first = asyncio.ensure_future(runtime.embed("batch-embedder", ["first"]))
            await wait_until_async(lambda: scheduler.depth == 1, "the first request queued")
            assert BatchEmbedder.calls == []
            rest = [str(i) for i in range(BatchEmbedder.max_batch_size - 1)]
            await asyncio.gather(first, runtime.embed("batch-embedder", rest))
            assert BatchEmbedder.calls == [["first", *rest]]
        # A batch that never fills goes when its delay is up.
        async with started(BatchEmbedder(), max_batch_delay=0.05) as runtime:
            BatchEmbedder.calls.clear()
            await runtime.embed("batch-embedder", ["lone"])
            assert BatchEmbedder.calls == [["lone"]]

    run(main())


def test_a_request_larger_than_the_batch_runs_alone_and_whole() -> None:
    async def main() -> None:
        async with started(BatchEmbedder(), max_batch_size=2) as runtime:
            BatchEmbedder.calls.clear()
            texts = ["a", "b", "c", "d", "e"]
            vectors, _ = await runtime.embed("batch-embedder", texts)
        assert BatchEmbedder.calls == [texts] and vectors.shape[0] == 5

    run(main())


def test_a_cancelled_request_leaves_the_queue_before_its_batch_runs() -> None:
    async def main() -> None:
        HeldEmbedder.entered.clear()
        HeldEmbedder.resume.clear()
        async with started(HeldEmbedder()) as runtime:
            scheduler = runtime.get_model("held-embedder").scheduler
            HeldEmbedder.calls.clear()
            busy = asyncio.ensure_future(runtime.embed("held-embedder", ["busy"] * 8))
            try:
                assert await asyncio.to_thread(HeldEmbedder.entered.wait, WITHIN)
                # The model is in its call: the next request waits in the queue.
                doomed = asyncio.ensure_future(runtime.embed("held-embedder", ["doomed"]))
                await wait_until_async(lambda: scheduler.depth == 1, "the request queued")
                doomed.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await doomed
                assert scheduler.depth == 0
            finally:
                HeldEmbedder.resume.set()
            await busy
            await runtime.embed("held-embedder", ["after"])
        assert HeldEmbedder.calls == [["busy"] * 8, ["after"]]

    run(main())


# Dynamic batching: Predict.
def rows(n: int, width: int, start: float) -> list[RawTensor]:
    x = torch.arange(n * width, dtype=torch.float32).reshape(n, width) + start
    return [to_raw("x", x)]


def test_predict_joins_requests_of_the_same_shape_and_splits_the_outputs() -> None:
    requests = [rows(1, 3, 0), rows(2, 3, 10), rows(3, 3, 100), rows(2, 4, 7), rows(1, 3, -5)]

    async def main() -> None:
        async with started(BatchDoubler()) as runtime:
            alone = [await runtime.predict("batch-doubler", r, {}) for r in requests]
            BatchDoubler.calls.clear()
            together = await asyncio.gather(
                *(runtime.predict("batch-doubler", r, {}) for r in requests)
            )
            calls = list(BatchDoubler.calls)
            # Different parameters are a different batch too.
            tripled = await asyncio.gather(
                runtime.predict("batch-doubler", requests[0], {"factor": 3.0}),
                runtime.predict("batch-doubler", requests[0], {}),
            )
        # Width 3 (7 rows in 4 requests) and width 4 (2 rows) cannot share a call;
        # every row was computed once, in fewer calls than requests.
        assert len(calls) < len(requests)
        assert sum(n for n, width in calls if width == 3) == 7
        assert [n for n, width in calls if width == 4] == [2]
        for got, want in zip(together, alone, strict=True):
            assert [t.name for t in got] == ["y", "rowsum"]
            for g, w in zip(from_raw(got).values(), from_raw(want).values(), strict=True):
                assert torch.equal(g, w)
        x = from_raw(requests[0])["x"]
        assert torch.equal(from_raw(tripled[0])["y"], x * 3)
        assert torch.equal(from_raw(tripled[1])["y"], x * 2)

    run(main())


def test_a_model_that_breaks_its_batch_promise_fails_the_batch_clearly() -> None:
    async def main() -> None:
        async with started(WrongRows()) as runtime:
            outcomes = await asyncio.gather(
                runtime.predict("wrong-rows", rows(2, 3, 0), {}),
                runtime.predict("wrong-rows", rows(3, 3, 0), {}),
                return_exceptions=True,
            )
        for outcome in outcomes:
            assert isinstance(outcome, RuntimeError)
            assert "predict_batches" in str(outcome)

    run(main())


# Continuous batching.
PROMPTS = [
    ("def main():", gen(30, seed=1)),
    ("import os", gen(12, seed=2)),
    ("class A:", gen(25, seed=3, stop_sequences=["j"])),
    ("end 7", gen(40, seed=4)),
    ("", gen(18, seed=5)),
    ("return x", gen(30, seed=1)),
]


def decoder() -> LetterDecoder:
    return Batched.decoders[-1]


def test_concurrent_generations_decode_together_and_equal_their_alone_results() -> None:
    async def main() -> None:
        async with started(Batched()) as runtime:
            alone = [await collect(runtime, "batched", t, p) for t, p in PROMPTS]
            assert set(decoder().steps) == {1}  # one at a time: every step had one sequence
            decoder().steps.clear()
            together = await asyncio.gather(
                *(collect(runtime, "batched", t, p) for t, p in PROMPTS)
            )
            steps = list(decoder().steps)
            assert not decoder().live  # every sequence was released
        assert together == alone
        assert max(steps) == len(PROMPTS)
        # Fewer steps than tokens: that is what batching buys.
        assert len(steps) < sum(len(ids) for _, ids, _ in together) / 2
        reasons = {finish for _, _, finish in together}
        assert reasons == {
            FinishReason.LENGTH,
            FinishReason.END_OF_TEXT,
            FinishReason.STOP_SEQUENCE,
        }

    run(main())


def test_a_new_sequence_joins_at_a_step_boundary_without_disturbing_the_others() -> None:
    async def main() -> None:
        async with started(Batched()) as runtime:
            long_alone = await collect(runtime, "batched", "long", gen(120, seed=9))
            short_alone = await collect(runtime, "batched", "short", gen(10, seed=8))
            scheduler = runtime.get_model("batched").scheduler
            # However far its reader lags, neither sequence pauses: every step decodes both.
            scheduler.buffer = 1000
            decoder().steps.clear()
            # The worker holds still in the long one's 21st step while the short one queues.
            decoder().hold_at = 20
            long_task = asyncio.ensure_future(collect(runtime, "batched", "long", gen(120, seed=9)))
            try:
                assert await asyncio.to_thread(decoder().held.wait, WITHIN)
                short_task = asyncio.ensure_future(
                    collect(runtime, "batched", "short", gen(10, seed=8))
                )
                await wait_until_async(lambda: scheduler.depth == 1, "the short one queued")
            finally:
                decoder().resume.set()
            short = await short_task
            long = await long_task
            steps = list(decoder().steps)
        assert (long, short) == (long_alone, short_alone)
        # Alone for 21 steps and more, then two at once while the short one ran (its
        # first token comes from its prefill, nine more from steps), then alone again.
        joined = steps.index(2)
        assert joined > 20 and set(steps[:joined]) == {1}
        assert steps[joined : joined + 9] == [2] * 9 and set(steps[joined + 9 :]) == {1}

    run(main())


def test_a_burst_of_new_requests_is_prefilled_over_several_steps() -> None:
    async def main() -> None:
        async with started(Batched()) as runtime:
            running = runtime.generate_stream("batched", "running", gen(200))
            await anext(running)
            decoder().events.clear()
            # Six 300-token prompts: at most 512 prompt tokens are prefilled between steps.
            burst = [collect(runtime, "batched", "x" * 300, gen(3, seed=i)) for i in range(6)]
            await asyncio.gather(*burst)
            await running.aclose()
            events = decoder().events
        assert events.count("prefill") == 6
        runs = "".join("p" if e == "prefill" else "s" for e in events).split("s")
        assert max(len(run) for run in runs) == 2, events

    run(main())


def test_a_cancelled_stream_leaves_the_batch_within_one_step() -> None:
    async def main() -> None:
        async with started(Batched()) as runtime:
            keep = runtime.generate_stream("batched", "keep", gen(300, seed=1))
            drop = runtime.generate_stream("batched", "drop", gen(300, seed=2))
            await anext(keep)
            await anext(drop)
            while 2 not in decoder().steps:
                await anext(keep)
                await anext(drop)
            await drop.aclose()
            cancelled_at = len(decoder().steps)
            # Read on until steps were taken after the cancel (not only tokens buffered before).
            while len(decoder().steps) < cancelled_at + 10:
                await anext(keep)
            after = decoder().steps[cancelled_at + 1 :]
            assert after and set(after) == {1}, decoder().steps[cancelled_at - 3 :]
            assert len(decoder().live) == 1  # the dropped one was freed by the worker
            await keep.aclose()

    run(main())


def test_shutdown_ends_batched_generations_with_cancelled() -> None:
    async def main() -> None:
        async with started(Batched()) as runtime:
            stream = runtime.generate_stream("batched", "x", gen(1000))
            chunks = [await anext(stream)]
            runtime.stop_generations()
            chunks += [c async for c in stream]
        assert chunks[-1].finish_reason is FinishReason.CANCELLED
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens < 1000

    run(main())


def test_a_decoder_without_generate_still_serves_with_batching_off() -> None:
    async def main() -> None:
        async with started(Batched()) as runtime:
            batched = [await collect(runtime, "batched", t, p) for t, p in PROMPTS]
        async with started(Batched(), batching=False) as runtime:
            unbatched = [await collect(runtime, "batched", t, p) for t, p in PROMPTS]
        assert batched == unbatched

    run(main())


# Limits.
def test_a_model_that_refuses_for_want_of_room_counts_as_a_rejection() -> None:
    # RESOURCE_EXHAUSTED from the model itself (out of memory, say) is the model at
    # capacity too: the caller gets it as raised, and protoserve_rejections counts it.
    async def main() -> None:
        async with started(OutOfRoom(), metrics=Metrics()) as runtime:
            with pytest.raises(ResourceExhausted, match="no room for this batch"):
                await runtime.embed("out-of-room", ["a"])
            assert counted(runtime, "protoserve_rejections_total", model="out-of-room") == 1

    run(main())


def test_streams_beyond_max_streams_are_refused_at_once() -> None:
    async def main() -> None:
        async with started(Scripted(), max_streams=1, metrics=Metrics()) as runtime:
            Scripted.delay = 0.01
            try:
                first = runtime.generate_stream("scripted", "x", gen(30))
                await anext(first)
                second = runtime.generate_stream("scripted", "x", gen(30))
                # Refused while the first still streams, and counted as a rejection.
                with pytest.raises(ResourceExhausted, match="streams in flight"):
                    await anext(second)
                assert counted(runtime, "protoserve_rejections_total", model="scripted") == 1
                assert (await anext(first)).token_ids
                await first.aclose()
                # Room again once the first stream ended.
                third = runtime.generate_stream("scripted", "x", gen(2))
                assert [c async for c in third][-1].finish_reason is FinishReason.LENGTH
            finally:
                Scripted.delay = 0.0

    run(main())


def test_a_deadline_takes_a_sequence_out_of_the_running_batch() -> None:
    thread, server = start_grpc_server(["tests.server.models_for_tests:Batched"])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            request = pb.GenerateRequest(
                model="batched",
                inputs="forever",
                parameters=pb.GenerationParameters(max_new_tokens=1000),
            )
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(request, timeout=0.3)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        decoder = Batched.decoders[-1]
        scheduler = server.runtime.get_model("batched").scheduler
        wait_until(lambda: not decoder.live, "the timed-out sequence gave up its place")
        # Released, and off the worker's books: no step can follow. It stopped long
        # before its 1000 tokens.
        assert scheduler.active == 0
        assert 0 < len(decoder.steps) < 1000
    finally:
        stop_grpc_server(thread, server)
