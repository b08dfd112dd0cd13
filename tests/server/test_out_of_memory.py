"""A device out of memory is the batch's, not the model's end (issue #20, point 3).

``Hungry`` stands for a model on a device with room for two rows at once: a larger
batch raises torch's ``OutOfMemoryError``, as CUDA's allocator does. The requests of
that batch end with RESOURCE_EXHAUSTED (``OutOfMemory``: RetryInfo, and ErrorInfo
``OUT_OF_MEMORY``), the model halves its batch size and goes on serving; good batches
at the smaller size raise it again. Runs on the CPU: the error is the device's, not
the hardware.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import grpc
import pytest
import torch
from google.rpc import error_details_pb2, status_pb2

from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from protoserve.server.runtime import BatchDecoder, Model, TensorInfo, Token, scheduler
from protoserve.server.runtime.errors import OutOfMemory
from protoserve.server.runtime.tensors import RawTensor
from tests._threads import start_grpc_server, stop_grpc_server
from tests.server._runtime import run, started
from tests.server.models_for_tests import Batched, LetterDecoder

ROW = struct.pack("<f", 1.0)


class Hungry(Model):
    """y = x + 1 on float32 rows; more than ``room`` rows at once: out of memory."""

    name = "hungry"
    inputs = (TensorInfo("x", "float32", (-1, 1)),)
    outputs = (TensorInfo("y", "float32", (-1, 1)),)
    predict_batches = True
    max_batch_size = 8
    max_batch_delay = 1.0  # an idle model waits for a full batch: the test's bursts form one
    room: ClassVar[int] = 2
    batches: ClassVar[list[int]] = []
    lock = threading.Lock()

    def predict(
        self, inputs: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        rows = inputs["x"].shape[0]
        with self.lock:
            self.batches.append(rows)
        if rows > self.room:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {rows} rows; {self.room} fit"
            )
        return {"y": inputs["x"] + 1}


def one_row() -> list[RawTensor]:
    return [RawTensor("x", "float32", (1, 1), ROW)]


async def burst(runtime: Any, count: int) -> list[object]:
    calls = [runtime.predict("hungry", one_row(), {}) for _ in range(count)]
    return await asyncio.gather(*calls, return_exceptions=True)


def test_a_batch_out_of_memory_fails_alone_and_the_batch_size_backs_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scheduler, "OOM_RECOVERY", 2)
    Hungry.batches = []

    async def main() -> None:
        async with started(Hungry()) as runtime:
            # 8 rows in one batch: out of memory, every request of it says so.
            results = await burst(runtime, 8)
            assert all(isinstance(r, OutOfMemory) for r in results), results
            error = results[0]
            assert isinstance(error, OutOfMemory)
            assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "ran out of memory with 8 batched items at once" in error.message
            assert "at most 4 at once" in error.message
            # Then batches of 4 at most: still too many, and so 2.
            results = await burst(runtime, 4)
            assert all(isinstance(r, OutOfMemory) for r in results), results
            # The next request succeeds, and so do batches of two.
            (y,) = await runtime.predict("hungry", one_row(), {})
            assert y.data == struct.pack("<f", 2.0)
            results = await burst(runtime, 4)
            assert not [r for r in results if isinstance(r, BaseException)], results
            # Good rounds at 2 (OOM_RECOVERY of them): the model tries 4 again.
            results = await burst(runtime, 4)
        # 8 and 4 ran out; 1 and 2 went well (OOM_RECOVERY = 2), so the limit is 4 again:
        # the rest of that burst (2) ran, and the next burst of 4 ran out once more.
        assert Hungry.batches == [8, 4, 1, 2, 2, 4]
        assert all(isinstance(r, OutOfMemory) for r in results), results

    run(main())


def test_over_grpc_out_of_memory_is_resource_exhausted_and_the_next_call_succeeds() -> None:
    thread, server = start_grpc_server(["tests.server.test_out_of_memory:Hungry"])
    request = pb.PredictRequest(
        model="hungry",
        inputs=[pb.Tensor(name="x", data_type=pb.DATA_TYPE_FLOAT32, shape=[1, 1], raw_data=ROW)],
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            futures = [stub.Predict.future(request, timeout=30) for _ in range(8)]
            # One batch of 8 on any machine that sends 8 calls within the model's 1 s
            # batch delay; a slower one may split them, but not into batches of 2 or less.
            errors = [e for e in (f.exception() for f in futures) if e is not None]
            assert errors
            error = errors[0]
            assert isinstance(error, grpc.Call)
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            status = status_pb2.Status.FromString(
                dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
            )
            kinds = {}
            for detail in status.details:
                for kind in (error_details_pb2.RetryInfo, error_details_pb2.ErrorInfo):
                    if detail.Is(kind.DESCRIPTOR):
                        kinds[kind.__name__] = kind()
                        detail.Unpack(kinds[kind.__name__])
            assert kinds["ErrorInfo"].reason == "OUT_OF_MEMORY"
            assert kinds["RetryInfo"].retry_delay.seconds == 1
            answer = stub.Predict(request, timeout=30)
            assert answer.outputs[0].raw_data == struct.pack("<f", 2.0)
    finally:
        stop_grpc_server(thread, server)


class CrampedDecoder(LetterDecoder):
    """Steps more than two sequences at once: out of memory (the KV cache, say)."""

    def step(self, states: Sequence[Any]) -> list[Token | None]:
        if len(states) > 2:
            self.steps.append(-len(states))  # a step that ran out, recorded as negative
            raise torch.OutOfMemoryError(f"CUDA out of memory: {len(states)} sequences")
        return super().step(states)


class Cramped(Batched):
    name = "cramped"
    decoders: ClassVar[list[LetterDecoder]] = []

    def batch_decoder(self, max_sequences: int) -> BatchDecoder:
        decoder = CrampedDecoder(max_sequences, 0.001)
        type(self).decoders.append(decoder)
        return decoder


def test_a_decode_step_out_of_memory_halves_the_sequences_decoded_together() -> None:
    async def generate(runtime: Any) -> object:
        params = {"max_new_tokens": 20, "seed": 1}
        return await runtime.generate("cramped", "go", params)

    async def main() -> None:
        async with started(Cramped(), max_active=32) as runtime:
            steps = Cramped.decoders[-1].steps
            steps.clear()  # the warm-up's
            first = await asyncio.gather(
                *(generate(runtime) for _ in range(4)), return_exceptions=True
            )
            # A step of more than two ran out (the sequences may have joined at once or
            # one by one): each sequence in it failed with it, and none was left behind.
            assert min(steps) < -2, steps
            failed = [r for r in first if isinstance(r, OutOfMemory)]
            assert len(failed) >= -min(steps), first
            assert not [r for r in first if isinstance(r, BaseException) and r not in failed]
            assert not Cramped.decoders[-1].live
            steps.clear()
            again = await asyncio.gather(
                *(generate(runtime) for _ in range(4)), return_exceptions=True
            )
        assert not [r for r in again if isinstance(r, BaseException)], again
        assert steps and max(steps) == 2  # two at a time from then on

    run(main())
