"""A real gRPC server and the gateway in front of it, served by uvicorn on real ports."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from protoserve.gateway import build_gateway
from tests._threads import (
    LoopThread,
    UvicornThread,
    one_message_per_token,
    start_grpc_server,
    stop_grpc_server,
)
from tests.gateway._sources import SOURCES, descriptors_for

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
    one_message_per_token(server, "scripted", "held")
    gateway = UvicornThread(
        build_gateway(f"127.0.0.1:{server.port}", keepalive=0.5, max_body_bytes=64 * 1024)
    )
    yield Stack(thread, server, gateway)
    gateway.stop()
    stop_grpc_server(thread, server)


class Gateways:
    """One gateway per descriptor source (tests/gateway/_sources.py), all in front of
    the stack's upstream and built alike; each started when first asked for."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.served: dict[str, UvicornThread] = {"compiled": stack.gateway}

    def url(self, source: str) -> str:
        if source not in self.served:
            descriptors = descriptors_for(source, self.stack.grpc_target)
            self.served[source] = UvicornThread(
                build_gateway(
                    self.stack.grpc_target,
                    descriptors=descriptors,
                    keepalive=0.5,
                    max_body_bytes=64 * 1024,
                )
            )
        return self.served[source].url

    def stop(self) -> None:
        for source, gateway in self.served.items():
            if source != "compiled":  # the stack's own, which it stops
                gateway.stop()


@pytest.fixture(scope="session")
def gateways(stack: Stack) -> Iterator[Gateways]:
    gateways = Gateways(stack)
    yield gateways
    gateways.stop()


@pytest.fixture(params=SOURCES)
def source(request: pytest.FixtureRequest) -> str:
    """Where the gateway behind ``http`` learnt the API: every test of ``http`` runs
    against each source, which must answer alike (docs/architecture.md, rule 3)."""
    return str(request.param)


@pytest.fixture
def http(gateways: Gateways, source: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateways.url(source), timeout=30) as client:
        yield client
