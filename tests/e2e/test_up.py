"""`protoserve up`: the server and the gateway together, as the README runs them."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests._observe import wait_until
from tests._sse import events

pytestmark = pytest.mark.e2e


def test_up_serves_http_and_grpc_and_stops_cleanly(tmp_path: Path) -> None:
    log = tmp_path / "up.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "protoserve.clients.cli",
                "up",
                "--grpc-port",
                "0",
                "--http-port",
                "0",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + 90
        while not (
            found := re.search(r"gRPC on ([\d.]+:\d+), HTTP on (http://[\d.:]+)", log.read_text())
        ):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        base = found.group(2)
        with httpx.Client(base_url=base, timeout=30) as http:
            reply = http.post(
                "/v1/models/bytelm:generate",
                json={"inputs": "def ", "parameters": {"max_new_tokens": 5}},
            )
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 5
            with http.stream(
                "GET",
                "/v1/models/bytelm:generateStream",
                params={"inputs": "import ", "parameters.max_new_tokens": "4"},
                headers={"Accept": "text/event-stream"},
            ) as stream:
                received = list(events(stream.iter_bytes()))
            # Four tokens in one to four messages: one that falls behind holds them all.
            *messages, done = received
            assert 1 <= len(messages) <= 4 and done.event == "done"
            assert {e.event for e in messages} == {"message"}
            assert sum(len(json.loads(e.data).get("token_ids", [])) for e in messages) == 4
            assert json.loads(received[-2].data)["finish_reason"] == "FINISH_REASON_LENGTH"
            assert http.get("/readyz").json() == {"status": "SERVING"}
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    assert code == 0, log.read_text()
    assert "stopped" in log.read_text()


def test_up_replicas_balance_and_restart_a_server_that_ends(tmp_path: Path) -> None:
    """``up --replicas 2``: two servers and a gateway over both; a server killed alone is
    started again on its port, and the gateway goes on calling both."""
    log = tmp_path / "up.log"
    model = "tests.server.models_for_tests:Doubler"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "protoserve.clients.cli", "up", "--replicas", "2"),
                *("--grpc-port", "0", "--http-port", "0", "--model", model),
                *("--", "--metrics-port", "0"),  # each replica logs its own
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    line = re.compile(
        r"gRPC on [\d.]+:(\d+) \(pid (\d+)\), [\d.]+:(\d+) \(pid (\d+)\), HTTP on (http://[\d.:]+)"
    )
    try:
        deadline = time.monotonic() + 90
        while not (found := line.search(log.read_text())):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        first_port, first_pid, second_port, _, base = found.groups()
        assert first_port != second_port
        with httpx.Client(base_url=base, timeout=30) as http:
            assert http.get("/v1/models/doubler").status_code == 200
            subprocess.run(["kill", "-KILL", first_pid], check=True)
            deadline = time.monotonic() + 60
            again = re.compile(rf"gRPC server on port {first_port} is pid (\d+)")
            while not again.search(log.read_text()):
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            assert f"on port {first_port} (pid {first_pid}) exited with -9" in log.read_text()
            with grpc.insecure_channel(f"127.0.0.1:{first_port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                request = health_pb2.HealthCheckRequest()
                wait_until(
                    lambda: (
                        health.Check(request, timeout=60, wait_for_ready=True).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ),
                    "the restarted server serving",
                )
            # Calls are answered throughout, and the gateway, untouched, sends the
            # restarted server its share again (its own /metrics counts them).
            metrics = re.findall(r"serving metrics on (http://[\d.:]+/metrics)", log.read_text())
            assert len(metrics) == 3, log.read_text()

            def served_by_the_restarted() -> float:
                assert http.get("/v1/models/doubler").status_code == 200
                return sum(
                    s.value
                    for family in text_string_to_metric_families(httpx.get(metrics[-1]).text)
                    for s in family.samples
                    if s.name == "protoserve_requests_total" and s.labels["method"] == "GetModel"
                )

            wait_until(lambda: served_by_the_restarted() > 0, "a call on the restarted server")
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    assert code == 0, log.read_text()
