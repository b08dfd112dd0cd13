"""A real gRPC server and the gateway in front of it, served by uvicorn on real ports."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from protoserve.gateway import build_gateway
from tests._threads import LoopThread, UvicornThread, start_grpc_server, stop_grpc_server

MODELS = (
    "bytelm",
    "tests.server.models_for_tests:Doubler",
    "tests.server.models_for_tests:Scripted",
    "tests.server.models_for_tests:Slow",
    "tests.server.models_for_tests:Exploding",
    "tests.server.models_for_tests:Held",
)


@dataclass
class Stack:
    """The upstream gRPC server and the gateway's base URL."""

    grpc_thread: LoopThread
    server: Any
    gateway: UvicornThread

    @property
    def url(self) -> str:
        return self.gateway.url

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    thread, server = start_grpc_server(MODELS, max_queue=2, max_active=2)
    gateway = UvicornThread(
        build_gateway(f"127.0.0.1:{server.port}", keepalive=0.5, max_body_bytes=64 * 1024)
    )
    yield Stack(thread, server, gateway)
    gateway.stop()
    stop_grpc_server(thread, server)


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client
