"""`protoserve models | generate | embed` as a person at a terminal runs them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from protoserve.gateway import build_gateway
from tests._threads import UvicornThread

pytestmark = pytest.mark.e2e


def protoserve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "protoserve.clients.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def gateway_url(target: str) -> Iterator[str]:
    gateway = UvicornThread(build_gateway(target))
    yield gateway.url
    gateway.stop()


@pytest.fixture(params=["grpc", "http"])
def server_arg(request: pytest.FixtureRequest, target: str) -> str:
    if request.param == "http":
        return str(request.getfixturevalue("gateway_url"))
    return target


def test_models_lists_each_model(server_arg: str) -> None:
    done = protoserve("models", "--server", server_arg)
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert ["bytelm", "1", "ready", "text_generation,embedding"] in rows
    as_json = protoserve("models", "--server", server_arg, "--json")
    assert {
        "name": "bytelm",
        "version": "1",
        "state": "ready",
        "tasks": ["text_generation", "embedding"],
    } in [json.loads(line) for line in as_json.stdout.splitlines()]


def test_generate_streams_and_matches_unary(server_arg: str) -> None:
    common = (
        "--server",
        server_arg,
        "--model",
        "bytelm",
        "--param",
        "max_new_tokens=12",
        "--param",
        "seed=3",
        "--usage",
    )
    streamed = protoserve("generate", "def ", "--stream", *common)
    unary = protoserve("generate", "def ", *common)
    assert streamed.returncode == unary.returncode == 0, streamed.stderr + unary.stderr
    assert streamed.stdout == unary.stdout and streamed.stdout.strip()
    assert "finish: length; tokens: 4 in, 12 out" in streamed.stderr


def test_stream_prints_tokens_as_they_arrive(target: str) -> None:
    """The first bytes are on stdout while the model is still generating."""
    command = [
        sys.executable,
        "-m",
        "protoserve.clients.cli",
        "generate",
        "",
        "--stream",
        "--server",
        target,
        "--model",
        "slow",
        "--param",
        "max_new_tokens=200",
    ]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.read(3) == "xxx"
            assert process.poll() is None, "the command finished before it printed anything"
        finally:
            process.kill()


def test_client_commands_do_not_import_torch() -> None:
    code = (
        "import sys, protoserve.clients.commands, protoserve.clients._grpc, "
        "protoserve.clients._http; assert 'torch' not in sys.modules"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("generate", "x", "--model", "gpt-9"), "NOT_FOUND"),
        (
            ("generate", "x", "--model", "bytelm", "--param", "temperature=-1"),
            "parameters.temperature",
        ),
        (("embed", "x", "--model", "gpt-9"), "NOT_FOUND"),
    ],
)
def test_failures_are_one_line_and_exit_1(
    server_arg: str, args: tuple[str, ...], needle: str
) -> None:
    done = protoserve(*args, "--server", server_arg)
    assert done.returncode == 1
    assert needle in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_unreachable_server_is_one_line_and_exit_1() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for server in (f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
        done = protoserve("generate", "x", "--model", "bytelm", "--server", server, timeout=30)
        assert done.returncode == 1, done.stderr
        assert "UNAVAILABLE" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_bad_command_lines_exit_2(target: str) -> None:
    done = protoserve(
        "generate", "x", "--server", target, "--model", "bytelm", "--param", "bogus=1"
    )
    assert done.returncode == 2 and "bogus" in done.stderr and "Traceback" not in done.stderr
    assert protoserve("generate", "x", "--param", "novalue").returncode == 2


def test_embed_prints_one_vector_per_text(server_arg: str) -> None:
    done = protoserve(
        "embed", "def f(x):", "import os", "--server", server_arg, "--model", "bytelm"
    )
    assert done.returncode == 0, done.stderr
    vectors = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 8
    assert abs(sum(v * v for v in vectors[0]) - 1) < 1e-3
