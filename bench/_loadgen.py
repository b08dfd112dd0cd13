"""Load generators for the benchmark suite: external tools, wrapped and checked, and our own
streaming clients for what the tools cannot drive.

Every function returns one :class:`Point` (one load level, one transport) and checks its
run before it does: a tool that exited with an error, printed one, or counted requests
that do not add up raises :class:`RuntimeError` with the tail of its output. Requests that
completed with a wrong answer are counted in ``Point.failed``, which the caller checks
(a point with failures is not a valid measurement).

- :func:`perf_analyzer`: Triton's load generator, over gRPC or HTTP (the Open Inference
  Protocol; the gateway serves its HTTP form).
- :func:`wrk`: HTTP/1.1 keep-alive POSTs (the gateway's JSON routes).
- :func:`h2load_grpc`: gRPC unary calls over h2c, streams multiplexed on one connection as
  a gRPC channel does. h2load does not read ``grpc-status``:
  :func:`scrape_requests` reads the server's own count of calls per status code, so that
  the caller can check every call h2load counted ended OK.
- :func:`grpc_streams`, :func:`sse_streams`: GenerateStream over grpc.aio and over the
  gateway's Server-Sent Events, measured the same way (time to first token, gaps between
  token messages, tokens/s); :func:`stream_bodies` and :func:`grpc_requests` give both the
  same work.
- :func:`rss_bytes`, :func:`tree_rss_bytes`, :class:`RssSampler`: resident memory of the
  server and gateway processes, idle and under load.

This module knows protoserve only through its wire formats (the v1 proto's messages are
passed in by the caller) and its ``/metrics`` page.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from _harness import percentile

__all__ = [
    "Point",
    "RssSampler",
    "check_grpc_counts",
    "grpc_frame",
    "grpc_requests",
    "grpc_streams",
    "h2load_grpc",
    "percentile",
    "perf_analyzer",
    "requests_delta",
    "rss_bytes",
    "scrape_requests",
    "settled_requests",
    "sse_streams",
    "stream_bodies",
    "tree_rss_bytes",
    "wrk",
]


@dataclass
class Point:
    """One measured load level: what ran, how many requests (or streams) it counted, how fast."""

    label: str
    generator: str  # "perf_analyzer" | "wrk" | "h2load" | "sse-client" | "grpc-stream-client"
    concurrency: int
    ok: int
    failed: int  # must be 0 for a valid point; callers check
    seconds: float  # the measured window
    throughput: float  # ok / seconds, or tokens / seconds for streams (see unit)
    unit: str  # "req/s", "infer/s", "tokens/s"
    p50_ms: float  # request latency; for streams, time to first token
    p90_ms: float
    p99_ms: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(command: Sequence[str], timeout: float, env: Mapping[str, str] | None = None) -> str:
    """Run a tool; its stdout and stderr together. RuntimeError unless it exits 0."""
    try:
        proc = subprocess.run(
            list(command),
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        out = (error.stdout or b"").decode(errors="replace") if error.stdout else ""
        raise RuntimeError(f"{command[0]} ran past {timeout:.0f} s\n{_tail(out)}") from None
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)}\nexited with status {proc.returncode}:\n{_tail(output)}"
        )
    return output


# ---------------------------------------------------------------------------
# perf_analyzer

#: perf_analyzer 2.51 measures over windows 1.2 x --measurement-interval long (its profile
#: export's window_boundaries), and reports the last 3 once they agree.
_PA_WINDOW_STRETCH = 1.2
_PA_REPORTED_WINDOWS = 3
_PA_BAD_LINE = re.compile(r"error|failed", re.IGNORECASE)


def perf_analyzer(
    binary: Path,
    env: Mapping[str, str],
    *,
    url: str,
    protocol: Literal["grpc", "http"],
    model: str,
    concurrency: int,
    seconds: float,
    tmp: Path,
    label: str,
    extra_args: Sequence[str] = (),
    stability: float = 50.0,
    max_trials: int = 5,
) -> Point:
    """One concurrency level of perf_analyzer (``time_windows`` mode), checked.

    The window is chosen so that the 3 windows perf_analyzer needs at the least take
    about ``seconds``; it reports them when their throughput and mean latency are
    within ``stability`` percent, else takes another, up to ``max_trials`` windows (so a
    run takes ``seconds`` to ``seconds * max_trials / 3``) and fails after that.
    Inputs (``--input-data``, ``--shape``) go in ``extra_args``; later flags there
    override the ones set here.

    Returns the CSV's throughput (infer/s) and p50/p90/p99 latency; ``ok`` is the count
    of requests in the 3 reported windows of the profile export (by response time), which
    must agree with the CSV's throughput; ``failed`` counts exported requests that got
    no response.

    Raises:
        RuntimeError: a non-zero exit status, a line of output with "error" or
            "failed" (an unstable measurement is one), or figures that disagree.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    stem = f"pa-{protocol}-c{concurrency}-{time.monotonic_ns()}"
    csv_path, export_path = tmp / f"{stem}.csv", tmp / f"{stem}.json"
    interval_ms = max(100, round(seconds * 1000 / (_PA_REPORTED_WINDOWS * _PA_WINDOW_STRETCH)))
    command = [str(binary), "-m", model, "-u", url, "-i", protocol]
    command += ["--concurrency-range", str(concurrency), "--measurement-mode", "time_windows"]
    command += ["--measurement-interval", str(interval_ms)]
    command += ["--stability-percentage", f"{stability:g}", "--max-trials", str(max_trials)]
    command += ["-f", str(csv_path), "--profile-export-file", str(export_path), *extra_args]
    started = time.perf_counter()
    output = _run(command, timeout=60 + 2 * seconds * max(max_trials, 3) / 3, env=env)
    run_seconds = time.perf_counter() - started
    bad = [line for line in output.splitlines() if _PA_BAD_LINE.search(line)]
    if bad:
        raise RuntimeError(f"perf_analyzer reported: {bad[0]}\n{_tail(output)}")
    try:
        row = _pa_csv_row(csv_path, concurrency)
        ok, failed, window, windows = _pa_export_counts(export_path, concurrency)
    except (OSError, ValueError, KeyError) as error:
        raise RuntimeError(f"perf_analyzer's files: {error}\n{_tail(output)}") from error
    throughput = float(row["Inferences/Second"])
    expected = throughput * window
    # perf_analyzer's own count, rounded to 4 digits in the CSV: equal to ours within that.
    if abs(ok - expected) > 1 + 1e-3 * ok:
        raise RuntimeError(
            f"perf_analyzer: {ok} requests in the reported windows ({window:.3f} s), "
            f"but its throughput {throughput} infer/s means {expected:.1f}\n{_tail(output)}"
        )
    return Point(
        label=label,
        generator="perf_analyzer",
        concurrency=concurrency,
        ok=ok,
        failed=failed,
        seconds=window,
        throughput=throughput,
        unit="infer/s",
        p50_ms=float(row["p50 latency"]) / 1e3,  # the CSV is in microseconds
        p90_ms=float(row["p90 latency"]) / 1e3,
        p99_ms=float(row["p99 latency"]) / 1e3,
        extra={
            "args": command[1:],
            "interval_ms": interval_ms,
            "windows": windows,
            "run_seconds": run_seconds,
            "client_send_us": float(row.get("Client Send", "nan")),
            "client_recv_us": float(row.get("Client Recv", "nan")),
        },
    )


def _pa_csv_row(path: Path, concurrency: int) -> dict[str, str]:
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("Concurrency") == str(concurrency)]
    if len(rows) != 1:
        raise ValueError(f"{path.name}: {len(rows)} rows for concurrency {concurrency}")
    return rows[0]


def _pa_export_counts(path: Path, concurrency: int) -> tuple[int, int, float, int]:
    """(requests answered in the reported windows, requests never answered, the reported
    windows' seconds, windows measured) from a profile export."""
    experiments = [
        e
        for e in json.loads(path.read_text())["experiments"]
        if e["experiment"] == {"mode": "concurrency", "value": concurrency}
    ]
    if len(experiments) != 1:
        raise ValueError(f"{path.name}: {len(experiments)} experiments at {concurrency}")
    bounds = experiments[0]["window_boundaries"]
    requests = experiments[0]["requests"]
    if len(bounds) < 2:
        raise ValueError(f"{path.name}: no measurement window")
    first = bounds[max(0, len(bounds) - 1 - _PA_REPORTED_WINDOWS)]
    last = bounds[-1]
    answered = [r["response_timestamps"][-1] for r in requests if r["response_timestamps"]]
    ok = sum(1 for t in answered if first <= t < last)
    return ok, len(requests) - len(answered), (last - first) / 1e9, len(bounds) - 1


# ---------------------------------------------------------------------------
# wrk

# done() runs in wrk's main Lua state, after the threads; it prints one line of JSON.
# A response() callback is defined only when a 4xx/5xx status is the expected one: it
# makes wrk hand every response to Lua, which costs speed. Otherwise wrk's own
# summary.errors.status (responses with a status above 399) counts the wrong ones, and
# one request sent before the run checks the status is exactly the expected one.
_WRK_SCRIPT = """\
local f = assert(io.open({body_path}, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = {content_type}
local expect = {expect}
local threads = {{}}
function setup(thread)
  thread:set("unexpected", 0)
  table.insert(threads, thread)
end
{response}
function done(summary, latency, requests)
  local unexpected = 0
  for _, t in ipairs(threads) do unexpected = unexpected + t:get("unexpected") end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"unexpected":%d}}\\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), e.connect, e.read, e.write, e.status,
    e.timeout, unexpected))
end
"""
_WRK_RESPONSE = """\
unexpected = 0
function response(status, headers, body)
  if status ~= expect then unexpected = unexpected + 1 end
end
"""


def wrk(
    url: str,
    body: bytes,
    content_type: str,
    concurrency: int,
    seconds: float,
    tmp: Path,
    label: str,
    expect_status: int = 200,
    threads: int | None = None,
) -> Point:
    """HTTP/1.1 keep-alive POSTs of ``body`` to ``url`` from ``concurrency`` connections.

    wrk takes whole seconds: ``seconds`` is rounded (at least 1). ``failed`` counts
    connect, read, write and timeout errors and responses of another status than
    ``expect_status`` (for a 2xx/3xx ``expect_status``: responses above 399, after one
    request sent first returned exactly ``expect_status``).

    Raises:
        RuntimeError: wrk failed, or printed no summary.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    threads = threads or min(concurrency, 2)
    duration = max(1, round(seconds))
    stem = f"wrk-c{concurrency}-{time.monotonic_ns()}"
    body_path, script_path = tmp / f"{stem}.body", tmp / f"{stem}.lua"
    body_path.write_bytes(body)
    in_lua = expect_status >= 400
    script_path.write_text(
        _WRK_SCRIPT.format(
            body_path=json.dumps(str(body_path)),  # a valid Lua string literal too
            content_type=json.dumps(content_type),
            expect=expect_status,
            response=_WRK_RESPONSE if in_lua else "",
        )
    )
    if not in_lua:
        status = _status_of(url, body, content_type)
        if status != expect_status:
            raise RuntimeError(f"POST {url} answered {status}, not {expect_status}")
    command = ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{duration}s"]
    command += ["--timeout", "30s", "-s", str(script_path), url]
    output = _run(command, timeout=duration + 60)
    found = re.search(r"^WRKJSON (\{.*\})$", output, re.MULTILINE)
    if not found:
        raise RuntimeError(f"wrk printed no summary:\n{_tail(output)}")
    s = json.loads(found.group(1))
    wrong = s["unexpected"] if in_lua else s["status"]
    failed = s["connect"] + s["read"] + s["write"] + s["timeout"] + wrong
    ok = s["requests"] - wrong
    window = s["duration_us"] / 1e6
    return Point(
        label=label,
        generator="wrk",
        concurrency=concurrency,
        ok=ok,
        failed=failed,
        seconds=window,
        throughput=ok / window,
        unit="req/s",
        p50_ms=s["p50_us"] / 1e3,
        p90_ms=s["p90_us"] / 1e3,
        p99_ms=s["p99_us"] / 1e3,
        extra={"args": command[1:], "summary": s, "error_sample": _wrk_errors(s, in_lua)},
    )


def _wrk_errors(summary: Mapping[str, int], in_lua: bool) -> str:
    kinds = ("connect", "read", "write", "timeout", "unexpected" if in_lua else "status")
    return ", ".join(f"{summary[k]} {k} errors" for k in kinds if summary[k])


def _status_of(url: str, body: bytes, content_type: str) -> int:
    request = urllib.request.Request(url, body, {"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


# ---------------------------------------------------------------------------
# h2load (gRPC unary over h2c) and the server's count of calls


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed, 4-byte big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


_H2_COUNTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_H2_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_H2_TRAFFIC = re.compile(r"traffic: .*\((\d+)\) total, .*\((\d+)\) headers .*\((\d+)\) data")
_H2_FINISHED = re.compile(r"finished in ([0-9.]+)(us|ms|s),")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def h2load_grpc(
    url: str,
    method_path: str,
    message: bytes,
    concurrency: int,
    seconds: float | None,
    tmp: Path,
    label: str,
    connections: int = 1,
    *,
    requests: int | None = None,
) -> Point:
    """gRPC unary calls with h2load: ``concurrency`` streams in flight in all, spread over
    ``connections`` h2c connections (``-m concurrency/connections -c connections``).

    ``url`` is the server's ``http://host:port``; ``method_path`` the gRPC path
    (``/protoserve.inference.v1.InferenceService/Embed``); ``message`` the serialized
    request, which is framed here. Runs for ``seconds`` (``-D``; the calls in flight at
    the end are reset, and the server counts them CANCELLED: ``extra["in_flight_at_end"]``)
    or, with ``seconds=None``, for ``requests`` calls (``-n``).

    h2load judges by HTTP status only; a gRPC error comes with status 200. ``extra``
    holds h2load's counts (``succeeded``, ``started``, ``done``, ...) and the bytes of
    response ``data``, so that the caller checks the server's count of calls
    (:func:`settled_requests` before and after, :func:`check_grpc_counts`).

    Raises:
        RuntimeError: h2load failed, or its counts do not match its log.
    """
    if (seconds is None) == (requests is None):
        raise ValueError("give seconds or requests, not both")
    if concurrency % connections:
        raise ValueError(f"concurrency {concurrency} is not a multiple of {connections}")
    tmp.mkdir(parents=True, exist_ok=True)
    stem = f"h2load-c{concurrency}-{time.monotonic_ns()}"
    body_path, log_path = tmp / f"{stem}.body", tmp / f"{stem}.log"
    body_path.write_bytes(grpc_frame(message))
    command = ["h2load"]
    if seconds is not None:
        command += ["-D", f"{max(1, round(seconds * 1000))}ms"]
    else:
        command += ["-n", str(requests)]
    command += ["-m", str(concurrency // connections), "-c", str(connections)]
    command += ["-t", "1", "-d", str(body_path), "--log-file", str(log_path)]
    command += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    command += [url.rstrip("/") + method_path]
    budget = (seconds or 0) + 120
    output = _run(command, timeout=budget)
    counts, status, traffic, finished = (
        p.search(output) for p in (_H2_COUNTS, _H2_STATUS, _H2_TRAFFIC, _H2_FINISHED)
    )
    if not (counts and status and traffic and finished):
        raise RuntimeError(f"h2load printed no summary:\n{_tail(output)}")
    names = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
    c = dict(zip(names, map(int, counts.groups()), strict=True))
    window = float(finished.group(1)) * _UNIT_SECONDS[finished.group(2)]
    logged = [line.split("\t") for line in log_path.read_text().splitlines() if line]
    latencies = [int(us) / 1e3 for _, code, us in logged if code == "200"]
    if len(latencies) != c["succeeded"]:
        raise RuntimeError(
            f"h2load counted {c['succeeded']} succeeded, its log has {len(latencies)} "
            f"with status 200\n{_tail(output)}"
        )
    return Point(
        label=label,
        generator="h2load",
        concurrency=concurrency,
        ok=c["succeeded"],
        failed=c["failed"] + c["errored"] + c["timeout"],
        seconds=window,
        throughput=c["succeeded"] / window,
        unit="req/s",
        p50_ms=percentile(latencies, 50),
        p90_ms=percentile(latencies, 90),
        p99_ms=percentile(latencies, 99),
        extra={
            "args": command[1:],
            **c,
            "in_flight_at_end": c["started"] - c["done"],
            "status_2xx": int(status.group(1)),
            "status_4xx_5xx": int(status.group(3)) + int(status.group(4)),
            "bytes_total": int(traffic.group(1)),
            "bytes_headers": int(traffic.group(2)),
            "bytes_data": int(traffic.group(3)),
            "error_sample": ", ".join(
                f"{c[k]} {k}" for k in ("failed", "errored", "timeout") if c[k]
            ),
        },
    )


_SAMPLE = re.compile(r"^protoserve_requests_total\{([^}]*)\}\s+(\S+)", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape_requests(metrics_url: str, method: str) -> dict[str, float]:
    """The server's count of finished calls of ``method`` (``Embed``, ``ModelInfer``, the
    bare method name) by status code name, from ``protoserve_requests_total``."""
    with urllib.request.urlopen(metrics_url, timeout=30) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for labels, value in _SAMPLE.findall(text):
        found = dict(_LABEL.findall(labels))
        if found.get("method") == method:
            out[found["code"]] = out.get(found["code"], 0.0) + float(value)
    return out


def settled_requests(
    metrics_url: str, method: str, *, quiet: float = 0.3, timeout: float = 10.0
) -> dict[str, float]:
    """:func:`scrape_requests` once two scrapes ``quiet`` seconds apart agree: the calls a
    load generator left behind (wrk's and h2load's in flight when they stopped, whose
    cancellation reaches the server a moment later) are counted by then.

    Raises:
        RuntimeError: the count still moves after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last = scrape_requests(metrics_url, method)
    while True:
        time.sleep(quiet)
        now = scrape_requests(metrics_url, method)
        if now == last:
            return now
        if time.monotonic() > deadline:
            raise RuntimeError(f"{method} calls still finishing after {timeout} s: {now}")
        last = now


def check_grpc_counts(point: Point, delta: Mapping[str, int]) -> str:
    """Why the server's count of calls (:func:`requests_delta` of settled scrapes around an
    :func:`h2load_grpc` run, nothing else calling the method) does not fit h2load's, or "".

    With ``requests``, every call ends OK. With ``seconds``, h2load resets the calls in
    flight at the end: the server counts those CANCELLED, or OK when it finished one
    before the reset arrived, or not at all when the reset came before the call began.
    """
    extra = point.extra
    other = {code: n for code, n in delta.items() if code not in ("OK", "CANCELLED")}
    ok, cancelled = delta.get("OK", 0), delta.get("CANCELLED", 0)
    if other:
        return f"calls that ended {other}"
    if ok + cancelled > extra["started"]:
        return f"h2load started {extra['started']} calls, the server ended {dict(delta)}"
    if not point.ok <= ok <= point.ok + extra["in_flight_at_end"]:
        return f"h2load counted {point.ok} answered, the server {ok} OK"
    return ""


def requests_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, int]:
    """Calls per code between two :func:`scrape_requests`; codes that did not move left out."""
    codes = set(before) | set(after)
    moved = {c: round(after.get(c, 0.0) - before.get(c, 0.0)) for c in sorted(codes)}
    return {c: n for c, n in moved.items() if n}


# ---------------------------------------------------------------------------
# Streams: GenerateStream over grpc.aio and over the gateway's SSE


@dataclass
class _Stream:
    """One stream as a client saw it."""

    error: str = ""
    ttft: float = math.nan
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    finish: str = ""


def stream_bodies(
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float,
    first_seed: int,
    model: str = "bytelm",
) -> list[dict[str, Any]]:
    """One GenerateStreamRequest per prompt in protobuf's JSON form (seeds ``first_seed``,
    ``first_seed + 1``, ...): what :func:`sse_streams` sends, and what
    :func:`grpc_requests` turns into the same requests for :func:`grpc_streams`."""
    return [
        {
            "model": model,
            "inputs": prompt,
            "parameters": {
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "seed": str(first_seed + i),  # uint64: a string in protobuf's JSON
            },
        }
        for i, prompt in enumerate(prompts)
    ]


def grpc_requests(bodies: Iterable[Mapping[str, Any]], request_type: type[Any]) -> list[Any]:
    """``bodies`` as messages of ``request_type`` (the v1 GenerateStreamRequest class)."""
    from google.protobuf import json_format

    return [json_format.ParseDict(dict(b), request_type()) for b in bodies]


def _end_error(finish: str, tokens: int, max_new_tokens: int | None) -> str:
    """Why a stream that ended without a transport error is wrong, or ""."""
    if finish in ("", "FINISH_REASON_UNSPECIFIED"):
        return "no finish_reason"
    if finish == "FINISH_REASON_LENGTH":
        if max_new_tokens is not None and tokens != max_new_tokens:
            return f"finished by length after {tokens} tokens, max_new_tokens {max_new_tokens}"
    elif finish in ("FINISH_REASON_END_OF_TEXT", "FINISH_REASON_STOP_SEQUENCE"):
        # bytelm stops early when it samples its end-of-text token.
        if max_new_tokens is not None and tokens > max_new_tokens:
            return f"{tokens} tokens, over max_new_tokens {max_new_tokens}"
    else:
        return f"finish_reason {finish}"
    return ""


async def _drive(
    items: Sequence[Any], concurrency: int, one: Callable[[int, Any], Awaitable[_Stream]]
) -> tuple[list[_Stream], float]:
    """``concurrency`` workers; each takes the next item when its last one is done.
    ``one(worker, item)``. Returns the streams in item order and the wall time."""
    results: list[_Stream] = [_Stream() for _ in items]
    queue = iter(enumerate(items))

    async def worker(w: int) -> None:
        for i, item in queue:
            results[i] = await one(w, item)

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(min(concurrency, len(items)))))
    return results, time.perf_counter() - start


def _stream_point(
    label: str, generator: str, concurrency: int, streams: Sequence[_Stream], wall: float
) -> Point:
    ok = [s for s in streams if not s.error]
    bad = [s.error for s in streams if s.error]
    tokens = sum(s.tokens for s in ok)
    ttfts = [s.ttft * 1e3 for s in ok]
    gaps = [g * 1e3 for s in ok for g in s.gaps]
    return Point(
        label=label,
        generator=generator,
        concurrency=concurrency,
        ok=len(ok),
        failed=len(bad),
        seconds=wall,
        throughput=tokens / wall if wall else math.nan,
        unit="tokens/s",
        p50_ms=percentile(ttfts, 50),
        p90_ms=percentile(ttfts, 90),
        p99_ms=percentile(ttfts, 99),
        extra={
            "gap_p50_ms": percentile(gaps, 50),
            "gap_p90_ms": percentile(gaps, 90),
            "gap_p99_ms": percentile(gaps, 99),
            "tokens": tokens,
            "streams": len(streams),
            "streams_per_s": len(ok) / wall if wall else math.nan,
            "finish_reasons": dict(Counter(s.finish for s in ok)),
            "error_sample": bad[0] if bad else "",
            "error_samples": bad[:3],
        },
    )


async def grpc_streams(
    target: str,
    requests: Sequence[Any],
    concurrency: int,
    label: str,
    *,
    stream_timeout: float = 600.0,
) -> Point:
    """GenerateStream calls (v1 ``GenerateStreamRequest`` messages) on one grpc.aio channel
    to ``target`` (``host:port``), ``concurrency`` at a time.

    Time to first token runs from the call's start to the first message with tokens
    (the channel is connected before); gaps are between messages with tokens. A stream
    fails unless it ends OK with a finish reason, and when finished by length, with
    exactly its ``max_new_tokens``; ``extra["error_samples"]`` shows a few failures.
    """
    import grpc

    if not requests:
        raise ValueError("no requests")
    response_type = _response_type(requests[0])
    finish_names = response_type.DESCRIPTOR.fields_by_name["finish_reason"].enum_type
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        call = channel.unary_stream(
            "/protoserve.inference.v1.InferenceService/GenerateStream",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString,
        )

        async def one(_: int, request: Any) -> _Stream:
            s = _Stream()
            limit = (
                request.parameters.max_new_tokens
                if request.parameters.HasField("max_new_tokens")
                else None
            )
            start = time.perf_counter()
            last = None
            try:
                async for message in call(request, timeout=stream_timeout):
                    now = time.perf_counter()
                    if s.finish:
                        s.error = "a message after the one with finish_reason"
                    if message.token_ids:
                        s.tokens += len(message.token_ids)
                        if last is None:
                            s.ttft = now - start
                        else:
                            s.gaps.append(now - last)
                        last = now
                    if message.finish_reason:
                        s.finish = finish_names.values_by_number[message.finish_reason].name
            except grpc.aio.AioRpcError as error:
                s.error = f"{error.code().name}: {error.details()}"
                return s
            s.error = s.error or _end_error(s.finish, s.tokens, limit)
            return s

        streams, wall = await _drive(requests, concurrency, one)
    return _stream_point(label, "grpc-stream-client", concurrency, streams, wall)


def _response_type(request: Any) -> type[Any]:
    """GenerateStreamResponse, from the module that defines the caller's request class."""
    response_type: type[Any] = sys.modules[type(request).__module__].GenerateStreamResponse
    return response_type


class _Http1:
    """One keep-alive HTTP/1.1 connection, reopened after an error or ``Connection: close``."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.reader, self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """The status and headers (names lower-cased) of a response."""
    status_line = await reader.readuntil(b"\r\n")
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP/1.x response: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _body_parts(
    reader: asyncio.StreamReader, headers: Mapping[str, str]
) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive: chunked, by Content-Length, or up to the end."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return
            chunk = await reader.readexactly(size + 2)
            yield chunk[:-2]
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        yield await reader.read()


class _SseParser:
    """Server-Sent Events from bytes: (event, id, data) for each blank-line-ended event."""

    def __init__(self) -> None:
        self.buffer = b""
        self.event = self.id = ""
        self.data: list[str] = []

    def feed(self, chunk: bytes) -> list[tuple[str, str, str]]:
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        out = []
        for raw in lines:
            line = raw.rstrip(b"\r").decode()
            if not line:
                if self.data or self.event:
                    out.append((self.event or "message", self.id, "\n".join(self.data)))
                self.event, self.data = "", []
                continue
            if line.startswith(":"):
                continue  # a comment: keep-alive
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                self.event = value
            elif name == "data":
                self.data.append(value)
            elif name == "id":
                self.id = value
        return out


async def sse_streams(
    base_url: str,
    model: str,
    bodies: Sequence[Mapping[str, Any]],
    concurrency: int,
    label: str,
    *,
    headers: Mapping[str, str] | None = None,
    stream_timeout: float = 600.0,
) -> Point:
    """GenerateStream through the gateway: ``POST {base_url}/v1/models/{model}:generateStream``
    with ``Accept: text/event-stream``, ``concurrency`` at a time, each worker on its own
    keep-alive HTTP/1.1 connection. A body's ``"model"`` (as :func:`stream_bodies` gives)
    names the model in the path instead of ``model``, and is not sent in the body.

    Time to first token runs from sending the request to the first ``message`` event
    parsed; gaps are between ``message`` events with tokens. A stream fails unless it
    is a 200 ``text/event-stream`` of ``message`` events with increasing ids, then one
    ``done`` event, no ``error`` event, and its tokens as for :func:`grpc_streams`.
    """
    if not bodies:
        raise ValueError("no bodies")
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    extra_headers = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    connections = [_Http1(host, port) for _ in range(concurrency)]

    def request_bytes(body: Mapping[str, Any]) -> tuple[bytes, int | None]:
        payload = dict(body)
        name = payload.pop("model", model)
        params = payload.get("parameters") or {}
        limit = params.get("max_new_tokens", params.get("maxNewTokens"))
        data = json.dumps(payload).encode()
        head = (
            f"POST /v1/models/{name}:generateStream HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(data)}\r\n{extra_headers}\r\n"
        )
        return head.encode("latin-1") + data, None if limit is None else int(limit)

    prepared = [request_bytes(b) for b in bodies]

    async def one(worker: int, item: tuple[bytes, int | None]) -> _Stream:
        conn = connections[worker]
        try:
            return await asyncio.wait_for(_sse_one(conn, *item), stream_timeout)
        except (OSError, EOFError, ValueError, TimeoutError, asyncio.IncompleteReadError) as e:
            # The connection is somewhere inside a response: start the next on a new one.
            conn.close()
            return _Stream(error=f"{type(e).__name__}: {e}")

    try:
        streams, wall = await _drive(prepared, concurrency, one)
    finally:
        for conn in connections:
            conn.close()
    return _stream_point(label, "sse-client", concurrency, streams, wall)


async def _sse_one(conn: _Http1, request: bytes, limit: int | None) -> _Stream:
    reader, writer = await conn.open()
    s = _Stream()
    start = time.perf_counter()
    writer.write(request)
    status, headers = await _head(reader)
    if status != 200 or not headers.get("content-type", "").startswith("text/event-stream"):
        body = b"".join([part async for part in _body_parts(reader, headers)])
        s.error = f"HTTP {status} {headers.get('content-type', '')}: {body[:200]!r}"
    else:
        parser, last_id, last, done = _SseParser(), 0, None, 0
        async for chunk in _body_parts(reader, headers):
            for event, event_id, data in parser.feed(chunk):
                now = time.perf_counter()
                if done:
                    s.error = s.error or f"event {event!r} after done"
                elif event == "message":
                    if not event_id.isdigit() or int(event_id) <= last_id:
                        s.error = s.error or f"message id {event_id!r} after {last_id}"
                    else:
                        last_id = int(event_id)
                    message = json.loads(data)
                    if s.finish:
                        s.error = s.error or "a message after the one with finish_reason"
                    if message.get("token_ids"):
                        s.tokens += len(message["token_ids"])
                        if last is None:
                            s.ttft = now - start
                        else:
                            s.gaps.append(now - last)
                        last = now
                    finish = message.get("finish_reason", "FINISH_REASON_UNSPECIFIED")
                    if finish != "FINISH_REASON_UNSPECIFIED":
                        s.finish = finish
                elif event == "done":
                    done += 1
                elif event == "error":
                    s.error = s.error or f"error event: {data[:200]}"
                else:
                    s.error = s.error or f"unknown event {event!r}"
        if not s.error and not done:
            s.error = "no done event"
        s.error = s.error or _end_error(s.finish, s.tokens, limit)
    if "close" in headers.get("connection", "").lower():
        conn.close()
    return s


# ---------------------------------------------------------------------------
# Memory

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (``/proc/PID/statm``). OSError when it is gone."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # The command name (in parentheses) may hold spaces: the fields come after it.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (shared pages counted in each)."""
    total = rss_bytes(pid)
    for child in _descendants(pid):
        try:
            total += rss_bytes(child)
        except OSError:
            pass  # exited meanwhile
    return total


class RssSampler:
    """Samples the (tree) RSS of some processes every ``interval`` seconds in a thread.

    :meth:`start` takes the first sample at once: :meth:`idle` is that one, so start
    it before the load. :meth:`peak` is the largest sample so far, :meth:`stop` takes a
    last one. A process that exits keeps the figures it had.
    """

    def __init__(self, pids: Iterable[int], *, interval: float = 0.2, tree: bool = True) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.measure = tree_rss_bytes if tree else rss_bytes
        self._idle: dict[int, int] = {}
        self._peak: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")
        self._lock = threading.Lock()

    def _sample(self) -> None:
        for pid in self.pids:
            try:
                value = self.measure(pid)
            except OSError:
                continue
            with self._lock:
                self._idle.setdefault(pid, value)
                self._peak[pid] = max(self._peak.get(pid, 0), value)
                self._last[pid] = value

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sample()

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def idle(self, pid: int) -> int:
        """The first sample of ``pid``, in bytes. KeyError if it was never measured."""
        with self._lock:
            return self._idle[pid]

    def peak(self, pid: int) -> int:
        """The largest sample of ``pid`` so far, in bytes."""
        with self._lock:
            return self._peak[pid]

    def last(self, pid: int) -> int:
        """The latest sample of ``pid``, in bytes."""
        with self._lock:
            return self._last[pid]
