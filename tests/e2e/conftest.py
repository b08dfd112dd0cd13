"""Real ``protoserve serve`` processes on real ports (port 0, reported through --port-file)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests._tools import missing

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ServerProcess:
    """A server process and the port it bound."""

    process: subprocess.Popen[str]
    port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        """SIGTERM by PID (then SIGKILL if it will not go); the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def start_process(
    tmp_path: Path,
    command: str,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> ServerProcess:
    """Start ``protoserve COMMAND --port 0 --port-file F ARGS`` and wait for its port (the
    server writes it once its models are loaded, the gateway once it accepts)."""
    port_file = tmp_path / f"{command}.port"
    log = tmp_path / f"{command}.log"
    argv = [sys.executable, "-m", "protoserve.clients.cli", command, "--port", "0"]
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [*argv, "--port-file", str(port_file), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
    deadline = time.monotonic() + timeout
    while not port_file.exists() or not port_file.read_text().strip():
        if process.poll() is not None:
            raise RuntimeError(f"{command} exited with {process.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"{command} did not start in {timeout}s:\n{log.read_text()}")
        time.sleep(0.05)
    return ServerProcess(process, int(port_file.read_text()), log)


def start_server(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> ServerProcess:
    """Start ``protoserve serve --port 0`` and wait until health says SERVING."""
    server = start_process(tmp_path, "serve", *args, env=env, timeout=timeout)
    with grpc.insecure_channel(server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    return server


def stop_server(server: ServerProcess) -> None:
    """Stop by PID: SIGTERM, then SIGKILL if it will not go."""
    server.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server with the built-in model, shared by a test module."""
    server = start_server(tmp_path_factory.mktemp("server"))
    yield server
    stop_server(server)


def tool(name: str) -> str:
    """Path of a pinned npm tool (node_modules/.bin): skips where missing, fails on CI."""
    path = ROOT / "node_modules" / ".bin" / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found:
        return found
    missing(f"{name} is not installed: run `npm ci` in {ROOT}")
