"""A device that fails for good takes its model out of service, not the server (issue #20).

``Broken`` stands for a model whose GPU failed: its model call raises torch's
``AcceleratorError`` (what a CUDA error such as an illegal memory access raises). The
request gets UNAVAILABLE; the model turns FAILED, its health and the server's NOT_SERVING
(balancers go elsewhere), and another model of the same server goes on serving.
Runs on the CPU: the error is the device's, raised by the test's model.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from protoserve.server.runtime import Model, TensorInfo
from tests._observe import wait_until
from tests._threads import start_grpc_server, stop_grpc_server

ROW = struct.pack("<f", 1.0)
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Broken(Model):
    """Every model call: the device's context is gone."""

    name = "broken"
    inputs = (TensorInfo("x", "float32", (-1,)),)
    outputs = (TensorInfo("y", "float32", (-1,)),)

    def predict(
        self, inputs: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")


def predict(stub: Any, model: str) -> Any:
    tensor = pb.Tensor(name="x", data_type=pb.DATA_TYPE_FLOAT32, shape=[1], raw_data=ROW)
    return stub.Predict(pb.PredictRequest(model=model, inputs=[tensor]), timeout=30)


def test_a_failed_device_fails_its_model_and_the_server_goes_on() -> None:
    specs = ["tests.server.test_device_failure:Broken", "tests.server.models_for_tests:Doubler"]
    thread, server = start_grpc_server(specs)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)

            def status(service: str) -> int:
                request = health_pb2.HealthCheckRequest(service=service)
                return health.Check(request, timeout=10).status

            with pytest.raises(grpc.RpcError) as failed:
                predict(stub, "broken")
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "its device failed" in (failed.value.details() or "")
            assert "illegal memory access" in (failed.value.details() or "")

            wait_until(lambda: status("models/broken") == NOT_SERVING, "the model NOT_SERVING")
            assert status("") == NOT_SERVING  # balancers take the server out
            model = stub.GetModel(pb.GetModelRequest(name="broken"), timeout=10).model
            assert model.state == pb.MODEL_STATE_FAILED
            assert "its device failed" in model.state_message
            # Refused from now on, without running it again.
            with pytest.raises(grpc.RpcError) as refused:
                predict(stub, "broken")
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "is not ready" in (refused.value.details() or "")
            # The server and its other model go on.
            assert predict(stub, "doubler").outputs[0].raw_data == struct.pack("<f", 2.0)
    finally:
        stop_grpc_server(thread, server)
