"""Many servers behind one gateway (issue #19), as real processes on real ports.

Three ``protoserve serve`` processes and one ``protoserve gateway`` whose
``--upstream`` lists all three (``ipv4:a,b,c``: what ``dns:///`` gives on Kubernetes,
without DNS). Under steady HTTP load through the gateway:

1. calls spread evenly over the three (each server's own request counter);
2. one server gets SIGTERM: it drains (health NOT_SERVING, late calls refused before
   any header) and the gateway's health watch and retry policy move every call to
   the others: not one unary call fails;
3. another gets SIGKILL with streams on it: exactly its streams fail, each with an
   ``event: error``; the other server's streams end normally;
4. the killed server is started again on its port and gets calls, the gateway untouched.

The servers serve two small models (tests/server/models_for_tests.py): ``doubler``
(Predict, unary) and ``slow`` (a stream, 20 ms a token), so the test is about
processes and connections, not model speed.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests._observe import wait_until
from tests._sse import events
from tests.e2e.conftest import ServerProcess, start_process, start_server

pytestmark = pytest.mark.e2e

MODELS = ("--model", "tests.server.models_for_tests:Doubler")
STREAMING = ("--model", "tests.server.models_for_tests:Slow")
#: Unary callers through the gateway, each a thread with a connection of its own.
CALLERS = 6
PREDICT = "/v1/models/doubler:predict"
STREAM = "/v1/models/slow:generateStream"
ONE = base64.b64encode(struct.pack("<f", 1.0)).decode()
TWO = base64.b64encode(struct.pack("<f", 2.0)).decode()
BODY = {"inputs": [{"name": "x", "data_type": "DATA_TYPE_FLOAT32", "shape": [1], "raw_data": ONE}]}


@dataclass
class Cluster:
    servers: list[ServerProcess]
    gateway: ServerProcess
    tmp_path: Path
    metrics_ports: list[int] = field(default_factory=list)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}"

    def server_args(self, index: int) -> list[str]:
        return [*MODELS, *STREAMING, "--metrics-port", str(self.metrics_ports[index])]


def metrics_port(server: ServerProcess) -> int:
    found = re.findall(r"serving metrics on http://[\d.]+:(\d+)/metrics", server.output())
    return int(found[-1])


def sample(port: int, name: str, method: str | None = None) -> float:
    """The sum of one metric's samples on the server whose metrics are on ``port``."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and (method is None or s.labels.get("method") == method)
    )


def predicted(port: int) -> float:
    return sample(port, "protoserve_requests_total", "Predict")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("replicas")
    folders = [tmp / f"server-{i}" for i in range(3)]
    for folder in folders:
        folder.mkdir()
    args = (*MODELS, *STREAMING, "--metrics-port", "0", "--shutdown-grace", "10")
    with ThreadPoolExecutor(3) as pool:  # torch's import, three at once
        servers = list(pool.map(lambda f: start_server(f, *args), folders))
    upstream = "ipv4:" + ",".join(s.target for s in servers)
    try:
        gateway = start_process(tmp, "gateway", "--upstream", upstream)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    found = Cluster(servers, gateway, tmp, [metrics_port(s) for s in servers])
    try:
        yield found
    finally:
        for process in (*found.servers, found.gateway):
            process.stop()


class Load:
    """``CALLERS`` threads calling Predict through the gateway until stopped; every
    answer that is not the right 200 is kept."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.stopping = threading.Event()
        self.done = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run) for _ in range(CALLERS)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as client:
            while not self.stopping.is_set():
                try:
                    reply = client.post(PREDICT, json=BODY)
                    ok = reply.status_code == 200 and reply.json()["outputs"][0]["raw_data"] == TWO
                    failure = None if ok else f"{reply.status_code} {reply.text[:200]}"
                except httpx.HTTPError as error:
                    failure = repr(error)
                with self.lock:
                    self.done += 1
                    if failure is not None:
                        self.failures.append(failure)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)

    def wait_for(self, calls: int) -> None:
        start = self.done
        wait_until(lambda: self.done >= start + calls, f"{calls} more calls")


def test_calls_spread_evenly_over_the_servers(cluster: Cluster) -> None:
    before = [predicted(port) for port in cluster.metrics_ports]
    with Load(cluster.http) as load:
        load.wait_for(600)
    assert load.failures == []
    counts = [predicted(port) - b for port, b in zip(cluster.metrics_ports, before, strict=True)]
    even = sum(counts) / 3
    assert sum(counts) == load.done
    # Round robin over three healthy servers: each within 20% of a third.
    assert all(abs(count - even) <= 0.2 * even for count in counts), counts


def test_a_server_draining_under_load_fails_no_call(cluster: Cluster) -> None:
    drained = cluster.servers[0]
    with Load(cluster.http) as load:
        load.wait_for(100)
        drained.process.send_signal(signal.SIGTERM)
        assert drained.process.wait(30) == 0
        load.wait_for(200)  # the two others take it all
    assert load.failures == []
    assert "stopped" in drained.output()
    left = cluster.metrics_ports[1:]
    before = [predicted(port) for port in left]
    with Load(cluster.http) as load:
        load.wait_for(100)
    assert load.failures == []
    assert all(predicted(port) > b for port, b in zip(left, before, strict=True))


@dataclass
class Stream:
    """One generation streamed through the gateway as Server-Sent Events."""

    kinds: list[str] = field(default_factory=list)
    first: threading.Event = field(default_factory=threading.Event)
    error: str | None = None

    def read(self, base: str) -> None:
        # 150 tokens, 20 ms each, taking turns with two other streams: about 9 s.
        body = {"inputs": "go", "parameters": {"max_new_tokens": 150}}
        headers = {"accept": "text/event-stream"}
        with (
            httpx.Client(base_url=base, timeout=60) as client,
            client.stream("POST", STREAM, json=body, headers=headers) as reply,
        ):
            assert reply.status_code == 200
            for event in events(reply.iter_bytes()):
                self.kinds.append(event.event)
                if event.event == "error":
                    self.error = event.data
                self.first.set()


def test_a_killed_server_fails_only_its_own_streams(cluster: Cluster) -> None:
    assert cluster.servers[0].process.poll() is not None, "the drain test stopped server 0"
    killed = cluster.servers[1]
    streams = [Stream() for _ in range(6)]
    threads = []
    for stream in streams:  # one at a time: round robin puts every other on each server
        threads.append(threading.Thread(target=stream.read, args=(cluster.http,)))
        threads[-1].start()
        assert stream.first.wait(30), "a stream never began"
    on_killed = sample(cluster.metrics_ports[1], "protoserve_streams_in_flight")
    on_kept = sample(cluster.metrics_ports[2], "protoserve_streams_in_flight")
    # Round robin: every other on each, unless gRPC rebuilt its list in between (it
    # then starts at a random place). Both have some, which is what the test needs.
    assert on_killed > 0 and on_kept > 0 and on_killed + on_kept == len(streams)

    with Load(cluster.http) as load:
        load.wait_for(50)
        killed.process.send_signal(signal.SIGKILL)
        killed.process.wait(30)
        load.wait_for(100)
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a stream hung"

    failed = [s for s in streams if s.error is not None]
    assert len(failed) == on_killed
    for stream in failed:
        assert stream.kinds[-1] == "error"
        assert json.loads(stream.error or "")["code"] == 14  # UNAVAILABLE
    for stream in streams:
        if stream.error is None:  # the other server's: every token, then the end
            assert stream.kinds.count("message") >= 1 and "error" not in stream.kinds
    assert sample(cluster.metrics_ports[2], "protoserve_streams_in_flight") == 0
    # Unary calls in flight on the killed server when it died had their answer begun
    # (headers): they are not retried, and fail with 503. Every other call succeeds.
    assert len(load.failures) <= CALLERS, load.failures
    assert all(f.startswith("503 ") for f in load.failures), load.failures


def test_a_restarted_server_gets_calls_again_without_touching_the_gateway(
    cluster: Cluster,
) -> None:
    killed = cluster.servers[1]
    assert killed.process.poll() is not None, "the SIGKILL test killed server 1"
    folder = cluster.tmp_path / "server-1-again"
    folder.mkdir()
    again = start_server(folder, *cluster.server_args(1), "--port", str(killed.port))
    cluster.servers[1] = again
    gateway_pid = cluster.gateway.process.pid
    with Load(cluster.http) as load:
        # The gateway reconnects within its backoff (at most 5 s apart).
        wait_until(lambda: predicted(cluster.metrics_ports[1]) > 0, "a call on the restarted one")
        load.wait_for(100)
    assert load.failures == []
    assert cluster.gateway.process.pid == gateway_pid and cluster.gateway.process.poll() is None
    assert httpx.get(cluster.http + "/readyz", timeout=10).json() == {"status": "SERVING"}
