"""bench/_loadgen.py against a real server and gateway: the streaming clients count good and
failed streams, and wrk's and h2load's output is read (each tool briefly; `nox -s tests`
installs both). perf_analyzer, which needs the compat session's venv, is tested there
(tests/compat/test_perf_analyzer.py).

No timing assertions: only counts, statuses and that the figures exist.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from protoserve.gateway import build_gateway
from protoserve.inference.v1 import inference_service_pb2 as pb
from tests._observe import wait_until
from tests._threads import UvicornThread, start_grpc_server, stop_grpc_server
from tests._tools import debian

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import _loadgen as lg  # noqa: E402  (bench/ is a folder of scripts, not a package)

EMBED_PATH = "/protoserve.inference.v1.InferenceService/Embed"
TEXT = "def read_config(path): return open(path).read()"


@dataclass
class Stack:
    grpc_target: str
    gateway_url: str
    metrics_url: str


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    import torch

    # One torch thread: with one per core (the default), a model call on a machine whose
    # cores are busy can take long enough for a short run to complete no request. The
    # setting is the process's: it is put back at the end.
    threads = torch.get_num_threads()
    thread, server = start_grpc_server(["bytelm"], metrics_port=0, torch_threads=1)
    gateway = UvicornThread(build_gateway(f"127.0.0.1:{server.port}"))
    yield Stack(
        f"127.0.0.1:{server.port}",
        gateway.url,
        f"http://127.0.0.1:{server.metrics_port}/metrics",
    )
    gateway.stop()
    stop_grpc_server(thread, server)
    torch.set_num_threads(threads)


def bodies() -> list[dict[str, Any]]:
    """Three good streams of 4 tokens, then a refused parameter and an unknown model."""
    good = lg.stream_bodies(
        ["def ", "import ", "class "], max_new_tokens=4, temperature=0.8, first_seed=7
    )
    bad_parameter = {"model": "bytelm", "inputs": "x", "parameters": {"max_new_tokens": 0}}
    return [*good, bad_parameter, {"model": "nope", "inputs": "x"}]


def check_counts(point: lg.Point, generator: str) -> None:
    assert point.generator == generator
    assert (point.ok, point.failed) == (3, 2), point.extra["error_samples"]
    assert point.extra["tokens"] == 12
    assert point.extra["streams"] == 5
    assert point.extra["finish_reasons"] == {"FINISH_REASON_LENGTH": 3}
    assert not math.isnan(point.p50_ms) and not math.isnan(point.extra["gap_p50_ms"])
    assert point.unit == "tokens/s" and point.throughput > 0


def test_grpc_streams_count_ok_and_failed(stack: Stack) -> None:
    requests = lg.grpc_requests(bodies(), pb.GenerateStreamRequest)
    point = asyncio.run(lg.grpc_streams(stack.grpc_target, requests, 2, "gRPC"))
    check_counts(point, "grpc-stream-client")
    samples = " ".join(point.extra["error_samples"])
    assert "INVALID_ARGUMENT" in samples and "NOT_FOUND" in samples


def test_sse_streams_count_ok_and_failed(stack: Stack) -> None:
    point = asyncio.run(lg.sse_streams(stack.gateway_url, "bytelm", bodies(), 2, "SSE"))
    check_counts(point, "sse-client")
    samples = " ".join(point.extra["error_samples"])
    assert "HTTP 400" in samples and "HTTP 404" in samples


def test_a_stream_that_fails_after_its_first_tokens_counts_failed(stack: Stack) -> None:
    # Greedy from "def " runs to its length (tests/server/test_drain.py): far past 1 s.
    # Sampled, it can end the text early and the stream then ends OK (seen once).
    params = {"max_new_tokens": 2048, "temperature": 0.0}
    long = [{"model": "bytelm", "inputs": "def ", "parameters": params}]
    sse = asyncio.run(
        lg.sse_streams(
            stack.gateway_url, "bytelm", long, 1, "SSE", headers={"X-Request-Timeout": "1"}
        )
    )
    assert (sse.ok, sse.failed) == (0, 1)
    assert sse.extra["error_samples"][0].startswith("error event:")
    requests = lg.grpc_requests(long, pb.GenerateStreamRequest)
    grpc = asyncio.run(lg.grpc_streams(stack.grpc_target, requests, 1, "gRPC", stream_timeout=1))
    assert (grpc.ok, grpc.failed) == (0, 1)
    assert grpc.extra["error_samples"][0].startswith("DEADLINE_EXCEEDED")


def test_sse_parser_and_stream_ends() -> None:
    parser = lg._SseParser()
    events = parser.feed(b': keep-alive\r\n\r\nid: 1\r\nevent: message\r\ndata: {"a":')
    assert events == []
    events = parser.feed(b"1}\r\n\r\nevent: done\ndata: a\ndata: b\n\n")
    assert events == [("message", "1", '{"a":1}'), ("done", "1", "a\nb")]
    assert lg._end_error("FINISH_REASON_LENGTH", 4, 4) == ""
    assert lg._end_error("FINISH_REASON_END_OF_TEXT", 2, 4) == ""
    assert lg._end_error("FINISH_REASON_LENGTH", 3, 4)
    assert lg._end_error("", 4, 4)
    assert lg._end_error("FINISH_REASON_CANCELLED", 1, 4)


def test_grpc_frame() -> None:
    assert lg.grpc_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"


def test_wrk_counts_match_the_server(stack: Stack, tmp_path: Path) -> None:
    debian("wrk", "wrk")
    body = json.dumps({"inputs": [TEXT]}).encode()
    url = f"{stack.gateway_url}/v1/models/bytelm:embed"
    before = lg.settled_requests(stack.metrics_url, "Embed")
    started = time.perf_counter()
    point = lg.wrk(url, body, "application/json", 2, 1, tmp_path, "wrk")
    elapsed = time.perf_counter() - started
    delta = lg.requests_delta(before, lg.settled_requests(stack.metrics_url, "Embed"))
    assert point.ok > 0 and point.failed == 0
    # The window wrk measured lies within the call that ran it.
    assert point.seconds <= elapsed and point.p50_ms <= point.p99_ms
    # The server's Embed calls: the one wrk() sends first to check the status, each that wrk
    # counted, and at most one more per connection, left in flight when wrk stopped (the
    # gateway cancels it, or it was answered first).
    assert set(delta) <= {"OK", "CANCELLED"}, delta
    assert point.ok + 1 <= delta.get("OK", 0) <= sum(delta.values()) <= point.ok + 1 + 2, delta
    missing = f"{stack.gateway_url}/v1/models/nope:embed"
    refused = lg.wrk(missing, body, "application/json", 2, 1, tmp_path, "404", expect_status=404)
    assert refused.ok > 0 and refused.failed == 0
    with pytest.raises(RuntimeError, match="answered 404"):
        lg.wrk(missing, body, "application/json", 2, 1, tmp_path, "wrk")


def test_h2load_counts_match_the_server(stack: Stack, tmp_path: Path) -> None:
    debian("h2load", "nghttp2-client")
    url = f"http://{stack.grpc_target}"
    message = pb.EmbedRequest(model="bytelm", inputs=[TEXT]).SerializeToString()
    # Settled counts: the server counts a call a moment after h2load has its answer.
    before = lg.settled_requests(stack.metrics_url, "Embed")
    point = lg.h2load_grpc(url, EMBED_PATH, message, 2, None, tmp_path, "h2", requests=20)
    after = lg.settled_requests(stack.metrics_url, "Embed")
    assert (point.ok, point.failed) == (20, 0)
    assert lg.requests_delta(before, after) == {"OK": 20}
    assert point.extra["bytes_data"] > 0 and point.p50_ms <= point.p99_ms

    # A gRPC error is an HTTP 200 to h2load: the server's count and the data tell.
    wrong = pb.EmbedRequest(model="nope", inputs=[TEXT]).SerializeToString()
    point = lg.h2load_grpc(url, EMBED_PATH, wrong, 2, None, tmp_path, "h2", requests=10)
    assert point.ok == 10 and point.extra["bytes_data"] == 0
    assert lg.requests_delta(after, lg.settled_requests(stack.metrics_url, "Embed")) == {
        "NOT_FOUND": 10
    }

    # GetModel, which runs no model: the 1 s run answers calls however busy the machine.
    get_model = pb.GetModelRequest(name="bytelm").SerializeToString()
    path = EMBED_PATH.replace("Embed", "GetModel")
    before = lg.settled_requests(stack.metrics_url, "GetModel")
    started = time.perf_counter()
    timed = lg.h2load_grpc(url, path, get_model, 2, 1, tmp_path, "h2")
    elapsed = time.perf_counter() - started
    delta = lg.requests_delta(before, lg.settled_requests(stack.metrics_url, "GetModel"))
    assert timed.ok > 0 and timed.failed == 0
    # A timed run (-D), and the window h2load reports lies within the call that ran it.
    assert timed.extra["args"][:2] == ["-D", "1000ms"], timed.extra["args"]
    assert timed.seconds <= elapsed
    assert lg.check_grpc_counts(timed, delta) == "", delta
    assert "ended {'NOT_FOUND': 1}" in lg.check_grpc_counts(timed, {**delta, "NOT_FOUND": 1})


def test_rss_of_a_process_tree_and_its_peak() -> None:
    # A child that starts a sleeping grandchild, then writes 64 MiB when told to: once the
    # sampler has taken its first ("idle") sample.
    script = (
        "import subprocess, sys, time;"
        "p = subprocess.Popen([sys.executable, '-c',"
        " 'import time; print(\"asleep\", flush=True); time.sleep(30)']);"
        "sys.stdin.readline(); blob = b'x' * (64 << 20); print('written', flush=True);"
        "time.sleep(30)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None
    grandchildren: list[int] = []
    try:
        with lg.RssSampler([child.pid], interval=0.05) as sampler:
            child.stdin.write("go\n")
            child.stdin.flush()
            wait_until(
                lambda: sampler.last(child.pid) >= sampler.idle(child.pid) + (48 << 20),
                "the child's 64 MiB showed",
            )
        assert sampler.peak(child.pid) >= sampler.idle(child.pid) + (48 << 20)
        # The sampler may see the blob while it is being written: wait until it all is, and
        # until the grandchild (its output goes to the same pipe) is asleep.
        assert child.stdout is not None
        assert {child.stdout.readline().strip() for _ in range(2)} == {"written", "asleep"}
        grandchildren = lg._descendants(child.pid)
        (grandchild,) = grandchildren
        own, below = lg.rss_bytes(child.pid), lg.rss_bytes(grandchild)
        assert own > 64 << 20 and below > 0
        assert lg.tree_rss_bytes(child.pid) == own + below  # both asleep: stable
    finally:
        for pid in grandchildren:
            os.kill(pid, signal.SIGKILL)
        child.kill()
        child.wait()
        child.stdin.close()
        if child.stdout is not None:
            child.stdout.close()
