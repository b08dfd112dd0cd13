"""The shutdown contract as the README promises it, for every kind of generation.

"A generation still running near the end of the grace is ended with
FINISH_REASON_CANCELLED and status OK" (README, "Shutdown"): the caller gets an
orderly last message with the usage of what was generated, never an error. Four
generations are in flight when the server stops: unary and streaming, on the step
path (a model's own ``generate`` iterator, here ``Slow``) and on bytelm's batched
decoding (continuous batching). Each runs far longer than the grace.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from protoserve.server.app import _STOP_MARGIN
from tests._observe import counted, wait_until
from tests._threads import start_grpc_server

#: The grace the stop is given: the runtime ends generations one second before it runs
#: out (server/app.py's _STOP_MARGIN), so here at once, while each is far from done: Slow
#: takes 20 ms a token for 1,000 tokens, bytelm (greedy from "def ", which runs to its
#: length) 2,048 tokens, which took 47 s on the 2-core machine this was written on.
GRACE = _STOP_MARGIN + 0.1
LONG = {"slow": 1000, "bytelm": 2048}


def _request(model: str) -> dict[str, Any]:
    params = pb.GenerationParameters(max_new_tokens=LONG[model], temperature=0.0, seed=1)
    return {"model": model, "inputs": "def ", "parameters": params}


@dataclass
class StreamCall:
    """A GenerateStream read in a thread: its messages, and the call's final status."""

    call: Any
    messages: list[pb.GenerateStreamResponse] = field(default_factory=list)
    error: grpc.RpcError | None = None
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for message in self.call:
                with self.arrived:
                    self.messages.append(message)
                    self.arrived.notify_all()
        except grpc.RpcError as exc:
            self.error = exc

    def wait_for(self, count: int) -> None:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.messages) >= count, timeout=60)
        assert len(self.messages) >= count, (len(self.messages), self.error)


@pytest.fixture
def draining() -> Iterator[tuple[Any, Any, pb_grpc.InferenceServiceStub]]:
    thread, server = start_grpc_server(
        ["bytelm", "tests.server.models_for_tests:Slow"], shutdown_grace=GRACE
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield thread, server, pb_grpc.InferenceServiceStub(channel)
    channel.close()
    thread.stop()


def test_generations_running_at_the_end_of_the_grace_end_cancelled_with_status_ok(
    draining: tuple[Any, Any, pb_grpc.InferenceServiceStub],
) -> None:
    thread, server, stub = draining
    decodings = {
        m.name: m.decoding for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models
    }
    # The two paths under test: bytelm's batched decode, Slow's own step iterator.
    assert decodings["bytelm"] == pb.DECODING_BATCHED
    assert decodings["slow"] == pb.DECODING_SEQUENTIAL

    def tokens(model: str) -> float:
        return counted(server, "protoserve_generated_tokens_total", model=model)

    unary: dict[str, Any] = {}
    streams: dict[str, StreamCall] = {}
    for model in ("slow", "bytelm"):
        # The unary call first, alone on its model, so that its tokens are the only ones
        # counted: it is running (not queued) once the counter moves.
        unary[model] = stub.Generate.future(pb.GenerateRequest(**_request(model)), timeout=60)
        wait_until(lambda m=model: tokens(m) >= 2, f"{model}'s unary call generates")
        streams[model] = StreamCall(
            stub.GenerateStream(pb.GenerateStreamRequest(**_request(model)), timeout=60)
        )
        streams[model].wait_for(2)

    stopped = asyncio.run_coroutine_threadsafe(server.stop(GRACE), thread.loop)
    stopped.result(GRACE + 30)

    for model, future in unary.items():
        assert future.code() is grpc.StatusCode.OK, (model, future.code(), future.details())
        response = future.result()
        assert response.finish_reason == pb.FINISH_REASON_CANCELLED, model
        assert 0 < response.usage.completion_tokens < LONG[model], model
        assert len(response.token_ids) == response.usage.completion_tokens, model
        assert response.usage.prompt_tokens == len(b"def "), model
        assert response.usage.total_tokens == response.usage.prompt_tokens + len(response.token_ids)

    for model, stream in streams.items():
        stream.thread.join(30)
        assert stream.error is None, (model, stream.error)
        assert stream.call.code() is grpc.StatusCode.OK, model
        *steps, last = stream.messages
        assert [m.finish_reason for m in steps] == [pb.FINISH_REASON_UNSPECIFIED] * len(steps)
        assert last.finish_reason == pb.FINISH_REASON_CANCELLED, model
        generated = sum(len(m.token_ids) for m in stream.messages)
        assert last.usage.completion_tokens == generated, model
        assert 0 < generated < LONG[model], model

    for model in ("slow", "bytelm"):
        assert counted(server, "protoserve_cancellations_total", model=model) == 2, model
