"""Readiness, per model and for the whole server, as a load balancer or kubelet asks for it."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from protoserve.server import InferenceServer, ServerConfig
from protoserve.server.app import model_health_name
from protoserve.server.runtime.loader import load_model_spec
from tests._observe import wait_until
from tests._threads import LoopThread
from tests.server.models_for_tests import Gated

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE = "protoserve.inference.v1.InferenceService"


def check(channel: grpc.Channel, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status)


def test_a_model_is_not_ready_until_loaded_and_run_once_and_health_is_per_model() -> None:
    Gated.release.clear()
    specs = [
        "tests.server.models_for_tests:Gated",
        "tests.server.models_for_tests:Doubler",
        "tests.server.models_for_tests:FailsToLoad",
    ]
    thread = LoopThread()

    async def make() -> InferenceServer:
        return InferenceServer(ServerConfig(port=0), [load_model_spec(s) for s in specs])

    server = thread.run(make())
    future = asyncio.run_coroutine_threadsafe(server.start(), thread.loop)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.InferenceServiceStub(channel)
    try:
        # Doubler loads and warms up at once; Gated is still warming up.
        wait_until(
            lambda: check(channel, model_health_name("doubler")) == SERVING, "doubler serving"
        )
        assert check(channel, model_health_name("gated")) == NOT_SERVING
        gated = stub.GetModel(pb.GetModelRequest(name="gated"), timeout=5)
        assert gated.model.state == pb.MODEL_STATE_LOADING
        assert check(channel, "") == NOT_SERVING
        assert check(channel, SERVICE) == NOT_SERVING
        # Its requests are refused as not ready, not queued.
        try:
            stub.Embed(pb.EmbedRequest(model="gated", inputs=["x"]), timeout=5)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert "not ready" in (err.details() or "")  # type: ignore[attr-defined]
        else:
            raise AssertionError("a model still warming up served a request")

        Gated.release.set()
        future.result(30)
        assert check(channel, model_health_name("gated")) == SERVING
        assert stub.GetModel(pb.GetModelRequest(name="gated"), timeout=5).model.state == (
            pb.MODEL_STATE_READY
        )
        # One model failed to load: it, and so the whole server, is not serving.
        assert check(channel, model_health_name("broken")) == NOT_SERVING
        assert check(channel, "") == NOT_SERVING
        try:
            check(channel, model_health_name("nope"))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        else:
            raise AssertionError("an unknown model had a health status")
    finally:
        Gated.release.set()
        channel.close()
        thread.run(server.stop(1), timeout=30)
        thread.stop()


def test_every_model_serving_makes_the_server_serving_until_it_drains() -> None:
    thread = LoopThread()
    specs = ["tests.server.models_for_tests:Doubler", "tests.server.models_for_tests:Scripted"]

    async def make() -> InferenceServer:
        server = InferenceServer(ServerConfig(port=0), [load_model_spec(s) for s in specs])
        await server.start()
        return server

    server = thread.run(make())
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    services = ("", SERVICE, model_health_name("doubler"), model_health_name("scripted"))
    try:
        wait_until(
            lambda: [check(channel, s) for s in services] == [SERVING] * 4, "every service serving"
        )
        thread.loop.call_soon_threadsafe(server.runtime.begin_drain)
        # Draining, every service turns NOT_SERVING: the server's and each model's.
        wait_until(
            lambda: [check(channel, s) for s in services] == [NOT_SERVING] * 4,
            "every service not serving",
        )
    finally:
        channel.close()
        thread.run(server.stop(1), timeout=30)
        thread.stop()
