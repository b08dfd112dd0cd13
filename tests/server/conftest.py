"""An in-process server on a real port, running on its own event loop in a thread."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import pytest

from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from protoserve.server import InferenceServer
from tests._threads import one_message_per_token, start_grpc_server, stop_grpc_server

T = TypeVar("T")

MODELS = (
    "bytelm",
    "tests.server.models_for_tests:Doubler",
    "tests.server.models_for_tests:Scripted",
    "tests.server.models_for_tests:Slow",
    "tests.server.models_for_tests:Exploding",
    "tests.server.models_for_tests:FailsToLoad",
)


@dataclass
class Running:
    """A started server, its loop, and a sync stub to call it with."""

    server: InferenceServer
    loop: asyncio.AbstractEventLoop
    channel: grpc.Channel
    stub: pb_grpc.InferenceServiceStub

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the server's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)


@pytest.fixture(scope="session")
def running() -> Iterator[Running]:
    thread, server = start_grpc_server(MODELS, max_queue=4, max_active=2, shutdown_grace=2)
    one_message_per_token(server, "scripted")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield Running(server, thread.loop, channel, pb_grpc.InferenceServiceStub(channel))
    channel.close()
    stop_grpc_server(thread, server)


@pytest.fixture
def stub(running: Running) -> pb_grpc.InferenceServiceStub:
    return running.stub
