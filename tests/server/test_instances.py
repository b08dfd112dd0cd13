"""Instances: N copies of a model, each with its own worker thread (issue #20, point 2).

A request goes to the least busy instance (in turn among equals); a generation stays on
the instance that began it; each instance's requests are counted in /metrics
(``protoserve_instance_requests_total{model,instance}``). On the CPU, with small models.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import grpc
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from protoserve.server.runtime import Model, TensorInfo
from protoserve.server.runtime.tensors import RawTensor
from tests._threads import start_grpc_server, stop_grpc_server
from tests.server._runtime import run, started
from tests.server.models_for_tests import Batched


class Where(Model):
    """y = x; records which thread (instance) ran each call, and which copy it was."""

    name = "where"
    inputs = (TensorInfo("x", "float32", (-1,)),)
    outputs = (TensorInfo("y", "float32", (-1,)),)
    threads: ClassVar[list[str]] = []
    loaded: ClassVar[list[int]] = []
    lock = threading.Lock()

    def load(self) -> None:
        with self.lock:
            self.loaded.append(id(self))

    def predict(
        self, inputs: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        threading.Event().wait(0.02)  # work that holds its instance a while
        with self.lock:
            self.threads.append(threading.current_thread().name)
        return {"y": inputs["x"]}


X = [RawTensor("x", "float32", (1,), struct.pack("<f", 1.0))]


def test_requests_spread_over_the_instances_each_a_copy_with_its_own_thread() -> None:
    Where.threads, Where.loaded = [], []

    async def main() -> None:
        async with started(Where(), instances=2) as runtime:
            assert len(set(Where.loaded)) == 2  # two copies, each loaded
            results = await asyncio.gather(*(runtime.predict("where", X, {}) for _ in range(8)))
            assert all(r[0].data == X[0].data for r in results)
            (entry,) = runtime.list_models()
            assert len(entry.instances) == 2

    run(main())
    assert set(Where.threads) == {"model-where", "model-where-1"}
    # The least busy, in turn among equals: an even split of 8 calls at once.
    assert Where.threads.count("model-where") == 4


def test_a_generation_stays_on_its_instance() -> None:
    Batched.decoders = []

    async def main() -> None:
        async with started(Batched(), instances=2) as runtime:
            for decoder in Batched.decoders:
                decoder.steps.clear()  # the warm-ups'
            params = {"max_new_tokens": 12, "seed": 1}
            texts = await asyncio.gather(
                *(runtime.generate("batched", f"go {i}", params) for i in range(4))
            )
            assert all(len(t.text) == 12 for t in texts)

    run(main())
    # Two decoders stepped (one per instance), each its own two sequences, never a
    # third: no sequence moved.
    used = [d for d in Batched.decoders if d.steps]
    assert len(used) == 2
    assert [max(d.steps) for d in used] == [2, 2]
    assert sum(sum(d.steps) for d in used) == 4 * 11  # 11 steps after each prefill


def test_over_grpc_both_instances_serve_and_each_is_counted_in_metrics(tmp_path: Path) -> None:
    thread, server = start_grpc_server(["tests.server.test_instances:Where"], instances=2)
    tensor = pb.Tensor(name="x", data_type=pb.DATA_TYPE_FLOAT32, shape=[1], raw_data=X[0].data)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            request = pb.PredictRequest(model="where", inputs=[tensor])
            futures = [stub.Predict.future(request, timeout=30) for _ in range(8)]
            assert all(f.result().outputs[0].raw_data == X[0].data for f in futures)
        text = generate_latest(server.metrics.registry).decode()
        counted = {
            s.labels["instance"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "protoserve_instance_requests_total" and s.labels["model"] == "where"
        }
        assert set(counted) == {"0", "1"} and sum(counted.values()) == 8
        assert all(v > 0 for v in counted.values())
    finally:
        stop_grpc_server(thread, server)


def test_oip_model_config_counts_the_instances() -> None:
    from protoserve.oip.v2 import grpc_service_pb2 as oip

    thread, server = start_grpc_server(["tests.server.test_instances:Where"], instances=3)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelConfig",
                request_serializer=oip.ModelConfigRequest.SerializeToString,
                response_deserializer=oip.ModelConfigResponse.FromString,
            )
            config = call(oip.ModelConfigRequest(name="where"), timeout=10).config
        (group,) = config.instance_group
        assert (group.kind, group.count) == (oip.ModelInstanceGroup.KIND_CPU, 3)
    finally:
        stop_grpc_server(thread, server)
