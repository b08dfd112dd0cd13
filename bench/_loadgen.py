"""Load generators (ADR 0014), each returning a checked :class:`Point`: perf_analyzer, wrk,
h2load, and our one stream client (GenerateStream over grpc.aio and over SSE, measured
alike); and /metrics scrapes and resident memory. Only the standard library at module
level: tests/compat imports this in Triton's virtualenv.
"""

from __future__ import annotations

import asyncio
import contextlib
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


@dataclass
class Point:
    """One measured load level: what ran, how many requests (or streams), how fast."""

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
    #: The streams of a stream client's point, in request order (not in the JSON).
    streams: list[Stream] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["streams"]
        return out


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between closest ranks; NaN when empty."""
    if not values:
        return math.nan
    ordered, pos = sorted(values), (len(values) - 1) * q / 100
    low, high = math.floor(pos), min(math.floor(pos) + 1, len(values) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def latency_point(label: str, generator: str, concurrency: int, ok: int, failed: int,
                  seconds: float, latencies_ms: Sequence[float], unit: str = "req/s",
                  extra: dict[str, Any] | None = None) -> Point:  # fmt: skip
    """A :class:`Point` of ``ok`` calls in ``seconds`` with these latencies."""
    p50, p90, p99 = (percentile(latencies_ms, q) for q in (50, 90, 99))
    rate = ok / seconds if seconds else math.nan
    return Point(label, generator, concurrency, ok, failed, seconds, rate, unit, p50, p90, p99,
                 extra or {})  # fmt: skip


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(command: Sequence[str], timeout: float, env: Mapping[str, str] | None = None) -> str:
    """Run a tool; its stdout and stderr together. RuntimeError unless it exits 0."""
    try:
        proc = subprocess.run(list(command), env=None if env is None else dict(env),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)  # fmt: skip
    except subprocess.TimeoutExpired as error:
        out = (error.stdout or b"").decode(errors="replace") if error.stdout else ""
        raise RuntimeError(f"{command[0]} ran past {timeout:.0f} s\n{_tail(out)}") from None
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}\nexited with {proc.returncode}:\n{_tail(output)}")
    return output


# perf_analyzer -----------------------------------------------------------------------------------

#: perf_analyzer 2.51 measures over windows 1.2 x --measurement-interval long (its profile
#: export's window_boundaries), and reports the last 3 once they agree.
_PA_WINDOW_STRETCH = 1.2
_PA_REPORTED_WINDOWS = 3
_PA_BAD_LINE = re.compile(r"error|failed", re.IGNORECASE)


def perf_analyzer(binary: Path, env: Mapping[str, str], *, url: str,
                  protocol: Literal["grpc", "http"], model: str, concurrency: int,
                  seconds: float, tmp: Path, label: str, extra_args: Sequence[str] = (),
                  stability: float = 50.0, max_trials: int = 5) -> Point:  # fmt: skip
    """One concurrency level of perf_analyzer, its 3 windows about ``seconds`` long (up to
    ``max_trials`` until they agree within ``stability`` percent): the CSV's figures, and
    ``ok`` counted in the profile export, which must agree with them. ``extra_args`` last.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    stem = tmp / f"pa-{protocol}-c{concurrency}-{time.monotonic_ns()}"
    csv_path, export_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
    interval_ms = max(100, round(seconds * 1000 / (_PA_REPORTED_WINDOWS * _PA_WINDOW_STRETCH)))
    command = [str(binary), "-m", model, "-u", url, "-i", protocol]
    command += ["--concurrency-range", str(concurrency), "--measurement-mode", "time_windows"]
    command += ["--measurement-interval", str(interval_ms)]
    command += ["--stability-percentage", f"{stability:g}", "--max-trials", str(max_trials)]
    command += ["-f", str(csv_path), "--profile-export-file", str(export_path), *extra_args]
    started = time.perf_counter()
    output = _run(command, timeout=60 + 2 * seconds * max(max_trials, 3) / 3, env=env)
    run_seconds = time.perf_counter() - started
    if bad := [line for line in output.splitlines() if _PA_BAD_LINE.search(line)]:
        raise RuntimeError(f"perf_analyzer reported: {bad[0]}\n{_tail(output)}")
    try:
        with csv_path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("Concurrency") == str(concurrency)]
        if len(rows) != 1:
            raise ValueError(f"{csv_path.name}: {len(rows)} rows for concurrency {concurrency}")
        row = rows[0]
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
    p50, p90, p99 = (float(row[f"p{q} latency"]) / 1e3 for q in (50, 90, 99))  # CSV: us
    extra = {"args": command[1:], "interval_ms": interval_ms, "windows": windows,
             "run_seconds": run_seconds, "client_send_us": float(row.get("Client Send", "nan")),
             "client_recv_us": float(row.get("Client Recv", "nan"))}  # fmt: skip
    return Point(label, "perf_analyzer", concurrency, ok, failed, window, throughput, "infer/s",
                 p50, p90, p99, extra)  # fmt: skip


def _pa_export_counts(path: Path, concurrency: int) -> tuple[int, int, float, int]:
    """(answered in the reported windows, never answered, their seconds, windows measured)."""
    experiments = [e for e in json.loads(path.read_text())["experiments"]
                   if e["experiment"] == {"mode": "concurrency", "value": concurrency}]  # fmt: skip
    if len(experiments) != 1:
        raise ValueError(f"{path.name}: {len(experiments)} experiments at {concurrency}")
    bounds, requests = experiments[0]["window_boundaries"], experiments[0]["requests"]
    if len(bounds) < 2:
        raise ValueError(f"{path.name}: no measurement window")
    first, last = bounds[max(0, len(bounds) - 1 - _PA_REPORTED_WINDOWS)], bounds[-1]
    answered = [r["response_timestamps"][-1] for r in requests if r["response_timestamps"]]
    ok = sum(1 for t in answered if first <= t < last)
    return ok, len(requests) - len(answered), (last - first) / 1e9, len(bounds) - 1


# wrk ---------------------------------------------------------------------------------------------

_WRK_SCRIPT = Path(__file__).with_name("_wrk.lua")


def wrk(url: str, body: bytes, content_type: str, concurrency: int, seconds: float, tmp: Path,
        label: str, expect_status: int = 200) -> Point:  # fmt: skip
    """POSTs of ``body`` from ``concurrency`` keep-alive connections for ``seconds`` (whole);
    ``failed``: socket errors and responses of another status than ``expect_status``."""
    tmp.mkdir(parents=True, exist_ok=True)
    duration = max(1, round(seconds))
    stem = tmp / f"wrk-c{concurrency}-{time.monotonic_ns()}"
    (body_path := stem.with_suffix(".body")).write_bytes(body)
    in_lua = expect_status >= 400
    env = {"WRK_BODY": str(body_path), "WRK_CONTENT_TYPE": content_type,
           "WRK_EXPECT": str(expect_status)}  # fmt: skip
    if not in_lua and (status := _status_of(url, body, content_type)) != expect_status:
        raise RuntimeError(f"POST {url} answered {status}, not {expect_status}")
    command = ["wrk", "-t", str(min(concurrency, 2)), "-c", str(concurrency)]
    command += ["-d", f"{duration}s", "--timeout", "30s", "-s", str(_WRK_SCRIPT), url]
    output = _run(command, timeout=duration + 60, env={**os.environ, **env})
    found = re.search(r"^WRKJSON (\{.*\})$", output, re.MULTILINE)
    if not found:
        raise RuntimeError(f"wrk printed no summary:\n{_tail(output)}")
    s = json.loads(found.group(1))
    wrong = s["unexpected"] if in_lua else s["status"]
    kinds = ("connect", "read", "write", "timeout", "unexpected" if in_lua else "status")
    errors = ", ".join(f"{s[k]} {k} errors" for k in kinds if s[k])
    p50, p90, p99 = (s[f"p{q}_us"] / 1e3 for q in (50, 90, 99))
    ok, window = s["requests"] - wrong, s["duration_us"] / 1e6
    failed = s["connect"] + s["read"] + s["write"] + s["timeout"] + wrong
    extra = {"args": command[1:], "summary": s, "error_sample": errors}
    return Point(label, "wrk", concurrency, ok, failed, window, ok / window, "req/s", p50, p90,
                 p99, extra)  # fmt: skip


def _status_of(url: str, body: bytes, content_type: str) -> int:
    request = urllib.request.Request(url, body, {"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


# h2load (gRPC unary over h2c) and the server's count of calls ------------------------------------


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed, 4-byte big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


_H2_COUNTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_H2_TRAFFIC = re.compile(r"traffic: .*\((\d+)\) data")
_H2_FINISHED = re.compile(r"finished in ([0-9.]+)(us|ms|s),")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def h2load_grpc(url: str, method_path: str, message: bytes, concurrency: int,
                seconds: float | None, tmp: Path, label: str, *, requests: int | None = None,
                connections: int = 1) -> Point:  # fmt: skip
    """gRPC unary calls of ``message`` to ``url`` + ``method_path``, ``concurrency`` in flight
    on ``connections`` h2c connections (``concurrency / connections`` streams each), for
    ``seconds`` or (``seconds=None``) ``requests`` calls. A gRPC error is an HTTP 200 to
    h2load: ``extra`` holds its counts and DATA bytes, to check."""
    if (seconds is None) == (requests is None):
        raise ValueError("give seconds or requests, not both")
    if connections < 1 or concurrency % connections:
        raise ValueError(f"{concurrency} calls in flight do not split over {connections}")
    tmp.mkdir(parents=True, exist_ok=True)
    stem = tmp / f"h2load-c{concurrency}-{time.monotonic_ns()}"
    body_path, log_path = stem.with_suffix(".body"), stem.with_suffix(".log")
    body_path.write_bytes(grpc_frame(message))
    run = ["-n", str(requests)] if seconds is None else ["-D", f"{max(1, round(seconds * 1000))}ms"]
    command = ["h2load", *run, "-m", str(concurrency // connections), "-c", str(connections)]
    command += ["-t", "1", "-d", str(body_path), "--log-file", str(log_path)]
    command += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    output = _run([*command, url.rstrip("/") + method_path], timeout=(seconds or 0) + 120)
    counts, traffic, finished = (p.search(output) for p in (_H2_COUNTS, _H2_TRAFFIC, _H2_FINISHED))
    if not (counts and traffic and finished):
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
    errors = ", ".join(f"{c[k]} {k}" for k in ("failed", "errored", "timeout") if c[k])
    failed = c["failed"] + c["errored"] + c["timeout"]
    extra = {"args": command[1:], **c, "in_flight_at_end": c["started"] - c["done"],
             "bytes_data": int(traffic.group(1)), "error_sample": errors}  # fmt: skip
    return latency_point(label, "h2load", concurrency, c["succeeded"], failed, window, latencies,
                         extra=extra)  # fmt: skip


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url: str | None) -> Samples:
    """Every sample of a /metrics page: (name, labels) -> value; nothing without a URL."""
    if url is None:
        return {}
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return {(n, frozenset(_LABEL.findall(ls))): float(v) for n, ls, v in _SAMPLE.findall(text)}


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def scrape_requests(metrics_url: str, method: str) -> dict[str, float]:
    """The server's count of finished calls of ``method`` by status code name."""
    out: dict[str, float] = {}
    for (name, labels), v in scrape(metrics_url).items():
        found = dict(labels)
        if name == "protoserve_requests_total" and found.get("method") == method:
            out[found["code"]] = out.get(found["code"], 0.0) + v
    return out


def settled_requests(metrics_url: str, method: str, *, quiet: float = 0.3,
                     timeout: float = 10.0) -> dict[str, float]:  # fmt: skip
    """:func:`scrape_requests` once two scrapes ``quiet`` s apart agree: calls have settled."""
    deadline = time.monotonic() + timeout
    last = scrape_requests(metrics_url, method)
    while True:
        time.sleep(quiet)
        if (now := scrape_requests(metrics_url, method)) == last:
            return now
        if time.monotonic() > deadline:
            raise RuntimeError(f"{method} calls still finishing after {timeout} s: {now}")
        last = now


def check_grpc_counts(point: Point, delta: Mapping[str, int]) -> str:
    """Why the server's count of calls around an :func:`h2load_grpc` run does not fit h2load's,
    or "". A call reset at the end is CANCELLED, OK (it finished first) or never began."""
    extra = point.extra
    ok, cancelled = delta.get("OK", 0), delta.get("CANCELLED", 0)
    if other := {code: n for code, n in delta.items() if code not in ("OK", "CANCELLED")}:
        return f"calls that ended {other}"
    if ok + cancelled > extra["started"]:
        return f"h2load started {extra['started']} calls, the server ended {dict(delta)}"
    if not point.ok <= ok <= point.ok + extra["in_flight_at_end"]:
        return f"h2load counted {point.ok} answered, the server {ok} OK"
    return ""


def requests_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, int]:
    """Calls per code between two :func:`scrape_requests`; codes that did not move left out."""
    moved = {c: round(after.get(c, 0.0) - before.get(c, 0.0)) for c in sorted({*before, *after})}
    return {c: n for c, n in moved.items() if n}


# The stream client: GenerateStream over grpc.aio and over the gateway's SSE ----------------------


@dataclass
class Stream:
    """One stream as the client saw it."""

    error: str = ""  # why it failed; "" for a good stream
    code: str = "OK"  # the gRPC status (or HTTP status) it ended with
    ttft: float = math.nan
    #: Seconds to the first message with text: later than ``ttft`` when the server holds
    #: text back (the start of a stop sequence, a character's first bytes).
    first_text: float = math.nan
    gaps: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: str = ""
    seconds: float = 0.0
    retry_delay: float | None = None  # a refusal's RetryInfo (gRPC) or Retry-After, seconds

    def token(
        self, now: float, start: float, last: float | None, ids: Sequence[int]
    ) -> float | None:
        """Count a message's tokens, arrived at ``now``; when the last tokens arrived."""
        if self.finish:
            self.error = self.error or "a message after the one with finish_reason"
        if not ids:
            return last
        self.token_ids += ids
        if last is None:
            self.ttft = now - start
        else:
            self.gaps.append(now - last)
        return now


def stream_bodies(prompts: Sequence[str], *, max_new_tokens: int, temperature: float,
                  first_seed: int, model: str = "bytelm") -> list[dict[str, Any]]:  # fmt: skip
    """One GenerateStreamRequest per prompt in protobuf's JSON form, seeds from ``first_seed``:
    what :func:`sse_streams` sends, and :func:`grpc_requests` turns into messages."""
    params = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    return [
        # A uint64 seed is a string in protobuf's JSON.
        {"model": model, "inputs": prompt, "parameters": {**params, "seed": str(first_seed + i)}}
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


async def _drive(label: str, generator: str, items: Sequence[Any], concurrency: int,
                 one: Callable[[int, Any], Awaitable[Stream]]) -> Point:  # fmt: skip
    """``concurrency`` workers, each taking the next item when its last is done: the point."""
    if not items:
        raise ValueError("nothing to send")
    streams: list[Stream] = [Stream() for _ in items]
    queue = iter(enumerate(items))

    async def worker(w: int) -> None:
        for i, item in queue:
            started = time.perf_counter()
            streams[i] = await one(w, item)
            streams[i].seconds = time.perf_counter() - started

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(min(concurrency, len(items)))))
    wall = time.perf_counter() - start
    ok = [s for s in streams if not s.error]
    bad = [s.error for s in streams if s.error]
    tokens = sum(len(s.token_ids) for s in ok)
    gaps = [g * 1e3 for s in ok for g in s.gaps]
    texts = [s.first_text * 1e3 for s in ok if not math.isnan(s.first_text)]
    extra = {**{f"gap_p{q}_ms": percentile(gaps, q) for q in (50, 90, 99)}, "tokens": tokens,
             "first_text_p50_ms": percentile(texts, 50),
             "streams": len(streams), "streams_per_s": len(ok) / wall if wall else math.nan,
             "finish_reasons": dict(Counter(s.finish for s in ok)),
             "error_sample": bad[0] if bad else "", "error_samples": bad[:3]}  # fmt: skip
    ttfts = [s.ttft * 1e3 for s in ok if not math.isnan(s.ttft)]  # a stream with no token has none
    point = latency_point(label, generator, concurrency, len(ok), len(bad), wall, ttfts,
                          "tokens/s", extra)  # fmt: skip
    point.throughput, point.streams = tokens / wall if wall else math.nan, streams
    return point


async def grpc_streams(target: str, requests: Sequence[Any], concurrency: int, label: str, *,
                       stream_timeout: float = 600.0) -> Point:  # fmt: skip
    """GenerateStream calls on one grpc.aio channel, ``concurrency`` at a time. Time to first
    token runs from the call's start; a stream fails unless it ends OK with a finish reason
    (by length: after exactly ``max_new_tokens``); a refusal keeps its RetryInfo's delay."""
    import grpc

    response_type = sys.modules[type(requests[0]).__module__].GenerateStreamResponse
    finish_names = response_type.DESCRIPTOR.fields_by_name["finish_reason"].enum_type
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        call = channel.unary_stream(
            "/protoserve.inference.v1.InferenceService/GenerateStream",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString,
        )

        async def one(_: int, request: Any) -> Stream:
            s, start, last = Stream(), time.perf_counter(), None
            params = request.parameters
            limit = params.max_new_tokens if params.HasField("max_new_tokens") else None
            try:
                async for message in call(request, timeout=stream_timeout):
                    last = s.token(time.perf_counter(), start, last, message.token_ids)
                    s.text += message.text
                    if message.finish_reason:
                        s.finish = finish_names.values_by_number[message.finish_reason].name
            except grpc.aio.AioRpcError as error:
                s.code, s.error = error.code().name, f"{error.code().name}: {error.details()}"
                s.retry_delay = _retry_delay(error.trailing_metadata() or ())
                return s
            s.error = s.error or _end_error(s.finish, len(s.token_ids), limit)
            return s

        return await _drive(label, "grpc-stream-client", requests, concurrency, one)


def _retry_delay(metadata: Iterable[tuple[str, Any]]) -> float | None:
    """The ``google.rpc.RetryInfo`` delay in a call's ``grpc-status-details-bin``, seconds."""
    from google.rpc import error_details_pb2, status_pb2

    for key, raw in metadata:
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(raw).details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    return float(info.retry_delay.ToTimedelta().total_seconds())
    return None


@dataclass
class _Http1:
    """One keep-alive HTTP/1.1 connection, reopened after an error or ``Connection: close``."""

    host: str
    port: int
    streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.streams is None or self.streams[1].is_closing():
            self.streams = await asyncio.open_connection(self.host, self.port)
            self.streams[1].get_extra_info("socket").setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # fmt: skip
        return self.streams

    def close(self) -> None:
        if self.streams:
            self.streams[1].close()
        self.streams = None


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
    """The body's bytes as they arrive: chunked, or by Content-Length."""
    if "chunked" not in headers.get("transfer-encoding", "").lower():
        yield await reader.readexactly(int(headers.get("content-length", 0)))
        return
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        yield (await reader.readexactly(size + 2))[:-2]
    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
        pass


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
            elif not line.startswith(":"):  # a comment is a keep-alive
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    self.event = value
                elif name == "data":
                    self.data.append(value)
                elif name == "id":
                    self.id = value
        return out


async def sse_streams(base_url: str, model: str, bodies: Sequence[Mapping[str, Any]],
                      concurrency: int, label: str, *, headers: Mapping[str, str] | None = None,
                      stream_timeout: float = 600.0) -> Point:  # fmt: skip
    """GenerateStream as SSE through the gateway, ``concurrency`` at a time, each worker on a
    keep-alive connection of its own; a body's ``"model"`` names the model instead. As
    :func:`grpc_streams`, and a stream fails unless its events are ``message``s with
    increasing ids, then one ``done``; a refusal keeps its Retry-After."""
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

    async def one(worker: int, item: tuple[bytes, int | None]) -> Stream:
        conn = connections[worker]
        try:
            return await asyncio.wait_for(_sse_one(conn, *item), stream_timeout)
        except (OSError, EOFError, ValueError, TimeoutError, asyncio.IncompleteReadError) as e:
            conn.close()  # somewhere inside a response: the next starts on a new one
            return Stream(error=f"{type(e).__name__}: {e}", code=type(e).__name__)

    try:
        items = [request_bytes(b) for b in bodies]
        return await _drive(label, "sse-client", items, concurrency, one)
    finally:
        for conn in connections:
            conn.close()


async def _sse_one(conn: _Http1, request: bytes, limit: int | None) -> Stream:
    reader, writer = await conn.open()
    s, start, last = Stream(), time.perf_counter(), None
    writer.write(request)
    status, headers = await _head(reader)
    if status != 200 or not headers.get("content-type", "").startswith("text/event-stream"):
        body = b"".join([part async for part in _body_parts(reader, headers)])
        s.code = str(status)
        s.error = f"HTTP {status} {headers.get('content-type')}: {body[:200]!r}"
        with contextlib.suppress(KeyError, ValueError):
            s.retry_delay = float(headers["retry-after"])
    else:
        parser, last_id, done = _SseParser(), 0, 0
        async for chunk in _body_parts(reader, headers):
            for event, event_id, data in parser.feed(chunk):
                if done:
                    s.error = s.error or f"event {event!r} after done"
                elif event == "message":
                    if not event_id.isdigit() or int(event_id) <= last_id:
                        s.error = s.error or f"message id {event_id!r} after {last_id}"
                    else:
                        last_id = int(event_id)
                    message = json.loads(data)
                    now = time.perf_counter()
                    last = s.token(now, start, last, message.get("token_ids", []))
                    if message.get("text") and math.isnan(s.first_text):
                        s.first_text = now - start
                    s.text += message.get("text", "")
                    finish = message.get("finish_reason", "FINISH_REASON_UNSPECIFIED")
                    if finish != "FINISH_REASON_UNSPECIFIED":
                        s.finish = finish
                elif event == "done":
                    done += 1
                elif event == "error":
                    s.error = s.error or f"error event: {data[:200]}"
                else:
                    s.error = s.error or f"unknown event {event!r}"
        s.error = s.error or ("" if done else "no done event")
        s.error = s.error or _end_error(s.finish, len(s.token_ids), limit)
    if "close" in headers.get("connection", "").lower():
        conn.close()
    return s


# Memory ------------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (``/proc/PID/statm``). OSError when it is gone."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process (0 when it is gone): a page several processes
    map counts once across them (MLServer's two processes both map torch)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def _descendants(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc), parents before their children."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue  # gone meanwhile
            # The command name (in parentheses) may hold spaces: the fields come after it.
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        kids = sorted(children.get(todo.pop(0), []))
        out += kids
        todo += kids
    return out


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (shared pages counted in each)."""
    total = rss_bytes(pid)
    for child in _descendants(pid):
        with contextlib.suppress(OSError):  # exited meanwhile
            total += rss_bytes(child)
    return total


def tree_pss_bytes(pid: int) -> int:
    """PSS of ``pid`` and its descendants together."""
    return sum(pss_bytes(p) for p in [pid, *_descendants(pid)])


class RssSampler:
    """Samples the tree RSS of some processes every ``interval`` seconds in a thread while
    the block runs: the first sample (:meth:`idle`) on entry, a last one on exit."""

    def __init__(self, pids: Iterable[int], *, interval: float = 0.2) -> None:
        self.samples: dict[int, list[int]] = {pid: [] for pid in pids}
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")

    def _sample(self) -> None:
        for pid, samples in self.samples.items():
            with contextlib.suppress(OSError):  # a process that exited keeps its figures
                samples.append(tree_rss_bytes(pid))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def idle(self, pid: int) -> int:
        return self.samples[pid][0]

    def peak(self, pid: int) -> int:
        return max(self.samples[pid])

    def last(self, pid: int) -> int:
        return self.samples[pid][-1]
