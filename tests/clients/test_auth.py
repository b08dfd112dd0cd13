"""The clients' bearer token against a real server that needs one: the Python clients'
``token=`` over gRPC and through the gateway, and the commands' ``--token`` and
``PROTOSERVE_TOKEN``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from protoserve.clients import AsyncClient, Client, HttpClient, Unauthenticated
from protoserve.gateway import build_gateway
from tests._threads import UvicornThread, start_grpc_server, stop_grpc_server

pytestmark = pytest.mark.e2e

TOKEN = "client-test-token"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tokens = tmp_path_factory.mktemp("client-auth") / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    thread, server = start_grpc_server(
        ("tests.server.models_for_tests:Counted",), auth_token_file=str(tokens), shutdown_grace=1
    )
    yield f"127.0.0.1:{server.port}"
    stop_grpc_server(thread, server)


@pytest.fixture(scope="module")
def gateway_url(target: str) -> Iterator[str]:
    gateway = UvicornThread(build_gateway(target))
    yield gateway.url
    gateway.stop()


def test_the_grpc_clients_send_their_token(target: str) -> None:
    with Client(target, token=TOKEN) as client:
        assert client.generate("a").text == "ok"
    with Client(target) as client, pytest.raises(Unauthenticated) as info:
        client.generate("a")
    assert info.value.message.startswith("ListModels needs a bearer token")

    async def run() -> str:
        async with AsyncClient(target, token=TOKEN) as client:
            return (await client.generate("a")).text

    assert asyncio.run(run()) == "ok"


def test_the_http_client_sends_its_token(gateway_url: str) -> None:
    with HttpClient(gateway_url, token=TOKEN, model="counted") as client:
        assert client.generate("a").text == "ok"
    with HttpClient(gateway_url, model="counted") as client, pytest.raises(Unauthenticated):
        client.generate("a")


def protoserve(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PROTOSERVE_TOKEN"}
    if token is not None:
        env["PROTOSERVE_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "protoserve.clients.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize("over", ["grpc", "http"])
def test_generate_takes_a_token_by_flag_or_variable(
    over: str, request: pytest.FixtureRequest, target: str, tmp_path: Path
) -> None:
    server = str(request.getfixturevalue("gateway_url")) if over == "http" else target
    command = ("generate", "a", "--server", server, "--model", "counted")
    done = protoserve(*command, "--token", TOKEN)
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")
    done = protoserve(*command, token=TOKEN)
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")
    done = protoserve(*command)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith("protoserve generate: ")
    assert "Generate needs a bearer token" in done.stderr
    assert len(done.stderr.splitlines()) == 1
