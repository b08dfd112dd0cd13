"""A real protoserve server for the client tests, on a port-0 socket in a thread."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests._threads import start_grpc_server, stop_grpc_server

MODELS = (
    "bytelm",
    "tests.server.models_for_tests:Doubler",
    "tests.server.models_for_tests:Slow",
    "tests.server.models_for_tests:Scripted",
)


@pytest.fixture(scope="session")
def server() -> Iterator[Any]:
    thread, server = start_grpc_server(MODELS, shutdown_grace=1)
    yield server
    stop_grpc_server(thread, server)


@pytest.fixture(scope="session")
def target(server: Any) -> str:
    return f"127.0.0.1:{server.port}"
