"""``--workers N``: N processes on one port (common/workers.py), as real processes.

The server's workers share one supervisor for the module (two processes loading
torch is the slow part); its last test stops it. Each worker serves its own
``/metrics`` (``--metrics-port 0``: a free port each, logged), which is how a test
tells the workers apart.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests._observe import wait_until
from tests.e2e.conftest import ServerProcess, start_process, start_server, stop_server

pytestmark = pytest.mark.e2e

#: A model that loads at once: the test is about processes, not models.
MODEL = "tests.server.models_for_tests:Doubler"
#: Calls, each on a connection of its own: the kernel spreads connections, not calls.
CONNECTIONS = 24
PROTOSERVE = (sys.executable, "-m", "protoserve.clients.cli")
UP_ARGS = ("--grpc-port", "0", "--http-port", "0", "--model", MODEL)


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``serve --workers 2``, each worker with metrics on a free port."""
    args = ("--workers", "2", "--metrics-port", "0", "--model", MODEL)
    server = start_server(tmp_path_factory.mktemp("workers"), *args)
    yield server
    stop_server(server)


def call_on_fresh_connections(target: str, count: int = CONNECTIONS) -> None:
    """ListModels ``count`` times, each over a new connection (a channel of its own with a
    subchannel pool of its own: grpc would otherwise share one connection among them)."""
    for _ in range(count):
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(target, options=options) as channel:
            models = pb_grpc.InferenceServiceStub(channel).ListModels(
                pb.ListModelsRequest(), timeout=10
            )
            assert [m.name for m in models.models] == ["doubler"]


def metrics_ports(server: ServerProcess) -> list[int]:
    """Every worker's metrics port, in the order they said it (a restarted one: again)."""
    found = re.findall(r"serving metrics on http://[\d.]+:(\d+)/metrics", server.output())
    return [int(port) for port in found]


def listed(metrics_port: int) -> float:
    """ListModels calls one worker counted, from its /metrics."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "protoserve_requests_total" and sample.labels["method"] == "ListModels"
    )


def worker_pid(server: ServerProcess, index: int) -> int:
    """The pid of worker ``index``'s latest start, from the supervisor's log."""
    found = re.findall(rf"worker {index} started \(pid (\d+)\)", server.output())
    return int(found[-1])


def test_calls_from_fresh_connections_reach_every_worker(workers: ServerProcess) -> None:
    assert "2 workers serving on 127.0.0.1:" in workers.output()
    wait_until(lambda: len(metrics_ports(workers)) == 2, "both workers' metrics ports logged")
    call_on_fresh_connections(workers.target)
    counts = [listed(port) for port in metrics_ports(workers)]
    # 24 connections all hashed to one of two workers: one chance in 2**23.
    assert sum(counts) == CONNECTIONS and all(count > 0 for count in counts), counts


def test_a_killed_worker_is_restarted_and_serves_again(workers: ServerProcess) -> None:
    killed = worker_pid(workers, 1)
    os.kill(killed, signal.SIGKILL)

    def serving_again() -> bool:
        pid = worker_pid(workers, 1)
        return pid != killed and f"worker 1 (pid {pid}) serving" in workers.output()

    wait_until(serving_again, "worker 1 restarted and serving")
    log = workers.output()
    assert f"worker 1 (pid {killed}) was killed by SIGKILL; restarting it in 0.5s" in log
    assert workers.process.poll() is None
    # Its line may come after the supervisor's: each process writes its own log.
    wait_until(lambda: len(metrics_ports(workers)) == 3, "the restarted worker's metrics port")
    restarted = metrics_ports(workers)[-1]
    deadline = time.monotonic() + 30
    while listed(restarted) == 0:  # each batch misses it with a chance of 2**-24
        assert time.monotonic() < deadline, "no call reached the restarted worker"
        call_on_fresh_connections(workers.target)


def test_a_lone_server_cannot_join_the_workers_port(workers: ServerProcess) -> None:
    """Only workers share a port: a lone server sets no SO_REUSEPORT, so it fails to bind."""
    lone = subprocess.run(
        [*PROTOSERVE, "serve", "--port", str(workers.port), "--model", MODEL],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert lone.returncode == 1 and "cannot listen on" in lone.stderr, lone.stderr


def test_sigterm_drains_every_worker_and_exits_0(workers: ServerProcess) -> None:
    assert workers.stop() == 0, workers.output()
    log = workers.output()
    assert log.count("SIGTERM received") == 2 and log.count("INFO protoserve.server: stopped") == 2
    assert "SIGTERM: passed on to 2 workers" in log


@pytest.mark.parametrize("command", ["serve", "gateway"])
def test_workers_below_one_are_a_usage_error(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """In this process: the flags are checked before anything starts."""
    main = importlib.import_module(f"protoserve.{'server' if command == 'serve' else command}.cli")
    with pytest.raises(SystemExit) as refused:
        main.main(["--workers", "0"])
    assert refused.value.code == 2 and "--workers" in capsys.readouterr().err


def test_gateway_workers_serve_and_stop(tmp_path: Path) -> None:
    # No upstream needed: /healthz is the gateway's own.
    gateway = start_process(tmp_path, "gateway", "--workers", "2", "--upstream", "127.0.0.1:9")
    try:
        pids = {worker_pid(gateway, 0), worker_pid(gateway, 1)}
        for _ in range(8):  # a client of its own each time: a new connection
            with httpx.Client(base_url=f"http://{gateway.target}", timeout=10) as http:
                assert http.get("/healthz").status_code == 200
    finally:
        code = gateway.stop()
    assert code == 0, gateway.output()
    assert len(pids) == 2 and "2 workers serving" in gateway.output()


def test_up_passes_workers_to_both(tmp_path: Path) -> None:
    log = tmp_path / "up.log"
    with log.open("w") as out:
        up = subprocess.Popen(
            [*PROTOSERVE, "up", *UP_ARGS, "--workers", "2", "--gateway-workers", "2"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        found: list[re.Match[str] | None] = [None]

        def started() -> bool:
            assert up.poll() is None, log.read_text()
            found[0] = re.search(r"HTTP on (http://[\d.:]+)", log.read_text())
            return found[0] is not None

        wait_until(started, "up started", within=90)
        assert found[0] is not None
        base = found[0].group(1)
        for _ in range(4):
            with httpx.Client(base_url=base, timeout=10) as http:
                assert http.get("/v1/models").json()["models"][0]["name"] == "doubler"
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(60)
    text = log.read_text()
    assert code == 0, text
    assert text.count("2 workers serving") == 2 and text.count("protoserve.server: stopped") == 2
