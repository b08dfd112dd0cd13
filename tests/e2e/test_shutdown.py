"""Graceful shutdown and configuration of real ``protoserve serve`` processes.

Shutdown (server/app.py): on SIGTERM or SIGINT health turns NOT_SERVING, new
calls get UNAVAILABLE, calls in flight get ``--shutdown-grace`` seconds (ended
with FINISH_REASON_CANCELLED shortly before it runs out), then the process
exits 0.

The call in flight is a stream from ``tests.server.models_for_tests:Slow``
(20 ms a token, never ends by itself), so it is certain to outlive the grace
whatever the built-in model's weights would generate.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests._observe import wait_until
from tests.e2e.conftest import ROOT, ServerProcess, start_server, stop_server

pytestmark = pytest.mark.e2e

SLOW = "tests.server.models_for_tests:Slow"
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING
SIGNALS = [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGINT, id="SIGINT")]
#: Seconds a call may take before the test calls it hung.
CALL_TIMEOUT = 30.0


def env(**extra: str) -> dict[str, str]:
    """Environment for a server that can import the test models (``tests.server...``)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, **extra}


@pytest.fixture
def cleanup() -> Iterator[list[ServerProcess]]:
    """Servers a test started; any still running at the end are stopped."""
    servers: list[ServerProcess] = []
    yield servers
    for server in servers:
        stop_server(server)


class StreamReader(threading.Thread):
    """Reads a GenerateStream in the background: its messages, and how it ended."""

    def __init__(self, channel: grpc.Channel, model: str, max_new_tokens: int) -> None:
        super().__init__(daemon=True)
        request = pb.GenerateStreamRequest(
            model=model,
            inputs="def ",
            parameters=pb.GenerationParameters(max_new_tokens=max_new_tokens, seed=1),
        )
        self.call = pb_grpc.InferenceServiceStub(channel).GenerateStream(
            request, timeout=CALL_TIMEOUT
        )
        self.messages: list[pb.GenerateStreamResponse] = []
        self.error: grpc.RpcError | None = None
        self._received = threading.Condition()

    def run(self) -> None:
        try:
            for message in self.call:
                with self._received:
                    self.messages.append(message)
                    self._received.notify_all()
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            with self._received:
                self._received.notify_all()

    def wait_for(self, count: int, timeout: float) -> None:
        """Wait until ``count`` messages have arrived (or the stream ended)."""
        with self._received:
            self._received.wait_for(
                lambda: len(self.messages) >= count or not self.is_alive(), timeout
            )
        assert len(self.messages) >= count, f"stream: {len(self.messages)} messages, {self.error}"


def health_status(channel: grpc.Channel, service: str = "") -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status)


def wait_exit(server: ServerProcess, timeout: float) -> int:
    try:
        return server.process.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running {timeout}s after the signal:\n{server.output()}")


def stopped_in_log(server: ServerProcess) -> bool:
    return re.search(r"protoserve\.server: stopped$", server.output(), re.MULTILINE) is not None


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_during_stream_drains_then_exits(
    tmp_path: Path, cleanup: list[ServerProcess], signum: signal.Signals
) -> None:
    # The server ends the stream one second before the grace runs out: 5 s for the checks
    # below to see it still going (each takes milliseconds).
    grace = 6.0
    server = start_server(
        tmp_path, "--model", "bytelm", "--model", SLOW, "--shutdown-grace", str(grace), env=env()
    )
    cleanup.append(server)
    with (
        grpc.insecure_channel(server.target) as stream_channel,
        grpc.insecure_channel(server.target) as channel,
    ):
        stream = StreamReader(stream_channel, "slow", max_new_tokens=1000)
        stream.start()
        try:
            stream.wait_for(3, timeout=10)

            server.process.send_signal(signum)

            # 1. Health turns NOT_SERVING while the stream goes on; "liveness" does not
            #    (a liveness probe must not kill a draining server).
            wait_until(lambda: health_status(channel) == NOT_SERVING, "health NOT_SERVING")
            assert health_status(channel, INFERENCE_SERVICE) == NOT_SERVING
            assert health_status(channel, "liveness") == SERVING
            assert stream.is_alive(), "the stream ended before the grace period"
            seen = len(stream.messages)

            # 2. New calls are refused with UNAVAILABLE, before any header (Trailers-Only:
            #    a client's retry policy may send them to another server), the request id
            #    in the trailers.
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.InferenceServiceStub(channel).Generate(
                    pb.GenerateRequest(model="bytelm", inputs="def "),
                    timeout=5,
                    metadata=(("x-request-id", "drained-1"),),
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (refused.value.details() or "")
            assert not refused.value.initial_metadata()
            assert ("x-request-id", "drained-1") in refused.value.trailing_metadata()

            # 3. The stream in flight keeps going, then ends: Slow never ends by itself, so
            #    the server ends it, in order, shortly before the grace runs out.
            stream.wait_for(seen + 3, timeout=grace)
            stream.join(grace + 30)  # bounds a hang; step 4 checks who ended it
            assert not stream.is_alive(), "the stream hung past the grace period"
        finally:
            stream.call.cancel()
            stream.join(5)

    # README, "Shutdown": FINISH_REASON_CANCELLED and status OK, with the usage so far.
    assert stream.error is None, stream.error
    assert stream.call.code() is grpc.StatusCode.OK
    *steps, last = stream.messages
    assert last.finish_reason == pb.FINISH_REASON_CANCELLED
    assert last.HasField("usage")
    assert last.usage.completion_tokens == sum(len(m.token_ids) for m in stream.messages)
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in steps)

    # 4. The process exits 0 once the grace is over (the wait only bounds a hang), and
    #    says it stopped.
    assert wait_exit(server, grace + 30) == 0
    assert stopped_in_log(server), server.output()


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_when_idle_exits_promptly(
    tmp_path: Path, cleanup: list[ServerProcess], signum: signal.Signals
) -> None:
    server = start_server(tmp_path, "--shutdown-grace", "3600")
    cleanup.append(server)
    server.process.send_signal(signum)
    # Nothing in flight, so nothing to wait for: it exits long before its hour of grace
    # (the wait only bounds a hang), and says it ended no call.
    assert wait_exit(server, CALL_TIMEOUT) == 0
    output = server.output()
    assert f"{signum.name} received" in output
    assert "shutting down: 0 calls in flight, 3600.0s grace" in output, output
    assert "grace nearly over" not in output, output
    assert stopped_in_log(server), output


def test_shutdown_grace_flag_beats_environment(
    tmp_path: Path, cleanup: list[ServerProcess]
) -> None:
    # With the environment's 60 s a stream in flight would hold the server a minute.
    server = start_server(
        tmp_path,
        "--model",
        SLOW,
        "--shutdown-grace",
        "1",
        env=env(PROTOSERVE_SHUTDOWN_GRACE="60"),
    )
    cleanup.append(server)
    with grpc.insecure_channel(server.target) as channel:
        stream = StreamReader(channel, "slow", max_new_tokens=1000)
        stream.start()
        try:
            stream.wait_for(2, timeout=10)
            server.process.send_signal(signal.SIGTERM)
            stream.join(30)
        finally:
            stream.call.cancel()
            stream.join(5)
    # The flag's 1 s grace, not the environment's 60 s, is the one the server keeps.
    assert wait_exit(server, 30) == 0
    output = server.output()
    assert "shutting down: 1 calls in flight, 1.0s grace" in output, output
    assert "grace nearly over: ending 1 calls" in output, output
    assert stream.error is None, stream.error
    assert stream.messages[-1].finish_reason == pb.FINISH_REASON_CANCELLED


def protoserve_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "protoserve.clients.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


@pytest.fixture(scope="module")
def cli_runs() -> dict[str, tuple[int, str, str]]:
    """Commands that exit by themselves, run at once (each imports torch): name -> result."""
    commands = {
        "help": protoserve_serve("--help", env={"PROTOSERVE_SHUTDOWN_GRACE": "7.5"}),
        "bad_model": protoserve_serve("--port", "0", "--model", "nosuch.module:Thing"),
        "bad_port": protoserve_serve(env={"PROTOSERVE_PORT": "abc"}),
    }
    results = {}
    for name, process in commands.items():
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            for p in commands.values():
                p.kill()
                p.communicate()
            pytest.fail(f"`protoserve serve` ({name}) did not exit in 60s")
        results[name] = (process.returncode, stdout, stderr)
    return results


def test_help_shows_the_environment_default(cli_runs: dict[str, tuple[int, str, str]]) -> None:
    returncode, stdout, _ = cli_runs["help"]
    assert returncode == 0
    assert re.search(
        r"--shutdown-grace GRACE\s.*\(default 7\.5\) \[env PROTOSERVE_SHUTDOWN_GRACE\]",
        stdout,
        re.DOTALL,
    ), stdout


def test_unknown_model_module_is_one_line_error(
    cli_runs: dict[str, tuple[int, str, str]],
) -> None:
    returncode, stdout, stderr = cli_runs["bad_model"]
    assert returncode == 2
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "nosuch.module" in lines[0]
    assert "Traceback" not in stderr


def test_bad_port_in_environment_is_named(cli_runs: dict[str, tuple[int, str, str]]) -> None:
    returncode, _, stderr = cli_runs["bad_port"]
    assert returncode != 0
    assert "PROTOSERVE_PORT" in stderr
    assert "abc" in stderr
    assert "Traceback" not in stderr
