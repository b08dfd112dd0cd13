"""The runtime under load (issue #5): dynamic and continuous batching, overload, metrics.

Starts protoserve servers (and a gateway) as subprocesses on free loopback
ports and loads them with grpc.aio (and httpx) from this process. Every
comparison is made within one run, against servers started by this run:

1. Embed (dynamic batching): 64 concurrent clients, each sending one text of
   60-100 characters at a time, against one client sending them one at a
   time, on a server with batching on; and the 64 clients against a
   ``--no-batching`` server. The phases alternate over ``--rounds``. The
   vectors of ~64 texts from the concurrent batched run must equal the
   one-at-a-time vectors (within 1e-5).
2. Generation (continuous batching): 32 concurrent GenerateStream calls
   (64 new tokens, temperature 0.8, distinct seeds and prompts) against the
   same requests one alone at a time (all 32, or the first ``--gen-alone``),
   and the 32 against the ``--no-batching`` server (generations take turns,
   one step each). The batched server decodes by default, to float rounding: at
   most ``MAX_ROUNDED_TEXTS`` of its streams may differ from their alone text (a
   near-tie token; docs/adr/0015-batch-invariance.md); every ``--no-batching``
   stream must equal its alone text.
3. Overload: a server with ``--max-queue 8 --max-active 4`` gets 64
   concurrent long generations at once over gRPC (RESOURCE_EXHAUSTED with a
   RetryInfo detail for the refused), then through ``protoserve gateway``
   (429 with Retry-After).
4. Metrics: the servers' ``/metrics`` scraped before, during and after.

The report (markdown) goes to stdout; ``--json FILE`` keeps the figures. The
run fails (exit status 1) when a request failed unexpectedly or a
correctness check did not hold; the report says which.

The client and the servers share the machine's cores: compare the ratios
printed here, not absolute figures taken on different runs or machines.

Run it from the repository root with a Python that has protoserve installed::

    python bench/runtime_load.py --quick    # under a minute on 2 quiet cores
    python bench/runtime_load.py            # about 3-5 minutes

``--server-threads 1`` starts the servers with one torch intra-op thread; on a
machine whose cores other processes share, torch's default (one per core) can
make every model call many times slower (bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from _harness import (
    MODEL,
    Proc,
    Samples,
    delta,
    embed_texts,
    finite,
    fmt,
    generation_prompts,
    import_protoserve,
    launch,
    md_table,
    percentile,
    ratio,
    scrape,
    server_python,
    stopping,
    value,
    versions,
    wait_gateway,
    wait_ready,
)

#: (what the report calls it, the sample's name); counters and histogram parts.
_COUNTED = (
    ("batch_size[embed] count", "protoserve_batch_size_count", "embed"),
    ("batch_size[embed] sum", "protoserve_batch_size_sum", "embed"),
    ("batch_size[generate] count", "protoserve_batch_size_count", "generate"),
    ("batch_size[generate] sum", "protoserve_batch_size_sum", "generate"),
    ("generated_tokens_total", "protoserve_generated_tokens_total", ""),
    ("queue_duration_seconds count", "protoserve_queue_duration_seconds_count", ""),
    ("queue_duration_seconds sum", "protoserve_queue_duration_seconds_sum", ""),
    ("rejections_total", "protoserve_rejections_total", ""),
)


def metric_deltas(pairs: Sequence[tuple[Samples, Samples]]) -> dict[str, float]:
    """The figures scenario 4 reports, summed over (before, after) scrapes of one server."""
    out: dict[str, float] = {}
    for key, name, kind in _COUNTED:
        labels = {"model": MODEL, **({"kind": kind} if kind else {})}
        out[key] = sum(delta(before, after, name, **labels) for before, after in pairs)
    for kind in ("embed", "generate"):
        out[f"batch_size[{kind}] mean"] = ratio(
            out[f"batch_size[{kind}] sum"], out[f"batch_size[{kind}] count"]
        )
    out["queue_duration mean ms"] = 1e3 * ratio(
        out["queue_duration_seconds sum"], out["queue_duration_seconds count"]
    )
    return out


class Scrapes:
    """(before, after) scrapes of a server around each phase, by phase name."""

    def __init__(self) -> None:
        self.pairs: dict[str, list[tuple[Samples, Samples]]] = {}

    @contextlib.asynccontextmanager
    async def around(self, phase: str, url: str | None) -> Any:
        before = await scrape(url)
        yield
        self.pairs.setdefault(phase, []).append((before, await scrape(url)))

    def deltas(self, *phases: str) -> dict[str, float]:
        return metric_deltas([pair for phase in phases for pair in self.pairs.get(phase, [])])


@dataclass
class Gauges:
    """Samples of the in-flight gauges, scraped during a phase."""

    streams_in_flight: list[float] = field(default_factory=list)
    queue_depth: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {
            "scrapes": len(self.streams_in_flight),
            "streams_in_flight max": max(self.streams_in_flight, default=math.nan),
            "streams_in_flight median": percentile(self.streams_in_flight, 50),
            "queue_depth max": max(self.queue_depth, default=math.nan),
        }


@contextlib.asynccontextmanager
async def watch_gauges(url: str | None, every: float = 0.25) -> Any:
    """Scrape ``url`` every ``every`` seconds while the block runs."""
    gauges = Gauges()
    if url is None:
        yield gauges
        return

    async def loop() -> None:
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):
                samples = await scrape(url)
                gauges.streams_in_flight.append(
                    value(samples, "protoserve_streams_in_flight", model=MODEL)
                )
                gauges.queue_depth.append(value(samples, "protoserve_queue_depth", model=MODEL))

    task = asyncio.create_task(loop())
    try:
        yield gauges
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ---------------------------------------------------------------------------
# Scenario 1: Embed.


@dataclass
class Load:
    """Requests of one phase: successes (with latencies) and failures by code."""

    ok: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0

    def add(self, other: Load) -> None:
        self.ok += other.ok
        self.latencies += other.latencies
        self.errors.update(other.errors)
        self.elapsed += other.elapsed

    def row(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failed": sum(self.errors.values()),
            "errors": dict(self.errors),
            "seconds": self.elapsed,
            "req_per_s": ratio(self.ok, self.elapsed),
            "p50_ms": percentile(self.latencies, 50) * 1e3,
            "p90_ms": percentile(self.latencies, 90) * 1e3,
            "p99_ms": percentile(self.latencies, 99) * 1e3,
        }


async def embed_load(
    stub: Any,
    pb: ModuleType,
    texts: Sequence[str],
    clients: int,
    seconds: float,
    record: int,
    vectors: dict[int, list[float]],
) -> Load:
    """``clients`` closed-loop clients, one text per request, for ``seconds``.

    Client ``i`` sends texts ``i``, ``i + clients``, ... so that the first
    wave holds the first ``clients`` texts; the first vector returned for each
    text below ``record`` goes into ``vectors``. The elapsed time runs until
    the last request started before the deadline has answered.
    """
    import grpc

    load = Load()
    start = time.perf_counter()
    deadline = start + seconds

    async def client(i: int) -> None:
        k = 0
        while time.perf_counter() < deadline:
            index = (i + k * clients) % len(texts)
            k += 1
            t0 = time.perf_counter()
            try:
                reply = await stub.Embed(
                    pb.EmbedRequest(model=MODEL, inputs=[texts[index]]), timeout=120
                )
            except grpc.aio.AioRpcError as error:
                load.errors[error.code().name] += 1
                await asyncio.sleep(0.01)
                continue
            load.latencies.append(time.perf_counter() - t0)
            load.ok += 1
            if index < record and index not in vectors:
                vectors[index] = list(reply.embeddings[0].values)

    await asyncio.gather(*(client(i) for i in range(clients)))
    load.elapsed = time.perf_counter() - start
    return load


def max_abs_diff(a: dict[int, list[float]], b: dict[int, list[float]]) -> tuple[float, int]:
    """The largest element-wise difference over the texts both hold, and how many."""
    import numpy as np

    common = sorted(a.keys() & b.keys())
    if not common:
        return math.nan, 0
    x = np.array([a[i] for i in common], dtype=np.float64)
    y = np.array([b[i] for i in common], dtype=np.float64)
    if x.shape != y.shape:
        return math.inf, len(common)
    return float(np.abs(x - y).max()), len(common)


async def scenario_embed(
    args: argparse.Namespace, batched: tuple[Any, Proc], unbatched: tuple[Any, Proc], pb: Any
) -> dict[str, Any]:
    (stub_b, proc_b), (stub_u, proc_u) = batched, unbatched
    texts = embed_texts(
        max(args.embed_texts, args.embed_sample, args.embed_clients), args.embed_chars
    )
    sample = args.embed_sample
    # Warm-up, untimed: a burst on each server (connections, allocator, batch paths).
    for stub in (stub_b, stub_u):
        warm: dict[int, list[float]] = {}
        await embed_load(stub, pb, texts, args.embed_clients, 1.0, 0, warm)
    alone_vectors: dict[int, list[float]] = {}
    batched_vectors: dict[int, list[float]] = {}
    unbatched_vectors: dict[int, list[float]] = {}
    clients = args.embed_clients
    # (name, stub, server, clients, vectors kept)
    plan = (
        ("one at a time (batched server)", stub_b, proc_b, 1, alone_vectors),
        (f"{clients} concurrent (batched server)", stub_b, proc_b, clients, batched_vectors),
        (f"{clients} concurrent (--no-batching)", stub_u, proc_u, clients, unbatched_vectors),
    )
    phases = {name: Load() for name, *_ in plan}
    scrapes = Scrapes()
    per_phase = args.embed_seconds / args.rounds
    for _ in range(args.rounds):  # the phases alternate, so drift hits them alike
        for name, stub, proc, n, vectors in plan:
            async with scrapes.around(name, proc.metrics_url):
                load = await embed_load(stub, pb, texts, n, per_phase, sample, vectors)
            phases[name].add(load)

    # The sample texts the timed phases did not reach, untimed: one at a time,
    # then all at once (so that they share batches) on the batched server.
    for i in range(sample):
        if i not in alone_vectors:
            reply = await stub_b.Embed(pb.EmbedRequest(model=MODEL, inputs=[texts[i]]))
            alone_vectors[i] = list(reply.embeddings[0].values)
    missing = [i for i in range(sample) if i not in batched_vectors]

    async def one(i: int) -> None:
        reply = await stub_b.Embed(pb.EmbedRequest(model=MODEL, inputs=[texts[i]]))
        batched_vectors[i] = list(reply.embeddings[0].values)

    await asyncio.gather(*(one(i) for i in missing))
    diff, compared = max_abs_diff(alone_vectors, batched_vectors)
    diff_u, compared_u = max_abs_diff(alone_vectors, unbatched_vectors)

    rows = {name: load.row() for name, load in phases.items()}
    names = list(phases)
    alone, conc, unb = (rows[n]["req_per_s"] for n in names)
    return {
        "phases": rows,
        "ratios": {
            "concurrent batched / one at a time": ratio(conc, alone),
            "batched / unbatched at concurrency": ratio(conc, unb),
        },
        "correctness": {
            "texts compared": compared,
            "max abs diff (concurrent batched vs one at a time)": diff,
            "texts compared (unbatched)": compared_u,
            "max abs diff (concurrent unbatched vs one at a time)": diff_u,
            "untimed fill-ins": len(missing),
        },
        "metrics": {
            **{name: scrapes.deltas(name) for name in names},
            "scenario 1, batched server": scrapes.deltas(*names[:2]),
        },
    }


# ---------------------------------------------------------------------------
# Scenario 2: generation.


@dataclass
class Stream:
    """One GenerateStream call as the client saw it."""

    index: int
    code: str = "OK"
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    ttft: float = math.nan
    gaps: list[float] = field(default_factory=list)
    seconds: float = 0.0
    finish: str = ""


async def one_stream(stub: Any, pb: ModuleType, request: Any, index: int) -> Stream:
    import grpc

    out = Stream(index)
    parts: list[str] = []
    t0 = time.perf_counter()
    last: float | None = None
    try:
        async for message in stub.GenerateStream(request, timeout=600):
            now = time.perf_counter()
            parts.append(message.text)
            if message.token_ids:
                out.token_ids.extend(message.token_ids)
                if last is None:
                    out.ttft = now - t0
                else:
                    out.gaps.append(now - last)
                last = now
            if message.finish_reason:
                out.finish = pb.FinishReason.Name(message.finish_reason)
    except grpc.aio.AioRpcError as error:
        out.code = error.code().name
    out.seconds = time.perf_counter() - t0
    out.text = "".join(parts)
    return out


def stream_row(streams: Sequence[Stream], wall: float) -> dict[str, Any]:
    ok = [s for s in streams if s.code == "OK"]
    tokens = sum(len(s.token_ids) for s in ok)
    ttfts = [s.ttft for s in ok if not math.isnan(s.ttft)]
    gaps = [g for s in ok for g in s.gaps]
    return {
        "streams": len(streams),
        "ok": len(ok),
        "failed": len(streams) - len(ok),
        "errors": dict(Counter(s.code for s in streams if s.code != "OK")),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": ratio(tokens, wall),
        "ttft_p50_ms": percentile(ttfts, 50) * 1e3,
        "ttft_p99_ms": percentile(ttfts, 99) * 1e3,
        "gap_p50_ms": percentile(gaps, 50) * 1e3,
        "gap_p99_ms": percentile(gaps, 99) * 1e3,
        "finish_reasons": dict(Counter(s.finish for s in ok)),
    }


async def concurrent_streams(
    stub: Any, pb: ModuleType, requests: Sequence[Any]
) -> tuple[list[Stream], float]:
    start = time.perf_counter()
    streams = await asyncio.gather(*(one_stream(stub, pb, r, i) for i, r in enumerate(requests)))
    return list(streams), time.perf_counter() - start


#: Most concurrent batched streams whose text may differ from their alone text: batched
#: decoding matches a lone run to float rounding, and a near-tie token may go the other
#: way (none of 64 texts did, on any of 9 dispatch paths, in bench/decoding.py's run
#: of 2026-12-02).
MAX_ROUNDED_TEXTS = 2


def mismatches(reference: dict[int, Stream], streams: Sequence[Stream]) -> list[int]:
    return [
        s.index
        for s in streams
        if s.index in reference
        and (s.text != reference[s.index].text or s.token_ids != reference[s.index].token_ids)
    ]


def generation_requests(pb: Any, count: int, tokens: int, first_seed: int) -> tuple[list[Any], Any]:
    """``count`` GenerateStreamRequests (distinct prompts, seeds from ``first_seed``,
    temperature 0.8), and a short one to warm a server up with."""
    requests = [
        pb.GenerateStreamRequest(
            model=MODEL,
            inputs=prompt,
            parameters=pb.GenerationParameters(
                max_new_tokens=tokens, temperature=0.8, seed=first_seed + i
            ),
        )
        for i, prompt in enumerate(generation_prompts(count))
    ]
    warm = pb.GenerateStreamRequest(
        model=MODEL, inputs="x = ", parameters=pb.GenerationParameters(max_new_tokens=4, seed=1)
    )
    return requests, warm


async def scenario_generate(
    args: argparse.Namespace, batched: tuple[Any, Proc], unbatched: tuple[Any, Proc], pb: Any
) -> dict[str, Any]:
    (stub_b, proc_b), (stub_u, proc_u) = batched, unbatched
    requests, warm = generation_requests(pb, args.gen_streams, args.gen_tokens, 1000)
    for stub in (stub_b, stub_u):
        await asyncio.gather(*(one_stream(stub, pb, warm, 0) for _ in range(4)))
    n_alone = min(args.gen_alone or len(requests), len(requests))
    phase_names = (
        f"alone, one after another ({n_alone} of {len(requests)}, batched server)",
        f"{len(requests)} concurrent (batched server)",
        f"{len(requests)} concurrent (--no-batching, round-robin)",
    )
    scrapes = Scrapes()
    alone: list[Stream] = []
    async with scrapes.around(phase_names[0], proc_b.metrics_url):
        for i in range(n_alone):
            alone.append(await one_stream(stub_b, pb, requests[i], i))
    alone_wall = sum(s.seconds for s in alone)
    async with (
        scrapes.around(phase_names[1], proc_b.metrics_url),
        watch_gauges(proc_b.metrics_url) as gauges_b,
    ):
        conc, conc_wall = await concurrent_streams(stub_b, pb, requests)
    async with (
        scrapes.around(phase_names[2], proc_u.metrics_url),
        watch_gauges(proc_u.metrics_url) as gauges_u,
    ):
        rr, rr_wall = await concurrent_streams(stub_u, pb, requests)

    reference = {s.index: s for s in alone if s.code == "OK"}
    rows = {
        phase_names[0]: stream_row(alone, alone_wall),
        phase_names[1]: stream_row(conc, conc_wall),
        phase_names[2]: stream_row(rr, rr_wall),
    }
    a, c, r = (rows[n]["tokens_per_s"] for n in phase_names)
    concurrent_b = scrapes.deltas(phase_names[1])
    return {
        "phases": rows,
        "alone_requests": n_alone,
        "ratios": {
            "concurrent continuous / alone": ratio(c, a),
            "continuous / round-robin (concurrent)": ratio(c, r),
        },
        "correctness": {
            "streams compared": sum(1 for s in conc if s.index in reference),
            "mismatches (concurrent batched vs alone)": len(mismatches(reference, conc)),
            "mismatched indices": mismatches(reference, conc),
            "mismatches (concurrent --no-batching vs alone)": len(mismatches(reference, rr)),
        },
        "continuous batching seen": concurrent_b["batch_size[generate] count"] > 0,
        "metrics": {
            **{name: scrapes.deltas(name) for name in phase_names},
            "scenario 2, batched server": scrapes.deltas(*phase_names[:2]),
        },
        "gauges": {
            phase_names[1]: gauges_b.summary(),
            phase_names[2]: gauges_u.summary(),
        },
    }


# ---------------------------------------------------------------------------
# Scenario 3: overload.


@dataclass
class Attempt:
    """One call of the overload burst."""

    code: str
    seconds: float
    retry_delay: float | None = None  # RetryInfo (gRPC) or Retry-After (HTTP), seconds
    tokens: int = 0
    http_status: int = 0


async def overload_grpc(stub: Any, pb: ModuleType, requests: Sequence[Any]) -> list[Attempt]:
    import grpc
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    async def attempt(request: Any) -> Attempt:
        t0 = time.perf_counter()
        call = stub.GenerateStream(request, timeout=600)
        tokens = 0
        try:
            async for message in call:
                tokens += len(message.token_ids)
        except grpc.aio.AioRpcError as error:
            out = Attempt(error.code().name, time.perf_counter() - t0, tokens=tokens)
            with contextlib.suppress(ValueError):
                status = await rpc_status.aio.from_call(call)
                for detail in status.details if status is not None else ():
                    if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                        info = error_details_pb2.RetryInfo()
                        detail.Unpack(info)
                        out.retry_delay = info.retry_delay.ToTimedelta().total_seconds()
            return out
        return Attempt("OK", time.perf_counter() - t0, tokens=tokens)

    return list(await asyncio.gather(*(attempt(r) for r in requests)))


async def overload_http(base_url: str, bodies: Sequence[dict[str, Any]]) -> list[Attempt]:
    import httpx

    limits = httpx.Limits(max_connections=len(bodies) + 8, max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as http:

        async def attempt(body: dict[str, Any]) -> Attempt:
            t0 = time.perf_counter()
            try:
                reply = await http.post(f"/v1/models/{MODEL}:generate", json=body)
            except httpx.HTTPError as error:
                return Attempt(type(error).__name__, time.perf_counter() - t0)
            seconds = time.perf_counter() - t0
            code = {200: "OK", 429: "RESOURCE_EXHAUSTED"}.get(reply.status_code, "other")
            out = Attempt(code, seconds, http_status=reply.status_code)
            if "retry-after" in reply.headers:
                with contextlib.suppress(ValueError):
                    out.retry_delay = float(reply.headers["retry-after"])
            if reply.status_code == 200:
                answer = reply.json()
                out.tokens = len(answer.get("token_ids", answer.get("tokenIds", [])))
            return out

        return list(await asyncio.gather(*(attempt(b) for b in bodies)))


def overload_row(attempts: Sequence[Attempt]) -> dict[str, Any]:
    refused = [a for a in attempts if a.code == "RESOURCE_EXHAUSTED"]
    accepted = [a for a in attempts if a.code == "OK"]
    times = [a.seconds for a in refused]
    return {
        "sent": len(attempts),
        "accepted (completed OK)": len(accepted),
        "refused (RESOURCE_EXHAUSTED / 429)": len(refused),
        "other outcomes": dict(
            Counter(a.code for a in attempts if a.code not in ("OK", "RESOURCE_EXHAUSTED"))
        ),
        "refusal p50 ms": percentile(times, 50) * 1e3,
        "refusal p99 ms": percentile(times, 99) * 1e3,
        "refusals with retry delay": sum(1 for a in refused if a.retry_delay is not None),
        "retry delays s": sorted({a.retry_delay for a in refused if a.retry_delay is not None}),
        "accepted p50 s": percentile([a.seconds for a in accepted], 50),
        "accepted tokens": sum(a.tokens for a in accepted),
        "http statuses": dict(Counter(a.http_status for a in attempts if a.http_status)),
    }


async def scenario_overload(
    args: argparse.Namespace, server: tuple[Any, Proc], gateway: Proc | None, pb: Any
) -> dict[str, Any]:
    stub, proc = server
    requests, warm = generation_requests(pb, args.overload_requests, args.overload_tokens, 2000)
    await one_stream(stub, pb, warm, 0)
    s0 = await scrape(proc.metrics_url)
    grpc_attempts = await overload_grpc(stub, pb, requests)
    s1 = await scrape(proc.metrics_url)
    out: dict[str, Any] = {
        "expected accepted": args.overload_max_queue + args.overload_max_active,
        "grpc": overload_row(grpc_attempts),
        "grpc rejections_total delta": delta(s0, s1, "protoserve_rejections_total", model=MODEL),
    }
    if gateway is not None:
        bodies = [
            {
                "inputs": p,
                "parameters": {
                    "max_new_tokens": args.overload_tokens,
                    "temperature": 0.8,
                    "seed": 3000 + i,
                },
            }
            for i, p in enumerate(generation_prompts(args.overload_requests))
        ]
        http_attempts = await overload_http(f"http://{gateway.target}", bodies)
        s2 = await scrape(proc.metrics_url)
        out["gateway"] = overload_row(http_attempts)
        out["gateway rejections_total delta"] = delta(
            s1, s2, "protoserve_rejections_total", model=MODEL
        )
    return out


# ---------------------------------------------------------------------------
# Report.


def report_embed(r: dict[str, Any], args: argparse.Namespace) -> list[str]:
    rows = [
        (
            name,
            p["ok"],
            p["failed"],
            fmt(p["seconds"]),
            fmt(p["req_per_s"]),
            fmt(p["p50_ms"]),
            fmt(p["p90_ms"]),
            fmt(p["p99_ms"]),
        )
        for name, p in r["phases"].items()
    ]
    c = r["correctness"]
    out = [
        "## 1. Embed: dynamic batching",
        "",
        f"One text of {args.embed_chars[0]}-{args.embed_chars[1]} characters per request; "
        f"closed loop, {fmt(args.embed_seconds)} s "
        f"per phase in {args.rounds} alternating round(s).",
        "",
        md_table(
            ("phase", "ok", "failed", "s", "req/s", "p50 ms", "p90 ms", "p99 ms"),
            rows,
        ),
        "",
    ]
    out += [f"- **{k}: {fmt(v, 2)}x**" for k, v in r["ratios"].items()]
    out += [
        f"- correctness: {c['texts compared']} texts, max abs diff concurrent batched vs one "
        f"at a time = {c['max abs diff (concurrent batched vs one at a time)']:.3g} "
        f"(limit 1e-5); --no-batching vs one at a time = "
        f"{c['max abs diff (concurrent unbatched vs one at a time)']:.3g} "
        f"over {c['texts compared (unbatched)']} texts",
        "",
    ]
    return out


def report_generate(r: dict[str, Any], args: argparse.Namespace) -> list[str]:
    rows = [
        (
            name,
            p["ok"],
            p["failed"],
            p["tokens"],
            fmt(p["seconds"], 2),
            fmt(p["tokens_per_s"]),
            fmt(p["ttft_p50_ms"]),
            fmt(p["ttft_p99_ms"]),
            fmt(p["gap_p50_ms"]),
            fmt(p["gap_p99_ms"]),
        )
        for name, p in r["phases"].items()
    ]
    c = r["correctness"]
    out = [
        "## 2. Generation: continuous batching",
        "",
        f"GenerateStream, max_new_tokens={args.gen_tokens}, temperature 0.8, seeds 1000+i, "
        "distinct prompts. Alone: tokens over the sum of the stream times; concurrent: tokens "
        "over the wall time from the first call to the last stream's end. Gap: between "
        "successive messages carrying tokens.",
        "",
        md_table(
            (
                "phase",
                "ok",
                "failed",
                "tokens",
                "s",
                "tokens/s",
                "TTFT p50 ms",
                "TTFT p99 ms",
                "gap p50 ms",
                "gap p99 ms",
            ),
            rows,
        ),
        "",
    ]
    out += [f"- **{k}: {fmt(v, 2)}x**" for k, v in r["ratios"].items()]
    out += [
        f"- correctness: {c['streams compared']} streams compared with their alone run: "
        f"**{c['mismatches (concurrent batched vs alone)']} mismatches** (batched, to float "
        f"rounding: at most {MAX_ROUNDED_TEXTS} allowed), "
        f"{c['mismatches (concurrent --no-batching vs alone)']} (--no-batching)",
    ]
    if not r["continuous batching seen"]:
        out.append(
            '- NOTE: the batched server observed no `protoserve_batch_size{kind="generate"}`: '
            f"{MODEL} has no batch decoder there, so it fell back to round-robin stepping and "
            "the continuous / round-robin ratio is expected to be about 1."
        )
    out.append("")
    return out


def report_overload(r: dict[str, Any], args: argparse.Namespace) -> list[str]:
    header = ("path", "sent", "accepted OK", "refused", "other", "refusal p50 ms")
    header += ("refusal p99 ms", "retry info", "accepted p50 s")
    rows = []
    for key, label in (("grpc", "gRPC GenerateStream"), ("gateway", "gateway POST :generate")):
        if key not in r:
            continue
        o = r[key]
        retry = f"{o['refusals with retry delay']}/{o['refused (RESOURCE_EXHAUSTED / 429)']}"
        rows.append(
            (
                label,
                o["sent"],
                o["accepted (completed OK)"],
                o["refused (RESOURCE_EXHAUSTED / 429)"],
                o["other outcomes"] or 0,
                fmt(o["refusal p50 ms"]),
                fmt(o["refusal p99 ms"]),
                f"{retry} ({', '.join(fmt(d) + ' s' for d in o['retry delays s'])})",
                fmt(o["accepted p50 s"], 2),
            )
        )
    out = [
        "## 3. Overload",
        "",
        f"`--max-queue {args.overload_max_queue} --max-active {args.overload_max_active}`; "
        f"{args.overload_requests} generations of max_new_tokens={args.overload_tokens} "
        f"sent at once (expected accepted: max_queue + max_active = {r['expected accepted']}). "
        "Retry info: gRPC RetryInfo detail / HTTP Retry-After header, on the refusals.",
        "",
        md_table(header, rows),
        "",
        *(
            f"- NOTE ({key}): {r[key]['accepted (completed OK)']} accepted, not the "
            f"{r['expected accepted']} that fit (a call may have ended before the last arrived)"
            for key in ("grpc", "gateway")
            if key in r and r[key]["accepted (completed OK)"] != r["expected accepted"]
        ),
        f"- rejections_total delta: gRPC {fmt(r['grpc rejections_total delta'], 0)}"
        + (f", gateway {fmt(r['gateway rejections_total delta'], 0)}" if "gateway" in r else ""),
        "",
    ]
    return out


def report_metrics(results: dict[str, Any]) -> list[str]:
    keys = (
        "batch_size[embed] count",
        "batch_size[embed] mean",
        "batch_size[generate] count",
        "batch_size[generate] mean",
        "generated_tokens_total",
        "queue_duration_seconds count",
        "queue_duration mean ms",
        "rejections_total",
    )
    out = ["## 4. Server metrics", ""]
    if "embed" in results or "generate" in results:
        out += [
            "Deltas of each server's /metrics between scrapes just before and just after "
            "each phase (summed over rounds); the last column is the batched server over the "
            "whole scenario. batch_size mean = histogram sum / count.",
            "",
        ]
    for scenario, label in (("embed", "Scenario 1 (Embed)"), ("generate", "Scenario 2")):
        if scenario not in results:
            continue
        columns = list(results[scenario]["metrics"].items())
        rows = [(k, *(fmt(m[k], 2) for _, m in columns)) for k in keys]
        out += [f"{label}:", "", md_table(("metric", *(c for c, _ in columns)), rows), ""]
    if "generate" in results:
        for phase, g in results["generate"]["gauges"].items():
            out.append(
                f"- protoserve_streams_in_flight during {phase}: "
                f"max {fmt(g['streams_in_flight max'], 0)}, median "
                f"{fmt(g['streams_in_flight median'], 0)} over {g['scrapes']} scrapes; "
                f"protoserve_queue_depth max {fmt(g['queue_depth max'], 0)}"
            )
    if "overload" in results:
        o = results["overload"]
        out.append(
            "- protoserve_rejections_total (overload server): "
            f"+{fmt(o['grpc rejections_total delta'], 0)} over the gRPC burst"
            + (
                f", +{fmt(o['gateway rejections_total delta'], 0)} over the gateway burst"
                if "gateway" in o
                else ""
            )
        )
    out.append("")
    return out


def checks(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """What went wrong: unexpected errors and failed correctness checks."""
    failed: list[str] = []
    if "embed" in results:
        e = results["embed"]
        for name, p in e["phases"].items():
            if p["failed"]:
                failed.append(f"embed, {name}: {p['failed']} failed requests {p['errors']}")
        c = e["correctness"]
        key = "max abs diff (concurrent batched vs one at a time)"
        if not c[key] <= 1e-5:  # NaN (nothing compared) fails too
            failed.append(f"embed: {key} = {c[key]:.3g} > 1e-5")
        key = "max abs diff (concurrent unbatched vs one at a time)"
        if c["texts compared (unbatched)"] and not c[key] <= 1e-5:
            failed.append(f"embed: {key} = {c[key]:.3g} > 1e-5")
    if "generate" in results:
        g = results["generate"]
        for name, p in g["phases"].items():
            if p["failed"]:
                failed.append(f"generation, {name}: {p['failed']} failed streams {p['errors']}")
        c = g["correctness"]
        if c["mismatches (concurrent batched vs alone)"] > MAX_ROUNDED_TEXTS:
            failed.append(
                f"generation: {c['mismatches (concurrent batched vs alone)']} concurrent "
                f"batched streams differ from their alone text: {c['mismatched indices']}"
            )
        if c["mismatches (concurrent --no-batching vs alone)"]:
            failed.append(
                f"generation: {c['mismatches (concurrent --no-batching vs alone)']} "
                "--no-batching streams differ from their alone text"
            )
        if not c["streams compared"]:
            failed.append("generation: no stream could be compared with its alone run")
    if "overload" in results:
        o = results["overload"]
        for key in ("grpc", "gateway"):
            if key not in o:
                continue
            row = o[key]
            refused = row["refused (RESOURCE_EXHAUSTED / 429)"]
            if row["other outcomes"]:
                failed.append(f"overload ({key}): unexpected outcomes {row['other outcomes']}")
            if row["refusals with retry delay"] != refused:
                failed.append(
                    f"overload ({key}): {refused - row['refusals with retry delay']} of "
                    f"{refused} refusals carried no retry delay"
                )
            if not refused:
                failed.append(f"overload ({key}): nothing was refused")
            if not row["accepted (completed OK)"]:
                failed.append(f"overload ({key}): nothing was accepted")
    return failed


# ---------------------------------------------------------------------------


def _char_range(value: str) -> tuple[int, int]:
    least, _, most = value.partition("-")
    try:
        bounds = (int(least), int(most or least))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not LEAST-MOST, e.g. 60-100") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"{value!r}: need 1 <= LEAST <= MOST")
    return bounds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer seconds and requests (under a minute on 2 quiet cores); flags still win",
    )
    parser.add_argument(
        "--scenarios",
        default="embed,generate,overload",
        help="comma-separated subset of embed,generate,overload (default: all)",
    )
    add = parser.add_argument
    add("--rounds", type=int, help="alternating rounds of the embed phases (default 2, quick 1)")
    add("--embed-seconds", type=float, help="seconds per embed phase (default 30, quick 5)")
    add("--embed-clients", type=int, default=64, help="concurrent embed clients (default 64)")
    add("--embed-texts", type=int, default=512, help="distinct texts to embed (default 512)")
    add(
        "--embed-chars",
        type=_char_range,
        default=(60, 100),
        help="length of each embed text, LEAST-MOST characters (default 60-100)",
    )
    add("--embed-sample", type=int, default=64, help="texts checked for equal vectors (64)")
    add("--gen-streams", type=int, default=32, help="concurrent generations (default 32)")
    add("--gen-tokens", type=int, help="max_new_tokens per generation (default 64, quick 32)")
    add(
        "--gen-alone",
        type=int,
        help="how many of the generations run alone, one after another, as the reference "
        "(default: all; quick 8)",
    )
    add("--overload-requests", type=int, help="generations sent at once (default 64, quick 32)")
    add("--overload-tokens", type=int, help="their max_new_tokens (default 200, quick 100)")
    add("--overload-max-queue", type=int, default=8, help="--max-queue of that server (8)")
    add("--overload-max-active", type=int, default=4, help="--max-active of that server (4)")
    add("--no-gateway", action="store_true", help="skip the overload burst through the gateway")
    add("--server-python", help="the Python that starts the servers (default: this or .venv)")
    add(
        "--server-threads",
        type=int,
        help="OMP_NUM_THREADS for the servers (default: unset, torch's one per core)",
    )
    add("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "rounds": 1 if quick else 2,
        "embed_seconds": 5.0 if quick else 30.0,
        "gen_tokens": 32 if quick else 64,
        "gen_alone": 8 if quick else 0,
        "overload_requests": 32 if quick else 64,
        "overload_tokens": 100 if quick else 200,
    }
    for key, default in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    args.scenarios = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    unknown = args.scenarios - {"embed", "generate", "overload"}
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    args.rounds = max(1, args.rounds)
    return args


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import grpc

    pb, stubs = import_protoserve(tmp)
    python = args.server_python or server_python()
    results: dict[str, Any] = {"versions": versions(python)}
    results["load average before"] = list(os.getloadavg())
    procs: list[Proc] = []
    with stopping(procs):
        # Every server starts at once (they load in parallel), then waits idle.
        both = args.scenarios & {"embed", "generate"}
        if both:
            for name, flag in (("batched", "--batching"), ("unbatched", "--no-batching")):
                procs.append(launch(python, tmp, name, "serve", [flag], True, args.server_threads))
        if "overload" in args.scenarios:
            flags = ["--max-queue", str(args.overload_max_queue)]
            flags += ["--max-active", str(args.overload_max_active)]
            procs.append(launch(python, tmp, "overload", "serve", flags, True, args.server_threads))
        deadline = time.monotonic() + 180
        for p in procs:
            await wait_ready(p, pb, stubs, deadline)
        by_name = {p.name: p for p in procs}
        channels = {p.name: grpc.aio.insecure_channel(p.target) for p in procs}
        try:
            stub = {n: stubs.InferenceServiceStub(c) for n, c in channels.items()}
            if "embed" in args.scenarios:
                started = time.perf_counter()
                results["embed"] = await scenario_embed(
                    args,
                    (stub["batched"], by_name["batched"]),
                    (stub["unbatched"], by_name["unbatched"]),
                    pb,
                )
                results["embed"]["wall s"] = time.perf_counter() - started
            if "generate" in args.scenarios:
                started = time.perf_counter()
                results["generate"] = await scenario_generate(
                    args,
                    (stub["batched"], by_name["batched"]),
                    (stub["unbatched"], by_name["unbatched"]),
                    pb,
                )
                results["generate"]["wall s"] = time.perf_counter() - started
            if "overload" in args.scenarios:
                gateway = None
                if not args.no_gateway:
                    upstream = ["--upstream", by_name["overload"].target]
                    gateway = launch(python, tmp, "gateway", "gateway", upstream, False)
                    procs.append(gateway)
                    await wait_gateway(gateway, time.monotonic() + 120)
                started = time.perf_counter()
                results["overload"] = await scenario_overload(
                    args, (stub["overload"], by_name["overload"]), gateway, pb
                )
                results["overload"]["wall s"] = time.perf_counter() - started
        finally:
            for channel in channels.values():
                await channel.close()
    # Anything the servers logged at WARNING or above, shutdown included (the report shows it).
    results["server logs"] = {p.name: p.log_tail(30) for p in procs if p.log_tail(30).strip()}
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="protoserve-load-") as tmp:
        results = asyncio.run(run(args, Path(tmp)))
    results["total wall s"] = time.perf_counter() - started
    results["settings"] = {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()}
    results["settings"]["json"] = str(args.json) if args.json else None
    failed = checks(results, args)
    results["failed checks"] = failed

    v = results["versions"]
    lines = [
        "# protoserve runtime under load (issue #5)",
        "",
        f"- machine: {v['machine']}; {v['platform']}",
        "- " + ", ".join(f"{k} {v[k]}" for k in v if k not in ("machine", "platform")),
        "- load average before the run: "
        + " ".join(f"{x:.2f}" for x in results["load average before"])
        + f"; this run took {results['total wall s']:.0f} s"
        + (" (--quick)" if args.quick else ""),
        "- servers' torch intra-op threads: "
        + (
            f"OMP_NUM_THREADS={args.server_threads} (--server-threads)"
            if args.server_threads
            else "torch's default (one per core)"
        ),
        f"- **The client (this process) and the servers share the {os.cpu_count()} CPUs: read "
        "the ratios, not the absolute figures.**",
        "",
    ]
    if "embed" in results:
        lines += report_embed(results["embed"], args)
    if "generate" in results:
        lines += report_generate(results["generate"], args)
    if "overload" in results:
        lines += report_overload(results["overload"], args)
    if "embed" in results or "generate" in results or "overload" in results:
        lines += report_metrics(results)
    if results["server logs"]:
        lines += ["## Server logs (WARNING and above)", ""]
        for name, text in results["server logs"].items():
            lines += [f"{name}:", "", "```", text, "```", ""]
    lines += ["## Verdict", ""]
    lines += [f"- FAILED: {f}" for f in failed] or [
        "- every request counted succeeded; every correctness check held"
    ]
    print("\n".join(lines))
    if failed:
        print(f"runtime_load: {len(failed)} check(s) FAILED (see the verdict)", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(finite(results), indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
