"""The benchmarks' one driver: protoserve against the model's own speed, itself and its peers.

``nox -s bench -- [GROUP] [--quick]`` runs a group of scenarios (GROUPS below; what each
compares: bench/README.md) and writes ``bench/results/<name>.md``, ``.json`` and plots.
Every figure judged is a ratio of two things measured in this run, one after the other.
A failed request or correctness check is listed under *Failures* and makes the exit 1.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _loadgen as lg
import _model
import _openai
import _report
import _servers as srv
import grpc

from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.inference.v1 import inference_service_pb2_grpc as stubs

RESULTS = srv.ROOT / "bench" / "results"
MLP, TEXT_MODEL = "mlp", "bytelm"
#: Environment variables `nox -s bench` sets: where perf_analyzer is, and its libraries.
PERF_ANALYZER_ENV = "PROTOSERVE_PERF_ANALYZER"
PERF_ANALYZER_LIBS_ENV = "PROTOSERVE_PERF_ANALYZER_LD_LIBRARY_PATH"
SERVICE = "/protoserve.inference.v1.InferenceService/"
GROUPS = {
    "suite": ("gateway", "streams", "limit", "batching", "paths", "echo", "peers", "workers",
              "replicas", "instances", "memory"),
    "runtime": ("embed", "generate", "overload"),
    "decoding": ("decoding",),
    "openai": ("openai",),
}  # fmt: skip
SCENARIOS = tuple(name for names in GROUPS.values() for name in names)
#: The external load generators each scenario runs (ADR 0014).
TOOLS = {"gateway": ("perf_analyzer", "wrk", "h2load"), "limit": ("perf_analyzer", "h2load"),
         "batching": ("h2load",), "peers": ("wrk", "h2load"), "embed": ("h2load",),
         "echo": ("h2load",), "workers": ("h2load",), "replicas": ("wrk",),
         "instances": ("h2load",)}  # fmt: skip
#: protoserve as shipped: the default log level, INFO, writes one access line per call
#: (the suite's other servers run at --log-level WARNING, as they always have).
ACCESS_LOGS = ("--log-level", "INFO")
#: How a refusal ends: over gRPC, and through the gateway.
REFUSED = ("RESOURCE_EXHAUSTED", "429")
#: Most concurrent batched streams whose text may differ from their alone text: batched
#: decoding matches a lone run to float rounding, and a near-tie token may go the other
#: way (none of 64 texts did on any of 9 dispatch paths in the decoding run of 2026-12-02).
MAX_ROUNDED_TEXTS = 2
#: The servers' counters and histograms the runtime's scenarios report, by what the
#: report calls them: (the sample's name, its ``kind`` label).
COUNTED = {
    **{f"batch_size[{kind}] {part}": (f"protoserve_batch_size_{part}", kind)
       for kind in ("embed", "generate") for part in ("count", "sum")},
    "generated_tokens_total": ("protoserve_generated_tokens_total", ""),
    "queue_duration_seconds count": ("protoserve_queue_duration_seconds_count", ""),
    "queue_duration_seconds sum": ("protoserve_queue_duration_seconds_sum", ""),
    "rejections_total": ("protoserve_rejections_total", ""),
}  # fmt: skip


# The workload: texts and prompts, varied and reproducible; the machine ---------------------------

_WORDS = (
    "def class return import from yield lambda async await self value items key "
    "result buffer offset length header stream socket thread lock queue event "
    "parse format encode decode read write open close flush path name args kwargs "
    "None True False for while if else elif try except finally with as raise"
).split()

_PROMPTS = (
    "def fibonacci(n):\n", "import os\nimport sys\n\n", "class Queue:\n    def __init__(self",
    "    for key, value in items.items():\n", 'def read_config(path):\n    """Read the',
    "try:\n    import json\nexcept ImportError:\n",
    "    if not isinstance(name, str):\n        raise", "from collections import",
    "def main(argv=None):\n    parser = ", "    return self._buffer[",
    "with open(filename, 'rb') as f:\n", "class Error(Exception):\n",
    "    def __repr__(self):\n        return", "async def fetch(session, url):\n",
    "# Copyright 2001 Python Software Foundation\n", "    while True:\n        line = ",
)  # fmt: skip


def embed_texts(count: int, chars: Sequence[int] = (60, 100), seed: int = 5) -> list[str]:
    """``count`` distinct texts of ``chars`` (least, most) characters of Python-like words."""
    rng, texts = random.Random(seed), {}
    while len(texts) < count:
        size = rng.randint(chars[0], chars[-1])
        texts[" ".join(rng.choices(_WORDS, k=size))[:size]] = None  # words are 2+ characters
    return list(texts)


def generation_prompts(count: int) -> list[str]:
    """``count`` distinct prompts: the base prompts, varied by a numbered comment."""
    return [
        (f"# case {i}\n" if i >= len(_PROMPTS) else "") + _PROMPTS[i % len(_PROMPTS)]
        for i in range(count)
    ]


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def versions(tools: Sequence[str], env: dict[str, str] | None) -> dict[str, str]:
    """protoserve's, Python's, its main dependencies' and the tools' versions (a tool's: the
    first word of its ``--version`` that is one, after any "/": "wrk debian/4.1.0-3+b2")."""
    out = {"protoserve": "-", "python": platform.python_version()}
    for dist in ("protoserve", "torch", "grpcio", "protobuf", "starlette", "uvicorn"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    for tool in tools:
        got = subprocess.run([tool, "--version"], capture_output=True, text=True, env=env)
        words = [w.rsplit("/", 1)[-1] for w in (got.stdout + got.stderr).split()]
        out[Path(tool).name] = next((w for w in words if w[:1].isdigit() and "." in w), "?")
    return out


def machine() -> dict[str, Any]:
    """What a report says about the machine: CPU, cores, memory, OS, load before the run."""
    from protoserve.server.runtime.dispatch import cpu_name

    meminfo = Path("/proc/meminfo").read_text().split()
    memory = int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20
    load = [round(x, 2) for x in os.getloadavg()]
    return {"cpu": cpu_name(), "cpus": os.cpu_count(), "memory_gib": round(memory, 1),
            "os": platform.platform(), "load_before": load}  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """How long and how wide each measurement is: the full run or ``--quick``; any field
    can be set with ``--set NAME=VALUE``."""

    seconds: float = 8.0  # one measurement window (one concurrency level of one series)
    levels: tuple[int, ...] = (1, 16, 64)  # concurrency levels of the unary sweeps
    peer_levels: tuple[int, ...] = (1, 16, 64)
    echo_calls: int = 20000  # h2load -n of each echo-floor run (-c 1 -m 16)
    workers_connections: int = 8  # h2load -c of the workers scenario
    workers_streams: int = 8  # h2load -m (calls in flight per connection)
    replicas_connections: int = 16  # wrk -c of the replicas scenario
    stream_tokens: int = 64
    stream_counts: tuple[tuple[int, int], ...] = ((1, 16), (16, 64))  # concurrency, streams
    limit_batch: int = 64
    both_generators: bool = True  # h2load/wrk beside perf_analyzer in the gateway scenario
    rounds: int = 2  # alternating rounds of the embed phases
    embed_seconds: float = 30.0  # of each embed phase, over its rounds
    embed_clients: int = 64
    embed_texts: int = 512
    embed_chars: tuple[int, ...] = (60, 100)
    embed_sample: int = 64  # texts whose vectors are compared
    gen_streams: int = 32
    gen_tokens: int = 64
    gen_alone: int = 0  # how many generations run alone, as the reference; 0: all
    overload_requests: int = 64
    overload_tokens: int = 200
    overload_max_queue: int = 8
    overload_max_active: int = 4
    overload_gateway: bool = True  # the burst through the gateway too
    decode_steps: int = 48
    decode_texts: int = 64
    decode_text_tokens: int = 256
    decode_repeats: int = 30
    openai_counts: tuple[tuple[int, int], ...] = ((1, 32), (4, 64))  # concurrency, streams
    openai_tokens: int = 32
    aiperf_concurrency: int = 4
    aiperf_requests: int = 40
    aiperf_input_tokens: int = 64


FULL = Plan()
QUICK = Plan(seconds=3.0, peer_levels=(1, 16), echo_calls=6000, stream_tokens=32,
             stream_counts=((1, 6), (16, 32)),
             both_generators=False, rounds=1, embed_seconds=5.0, gen_tokens=32, gen_alone=8,
             overload_requests=32, overload_tokens=100, decode_steps=16, decode_texts=32,
             decode_text_tokens=128, decode_repeats=10, openai_counts=((1, 12), (4, 24)),
             aiperf_requests=20)  # fmt: skip


@dataclass
class Suite:
    """What the scenarios share: the run's settings, processes and findings."""

    args: argparse.Namespace
    plan: Plan
    tmp: Path
    python: str
    perf_analyzer: Path | None
    pa_env: dict[str, str]
    model_file: Path
    procs: list[srv.Proc] = field(default_factory=list)
    started: dict[str, srv.Proc] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    memory: list[list[Any]] = field(default_factory=list)
    #: scenario -> phase -> the COUNTED deltas of its server over the phase (all rounds).
    metrics: dict[str, dict[str, Counter[str]]] = field(default_factory=dict)
    #: Each peer's Python, and aiperf's, in its own virtualenv (made before the timed run).
    peer_pythons: dict[str, Path] = field(default_factory=dict)

    def check(self, point: lg.Point, where: str) -> lg.Point:
        """Keep ``point``; a failed request in it is a failure of the run."""
        if point.failed or point.ok == 0:
            what = f"{point.failed} failed, {point.ok} ok {point.extra.get('error_sample', '')}"
            self.failures.append(f"{where}: {point.label} at concurrency {point.concurrency}: "
                                 f"{what.strip()}")  # fmt: skip
        return point

    def perf(self, target: str, protocol: str, c: int, label: str) -> lg.Point:
        # REST clients send JSON: the binary tensor extension is Triton's, not REST's.
        json_tensors = ("--input-tensor-format", "json", "--output-tensor-format", "json")
        # Stability 100 %: on shared cores a stability rule only decides how long to wait, and
        # a run that never settles is not a failure; the windows are reported as measured.
        point = lg.perf_analyzer(
            self.perf_analyzer, self.pa_env, url=target, protocol=protocol, model=MLP,  # type: ignore
            concurrency=c, seconds=self.plan.seconds, tmp=self.tmp, label=label, stability=100.0,
            max_trials=3, extra_args=json_tensors if protocol == "http" else ())  # fmt: skip
        return self.check(point, "perf_analyzer")

    async def streams(self, proc: srv.Proc, requests: Sequence[Any], c: int, label: str,
                      where: str) -> lg.Point:  # fmt: skip
        return self.check(await lg.grpc_streams(proc.target, requests, c, label), where)

    async def server(self, name: str = "server", *flags: str,
                     env: dict[str, str] | None = None) -> srv.Proc:  # fmt: skip
        """Server ``name``, started on first use from the repository (bytelm and the MLP)
        with ``--max-active 64 --max-queue 256`` and then ``flags``."""
        if name not in self.started:
            common = ["--model-repository", str(self.tmp / "repository"), "--max-active", "64"]
            common += ["--max-queue", "256", *flags]
            threads = self.args.server_threads
            proc = srv.launch(self.python, self.tmp, name, "serve", common, threads, env)
            self.procs.append(proc)
            await srv.wait_ready(proc, time.monotonic() + 240, (TEXT_MODEL, MLP))
            self.started[name] = proc
        return self.started[name]

    async def unbatched(self) -> srv.Proc:
        return await self.server("unbatched", "--no-batching")

    async def logged(self) -> srv.Proc:
        """The suite's server with its access lines on (the default log level, INFO)."""
        return await self.server("logged", *ACCESS_LOGS)

    async def gateway(self, upstream: srv.Proc, *more: str) -> srv.Proc:
        """A gateway in front of ``upstream``, started on first use, with ``more`` flags."""
        name = "gateway" if upstream.name == "server" else f"gateway-{upstream.name}"
        if name not in self.started:
            flags = ["--upstream", upstream.target, *more]
            self.procs.append(proc := srv.launch(self.python, self.tmp, name, "gateway", flags))
            await srv.wait_ready(proc, time.monotonic() + 120, paths=["/v1/models"])
            self.started[name] = proc
        return self.started[name]

    @contextlib.contextmanager
    def peak_rss(self, procs: Sequence[srv.Proc], phase: str) -> Iterator[None]:
        """Sample the resident memory of ``procs`` (with their children) while the block runs."""
        idle = {p.name: lg.tree_rss_bytes(p.pid) for p in procs}
        # Proportional set size: a library two processes of a tree map counts once in all.
        pss = {p.name: lg.tree_pss_bytes(p.pid) for p in procs}
        with lg.RssSampler([p.pid for p in procs]) as sampler:
            yield
        for p in procs:
            name = {"server": "protoserve server", "gateway": "protoserve gateway",
                    "unbatched": "unbatched server",
                    "logged": "protoserve server (access logs on)",
                    "gateway-logged": "protoserve gateway (access logs on)",
                    "echo": "echo floor (bare grpc.aio)"}.get(p.name)  # fmt: skip
            if p.name.startswith("workers-"):  # the process and its workers
                name = f"protoserve server --workers {p.name.split('-')[1]} (all processes)"
            figures = (idle[p.name], pss[p.name], sampler.peak(p.pid))
            self.memory.append([name or p.name, *(round(n / 2**20, 1) for n in figures), phase])

    @contextlib.asynccontextmanager
    async def around(self, scenario: str, phase: str, proc: srv.Proc) -> AsyncIterator[None]:
        """Add what ``proc``'s /metrics counted over the block to the phase's figures."""
        before = lg.scrape(proc.metrics_url)
        yield
        after = lg.scrape(proc.metrics_url)
        sums = self.metrics.setdefault(scenario, {}).setdefault(phase, Counter())
        for key, (name, kind) in COUNTED.items():
            labels = {"model": TEXT_MODEL, **({"kind": kind} if kind else {})}
            sums[key] += lg.value(after, name, **labels) - lg.value(before, name, **labels)


# Shapes of the report, and requests --------------------------------------------------------------


def section(key: str, title: str, description: str, settings: dict[str, Any] | None = None, *,
            series: Sequence[dict[str, Any]] = (), tables: Sequence[dict[str, Any]] = (),
            targets: Sequence[dict[str, Any]] = (), notes: Sequence[str] = (),
            plot: bool = False, **more: Any) -> dict[str, Any]:  # fmt: skip
    """One scenario of the report, as bench/_report.py renders it."""
    return {"id": key, "title": title, "description": description, "settings": settings or {},
            "series": list(series), "plot": plot, "tables": list(tables),
            "targets": list(targets), "notes": list(notes), **more}  # fmt: skip


def series(label: str, points: Sequence[lg.Point]) -> dict[str, Any]:
    return {"label": label, "generator": points[0].generator,
            "points": [p.as_dict() for p in points]}  # fmt: skip


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    return {"title": title, "header": list(header), "rows": [list(r) for r in rows]}


def target(name: str, value: float, goal: str, met: bool | None, detail: str, *,
           issue: int | None = None) -> dict[str, Any]:  # fmt: skip
    """A target of the report; ``met`` None: a figure reported, not judged (or not measured).
    ``issue``: the issue that set it (the report lists issue #18's side by side first)."""
    return {"name": name, "value": value, "target": goal, "met": None if met is None else
            bool(met), "detail": detail, **({"issue": issue} if issue else {})}  # fmt: skip


def at(points: Sequence[lg.Point], c: int) -> lg.Point:
    return next(p for p in points if p.concurrency == c)


def fig(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def versus(label: str, a: float, b: float) -> list[str]:
    """A table row: a, b and a / b."""
    return [label, fig(a), fig(b), fig(ratio(a, b))]


def stream_requests(count: int, tokens: int, first_seed: int = 1000) -> list[Any]:
    """``count`` GenerateStreamRequests: distinct prompts, seeds from ``first_seed``."""
    bodies = lg.stream_bodies(generation_prompts(count), max_new_tokens=tokens,
                              temperature=0.8, first_seed=first_seed)  # fmt: skip
    return lg.grpc_requests(bodies, pb.GenerateStreamRequest)


def embed_request(text: str) -> Any:
    return pb.EmbedRequest(model=TEXT_MODEL, inputs=[text])


def as_json(message: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True)


def h2load(s: Suite, proc: srv.Proc, method: str, message: bytes, c: int, label: str,
           seconds: float | None = None, *, requests: int | None = None,
           path: str | None = None) -> lg.Point:  # fmt: skip
    """h2load on one of our servers for ``seconds`` (or ``requests`` calls) of ``method``
    (its metrics label; at ``path``, by default InferenceService's): h2load ignores
    grpc-status, the server's counter does not."""
    url = proc.metrics_url or ""
    before = lg.settled_requests(url, method)
    window = None if requests else seconds or s.plan.seconds
    point = lg.h2load_grpc(f"http://{proc.target}", path or SERVICE + method, message, c,
                           window, s.tmp, label, requests=requests)  # fmt: skip
    point.extra["grpc_codes"] = delta = lg.requests_delta(before, lg.settled_requests(url, method))
    if problem := lg.check_grpc_counts(point, delta):
        s.failures.append(f"h2load {label} at concurrency {c}: {problem}")
    return s.check(point, "h2load")


def run_model(s: Suite, what: str, env: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """``bench/_model.py`` in a process of its own, with the servers' Python: its JSON."""
    cmd = [s.python, str(srv.ROOT / "bench" / "_model.py"), what, json.dumps(kwargs)]
    threads = s.args.server_threads
    env = {**os.environ, **(env or {}), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    got = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=srv.ROOT, env=env)
    if got.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{got.stderr[-2000:]}")
    return json.loads(got.stdout.strip().splitlines()[-1])


def python_says(s: Suite, code: str) -> str:
    """What ``code`` prints in the servers' Python."""
    got = subprocess.run([s.python, "-c", code], capture_output=True, text=True, check=False)
    return got.stdout.strip() or got.stderr.strip()[-300:]


def dispatch_paths(s: Suite) -> list[tuple[str, dict[str, str], str | None]]:
    """Every CPU dispatch path, as the servers' Python sees this machine:
    (name, the environment that selects it, why this machine cannot run it)."""
    code = ("import json; from protoserve.server.runtime.dispatch import dispatch_paths as d; "
            "print(json.dumps([[str(p), p.env(), why] for p, why in d()]))")  # fmt: skip
    return [
        (name, env, why) for name, env, why in json.loads(python_says(s, code).splitlines()[-1])
    ]


# The suite's scenarios (issue #7) ----------------------------------------------------------------


async def scenario_gateway(s: Suite) -> dict[str, Any]:
    server = await s.server()
    gateway = await s.gateway(server)
    grpc_pts, http_pts, h2_pts, wrk_pts = [], [], [], []
    with s.peak_rss([server, gateway], "gateway, unary"):
        for i, c in enumerate(s.plan.levels):
            # Alternate which goes first, so that neither always runs on a fresher machine.
            for proto in ("grpc", "http") if i % 2 == 0 else ("http", "grpc"):
                if proto == "grpc":
                    grpc_pts.append(s.perf(server.target, "grpc", c, "gRPC direct"))
                else:
                    http_pts.append(s.perf(gateway.target, "http", c, "REST via gateway"))
        if s.plan.both_generators:
            message = predict_message()
            body = json.dumps(as_json(message)).encode()
            url = f"http://{gateway.target}/v1/models/{MLP}:predict"
            for c in s.plan.levels:
                grpc_message = message.SerializeToString()
                h2_pts.append(h2load(s, server, "Predict", grpc_message, c, "v1 gRPC"))
                point = lg.wrk(url, body, "application/json", c, s.plan.seconds, s.tmp, "v1 REST")
                wrk_pts.append(s.check(point, "wrk"))
    out = [series("gRPC direct", grpc_pts), series("REST via gateway", http_pts)]
    targets = []
    if 16 in s.plan.levels:
        g, r = at(grpc_pts, 16), at(http_pts, 16)
        value = ratio(r.throughput, g.throughput)
        for goal, issue in ((0.70, 7), (0.80, 18)):
            targets.append(target(
                "REST via the gateway / direct gRPC throughput at concurrency 16 "
                "(perf_analyzer)", value, f">= {goal:.2f}", value >= goal,
                f"{fig(r.throughput)} vs {fig(g.throughput)} infer/s; p99 {fig(r.p99_ms)} vs "
                f"{fig(g.p99_ms)} ms", issue=issue))  # fmt: skip
    ratios = [[c, fig(ratio(at(http_pts, c).throughput, at(grpc_pts, c).throughput)), ""]
              for c in s.plan.levels]  # fmt: skip
    if h2_pts:
        out += [series("v1 gRPC", h2_pts), series("v1 REST", wrk_pts)]
        for row in ratios:
            row[2] = fig(ratio(at(wrk_pts, row[0]).throughput, at(h2_pts, row[0]).throughput))
    return section(
        "gateway", "Gateway overhead: unary calls",
        f"One call of the `{MLP}` TorchScript model (one row of {_model.FEATURES} float32) "
        "straight to the server over gRPC, and through `protoserve gateway` over HTTP/1.1 "
        "keep-alive (JSON). perf_analyzer drives both over the Open Inference Protocol "
        "(ModelInfer / `POST /v2/models/mlp/infer`); in full mode h2load (gRPC, HTTP/2, one "
        "connection) and wrk (HTTP/1.1, one connection per concurrent request) drive the "
        "v1 API's Predict the same way.",
        {"window_s": s.plan.seconds, "concurrency": list(s.plan.levels)}, series=out,
        tables=[table("REST / gRPC throughput",
                      ["concurrency", "perf_analyzer (OIP)", "wrk / h2load (v1)"], ratios)],
        targets=targets, plot=True,
    )  # fmt: skip


def ttft_against_baseline(s: Suite, now: lg.Point) -> dict[str, Any]:
    """Issue #18's "TTFT at concurrency 1 within 1.1x of today's": gRPC stream TTFT p50 at
    concurrency 1 against the same figure of a report before this one (``--baseline``, else
    the newest in the report's folder of the same mode): the one target across runs."""
    found: list[tuple[str, float]] = []
    paths = [s.args.baseline] if s.args.baseline else sorted(s.args.out.glob("*.json"))[::-1]
    for path in paths:
        with contextlib.suppress(OSError, ValueError, KeyError, StopIteration, TypeError):
            old = json.loads(Path(path).read_text())
            if path != s.args.baseline and (
                old.get("name") == s.args.name or bool(old.get("quick")) != bool(s.args.quick)
            ):
                continue
            streams = next(x for x in old["scenarios"] if x["id"] == "streams")
            points = next(x for x in streams["series"] if x["label"] == "gRPC stream")["points"]
            found.append((Path(path).name, next(p for p in points if p["concurrency"] == 1)
                          ["p50_ms"]))  # fmt: skip
            break
    name = "gRPC stream time to first token (p50) at concurrency 1 / the baseline report's"
    if not found or not found[0][1]:
        return target(name, math.nan, "<= 1.1", None, f"{fig(now.p50_ms)} ms; no baseline "
                      "report of this mode (--baseline FILE)", issue=18)  # fmt: skip
    file, before = found[0]
    value = ratio(now.p50_ms, before)
    return target(name, value, "<= 1.1", value <= 1.1, f"{fig(now.p50_ms)} vs {fig(before)} "
                  f"ms in {file} (another run: the machine's load differs)", issue=18)  # fmt: skip


async def scenario_streams(s: Suite) -> dict[str, Any]:
    server = await s.server()
    gateway = await s.gateway(server)
    tokens = s.plan.stream_tokens
    rows, grpc_pts, sse_pts, targets = [], [], [], []
    with s.peak_rss([server, gateway], "streams"):
        for c, count in s.plan.stream_counts:
            requests = stream_requests(count, tokens)
            bodies = [{"inputs": r.inputs, "parameters": as_json(r.parameters)} for r in requests]
            grpc_run = lg.grpc_streams(server.target, requests, c, "gRPC stream")
            url = f"http://{gateway.target}"
            sse_run = lg.sse_streams(url, TEXT_MODEL, bodies, c, "SSE via gateway")
            if len(rows) % 2:  # alternate which goes first: not always on a fresher machine
                e, g = await sse_run, await grpc_run
            else:
                g, e = await grpc_run, await sse_run
            grpc_pts.append(s.check(g, "streams"))
            sse_pts.append(s.check(e, "streams"))
            ttft, gap = (
                ratio(e.p50_ms, g.p50_ms),
                ratio(e.extra["gap_p50_ms"], g.extra["gap_p50_ms"]),
            )
            rows.append([c, count, fig(ttft), fig(ratio(e.p99_ms, g.p99_ms)), fig(gap),
                         fig(ratio(e.throughput, g.throughput))])  # fmt: skip
            targets.append(target(f"SSE / gRPC time to first token (p50) at concurrency {c}",
                                  ttft, "<= 1.2", ttft <= 1.2,
                                  f"{fig(e.p50_ms)} vs {fig(g.p50_ms)} ms"))  # fmt: skip
            if c == 1:
                targets.append(ttft_against_baseline(s, g))
    return section(
        "streams", "Gateway overhead: streaming generation",
        f"GenerateStream on bytelm ({tokens} new tokens, temperature 0.8, distinct seeds and "
        "prompts) over gRPC, and the same requests through the gateway as Server-Sent "
        "Events (`POST /v1/models/bytelm:generateStream`, HTTP/1.1 keep-alive). One client "
        "of ours drives both (perf_analyzer, wrk and h2load cannot read SSE): latency "
        "columns are time to first token; `gap` is the time between token events.",
        {"tokens": tokens, "streams": dict(s.plan.stream_counts)},
        series=[series("gRPC stream", grpc_pts), series("SSE via gateway", sse_pts)],
        tables=[table("SSE / gRPC", ["concurrency", "streams", "TTFT p50", "TTFT p99",
                                     "gap p50", "tokens/s"], rows)],
        targets=targets,
    )  # fmt: skip


async def scenario_limit(s: Suite) -> dict[str, Any]:
    server = await s.server()
    batch, secs, tokens = s.plan.limit_batch, s.plan.seconds, s.plan.stream_tokens
    text = embed_texts(1, chars=(80, 80))[0]
    alone_embed = run_model(s, "embed", batch=batch, seconds=secs, text=text)["items_per_s"]
    with s.peak_rss([server], "limit"):
        message = embed_request(text).SerializeToString()
        embed = h2load(s, server, "Embed", message, batch, "Embed, server")
        alone_predict = run_model(s, "predict", batch=batch, seconds=secs,
                                  model_file=str(s.model_file))  # fmt: skip
        predict = s.perf(server.target, "grpc", batch, "Predict, server")
        prompts = generation_prompts(batch)
        # The limit (issue #18): the model's plain batched forward; the server's own decoder
        # beside it, which steps one sequence at a time where its check fails (#8).
        plain = run_model(s, "plain_decode", batch=batch, tokens=tokens, prompts=prompts)
        decoder = run_model(s, "decode", batch=batch, tokens=tokens, prompts=prompts)
        gen = await s.streams(server, stream_requests(batch, tokens), batch,
                              "generation, server", "limit")  # fmt: skip
    limits = {"embed": alone_embed, "predict": alone_predict["items_per_s"],
              "decode": plain["decode_tokens_per_s"]}  # fmt: skip
    own = f"BatchedDecoding (the server's decoder, {decoder.get('decoding', '?')})"
    rows = [[work, fig(alone), fig(got), fig(ratio(got, alone))] for work, alone, got in (
        ("Embed (bytelm, texts/s)", limits["embed"], embed.throughput),
        (f"Predict ({MLP}, rows/s)", limits["predict"], predict.throughput),
        ("Generation (bytelm, tokens/s, decode steps): plain batched forward, sampled",
         limits["decode"], gen.throughput),
        ("Generation (bytelm, tokens/s, prefill + decode): plain batched forward, sampled",
         plain["tokens_per_s"], gen.throughput),
        (f"Generation (bytelm, tokens/s, decode steps): {own}",
         decoder["decode_tokens_per_s"], gen.throughput),
        (f"Generation (bytelm, tokens/s, prefill + decode): {own}", decoder["tokens_per_s"],
         gen.throughput),
    )]  # fmt: skip
    targets = []
    for what, key, point, goal, unit in (
        ("Embed throughput / batched forward at concurrency", "embed", embed, 0.8, "texts/s"),
        ("Predict throughput / batched forward at concurrency", "predict", predict, 0.8, "rows/s"),
        ("Generation tokens/s / plain batched forward (sampled) at", "decode", gen, 0.7,
         "tokens/s"),
    ):  # fmt: skip
        value = ratio(point.throughput, limits[key])
        detail = f"{fig(point.throughput)} vs {fig(limits[key])} {unit}"
        name = f"{what} {batch}" + (" streams" if key == "decode" else "")
        targets.append(target(name, value, f">= {goal:.2f}", value >= goal, detail,
                              issue=18 if key == "decode" else None))  # fmt: skip
    return section(
        "limit", "Distance to the limit",
        f"The model's own batched forward pass in a loop, batch {batch}, in a process of "
        "its own with the server's Python and torch threads (`bench/_model.py`), against "
        f"the server with {batch} requests in flight, one item each: Embed (one text of "
        f"{len(text)} characters; h2load), Predict (one row; perf_analyzer over gRPC), and "
        f"generation ({batch} GenerateStream calls of {tokens} tokens at once; our "
        "client). The load generator shares the cores with the server; the loop has them "
        "to itself. Generation's limit is the model's own forward on a "
        f"[{batch}, 1] input over one batched KV cache, one `F.linear` over the batch per "
        "projection, sampled at temperature 0.8 with one `sample_next` per row per step as "
        f"the server samples (prompts cut or repeated to their mean length, "
        f"{plain['prompt_tokens']} tokens; median of 3 runs; sampling "
        f"{fig(100 * ratio(plain['sample_seconds'], plain['decode_seconds']))}% of its "
        "steps). Beside it, the same work through `BatchedDecoding`, the server's decoder "
        "(each sequence to float rounding of its lone run; one sequence at a time where "
        "that check fails).",
        {"batch": batch, "window_s": secs, "tokens": tokens, "text_chars": len(text)},
        series=[series("Embed, server", [embed]), series("Predict, server", [predict]),
                series("generation, server", [gen])],
        tables=[table("In-process batched forward vs the server",
                      ["work", "model alone", "server", "server / alone"], rows)],
        targets=targets, generation_limits={"plain_forward": plain, "batched_decoding": decoder},
    )  # fmt: skip


async def scenario_batching(s: Suite) -> dict[str, Any]:
    on, off = await s.server(), await s.unbatched()
    c, tokens = s.plan.limit_batch, s.plan.stream_tokens
    message = embed_request(embed_texts(1, chars=(80, 80))[0]).SerializeToString()
    count = dict(s.plan.stream_counts)[16] // 2
    requests = stream_requests(count, tokens)
    with s.peak_rss([on, off], "batching"):
        on_embed = h2load(s, on, "Embed", message, c, "Embed, batching on")
        off_embed = h2load(s, off, "Embed", message, c, "Embed, batching off")
        together = await s.streams(on, requests, 16, "continuous", "batching")
        alone = await s.streams(on, requests, 1, "one at a time", "batching")
        turns = await s.streams(off, requests, 16, "round-robin (no batching)", "batching")
    rows = [
        versus(f"Embed at concurrency {c}, req/s", on_embed.throughput, off_embed.throughput),
        versus(f"Embed at concurrency {c}, p99 ms", on_embed.p99_ms, off_embed.p99_ms),
        versus(f"{count} generations of {tokens} tokens, tokens/s: continuous (16 at once) vs "
               "one at a time", together.throughput, alone.throughput),
        versus("the same, continuous vs round-robin (batching off, 16 at once)",
               together.throughput, turns.throughput),
    ]  # fmt: skip
    return section(
        "batching", "Batching",
        "Dynamic batching: Embed (one text per request, h2load) at concurrency "
        f"{c} against the server with batching on and a second server started with "
        "`--no-batching`. Continuous batching: the same generations 16 at once (decoded "
        "together), one at a time, and 16 at once on the `--no-batching` server "
        "(generations take turns, one step each).",
        {"window_s": s.plan.seconds, "streams": count, "tokens": tokens},
        series=[series("Embed, batching on", [on_embed]), series("Embed, batching off",
                [off_embed]), series("continuous", [together]), series("one at a time", [alone]),
                series("round-robin", [turns])],
        tables=[table("On vs off", ["", "on", "off", "on / off"], rows)],
    )  # fmt: skip


async def scenario_paths(s: Suite) -> dict[str, Any]:
    """Continuous batching on every dispatch path: 32 streams at once against one stream."""
    tokens = s.plan.stream_tokens
    requests = stream_requests(32, tokens)
    rows, targets, out, notes = [], [], [], []
    for i, (name, env, why) in enumerate(dispatch_paths(s)):
        if why:
            notes.append(f"`{name}` not measured: {why}.")
            continue
        proc = await s.server(f"path-{i}", "--max-active", "32", env=env)
        async with grpc.aio.insecure_channel(proc.target) as channel:
            request = pb.GetModelRequest(name=TEXT_MODEL)
            found = await stubs.InferenceServiceStub(channel).GetModel(request, timeout=10)
        together = await s.streams(proc, requests, 32, f"{name}: 32 at once", "paths")
        alone = await s.streams(proc, requests[:8], 1, f"{name}: one at a time", "paths")
        proc.stop()
        gain = ratio(together.throughput, alone.throughput)
        speeds = [fig(together.throughput), fig(alone.throughput)]
        rows.append([f"`{name}`", pb.Decoding.Name(found.model.decoding), *speeds, fig(gain)])
        targets.append(target(f"Generation tokens/s, 32 streams / one stream, `{name}`", gain,
                              ">= 3", gain >= 3, " vs ".join(speeds)))  # fmt: skip
        out += [series(together.label, [together]), series(alone.label, [alone])]
    return section(
        "paths", "Continuous batching on every dispatch path",
        "A server started on each CPU code path this machine can run "
        "(`ATEN_CPU_CAPABILITY` x `MKL_ENABLE_INSTRUCTIONS`, `--max-active 32`, default "
        f"decoding): 32 generations of {tokens} tokens at once against 8 of them one at a "
        "time, tokens per second. `decoding` is what the server's GetModel reports.",
        {"tokens": tokens, "streams": 32}, series=out, targets=targets, notes=notes,
        tables=[table("32 streams against one stream", ["path", "decoding", "32 at once, tok/s",
                                                         "one at a time, tok/s", "ratio"], rows)],
    )  # fmt: skip


# The echo floor, the peers, the workers (issue #18) -----------------------------------------------

ECHO_STREAMS = 16  # h2load -c 1 -m 16: the issue's measure


async def scenario_echo(s: Suite) -> dict[str, Any]:
    """protoserve (access logs on) against a bare grpc.aio server answering its bytes."""
    p = s.plan
    server = await s.logged()
    infer_body, _ = srv.write_load_bodies(s.tmp / "oip-bodies", MLP)
    calls = {"GetModel": (SERVICE + "GetModel", pb.GetModelRequest(name=MLP).SerializeToString()),
             "ModelInfer": (srv.GRPC_PATH, infer_body.read_bytes()[5:])}  # fmt: skip
    replies = {}
    for method, (path, message) in calls.items():
        got = srv.grpc_replies(server.port, path, message)
        if len(got) != 1:
            s.failures.append(f"echo: protoserve's {method} replies differ: {sorted(got)}")
        replies[path] = min(got)
    echo = srv.launch_echo(s.python, s.tmp, replies)
    s.procs.append(echo)
    await srv.wait_ready(echo, time.monotonic() + 60)
    for method, (path, message) in calls.items():
        if srv.grpc_replies(echo.port, path, message, calls=1) != {replies[path]}:
            s.failures.append(f"echo: the echo server's {method} reply is not protoserve's")
    found: dict[tuple[str, str], list[lg.Point]] = {}
    with s.peak_rss([server, echo], "echo floor"):
        for method, (path, message) in calls.items():
            frame = 5 + len(replies[path])
            for r in range(p.rounds):  # alternate which goes first
                for who in ("echo", "protoserve") if r % 2 == 0 else ("protoserve", "echo"):
                    label = f"{method}, {who}"
                    if r == 0:  # warm-up, not counted: the connection, the first calls
                        lg.h2load_grpc(f"http://{(echo if who == 'echo' else server).target}",
                                       path, message, ECHO_STREAMS, None, s.tmp, "warm-up",
                                       requests=min(1000, p.echo_calls))  # fmt: skip
                    if who == "echo":
                        point = s.check(lg.h2load_grpc(
                            f"http://{echo.target}", path, message, ECHO_STREAMS, None, s.tmp,
                            label, requests=p.echo_calls), "echo")  # fmt: skip
                    else:  # the server's count of calls by code, too
                        point = h2load(s, server, method, message, ECHO_STREAMS, label,
                                       requests=p.echo_calls, path=path)  # fmt: skip
                    if problem := srv.check_reply_bytes(point.extra, frame):
                        s.failures.append(f"echo: h2load {label}: {problem}")
                    found.setdefault((method, who), []).append(point)
    echo.stop()
    # Access lines protoserve wrote (its log's queue drops lines it cannot write in time).
    logged = sum(" GetModel OK " in line for line in server.log_tail(10**9).splitlines())
    rate = {key: ratio(sum(x.ok for x in pts), sum(x.seconds for x in pts))
            for key, pts in found.items()}  # fmt: skip
    rows = [[method, f"{len(replies[path])} B", *versus("", rate[method, "protoserve"],
                                                         rate[method, "echo"])[1:]]
            for method, (path, _) in calls.items()]  # fmt: skip
    value = ratio(rate["GetModel", "protoserve"], rate["GetModel", "echo"])
    return section(
        "echo", "The echo floor: protoserve against a bare grpc.aio server",
        "A bare grpc.aio server (`bench/_echo.py`, a process of its own, the servers' "
        "Python: a generic handler, no interceptor, no parsing, no metrics, no logs) answers "
        "each method with the bytes protoserve answered to the same request, pre-serialized: "
        f"`GetModel` of `{MLP}`, and ModelInfer of the peers' one-row request. protoserve "
        "runs as shipped, access lines on (the default log level, INFO). h2load "
        f"`-n {p.echo_calls} -c 1 -m {ECHO_STREAMS}` (one connection, {ECHO_STREAMS} calls in "
        f"flight) on each, one after the other, {p.rounds} round(s) alternating which goes "
        "first, after an uncounted warm-up; calls/s over all rounds. Every call is checked by "
        "its reply's bytes (an error reply has none), and on protoserve by its "
        "`protoserve_requests_total`.",
        {"calls": p.echo_calls, "streams": ECHO_STREAMS, "rounds": p.rounds,
         "protoserve": "--log-level INFO (access lines on)"},
        series=[series(f"{method}, {who}", pts) for (method, who), pts in found.items()],
        tables=[table("protoserve / echo floor (calls/s over all rounds)",
                      ["method", "reply", "protoserve", "echo", "protoserve / echo"], rows)],
        targets=[target(f"GetModel calls/s: protoserve (access logs on) / the bare echo server, "
                        f"h2load -c 1 -m {ECHO_STREAMS}", value, ">= 0.60", value >= 0.6,
                        f"{fig(rate['GetModel', 'protoserve'])} vs "
                        f"{fig(rate['GetModel', 'echo'])} calls/s", issue=18)],
        notes=[f"protoserve's log holds {logged} GetModel access lines (by then)."],
    )  # fmt: skip


#: Every server with its per-request log lines on, each's default: protoserve at INFO (an
#: access line per call), MLServer's debug, KServe's latency logging (issue #18: "with
#: access logs on").
PEER_SETTINGS: dict[str, dict[str, Any]] = {"mlserver": {}, "kserve": {}}
#: Issue #18's targets on the peers' model: protoserve / KServe over gRPC, by concurrency.
KSERVE_TARGETS = {16: 1.2, 1: 1.0}


async def scenario_peers(s: Suite) -> dict[str, Any]:
    server = await s.logged()
    gateway = await s.gateway(server, *ACCESS_LOGS)
    levels = s.plan.peer_levels
    grpc_body, rest_body = srv.write_load_bodies(s.tmp / "oip-bodies", MLP)
    found: dict[str, dict[str, list[lg.Point]]] = {}
    settings: dict[str, Any] = {}

    def sweep(name: str, grpc_port: int, http_port: int) -> None:
        frame = srv.grpc_reply_frame_size(grpc_port, grpc_body)
        found[name] = {"gRPC": [], "REST": []}
        for c in levels:
            g = lg.h2load_grpc(f"http://127.0.0.1:{grpc_port}", srv.GRPC_PATH,
                               grpc_body.read_bytes()[5:], c, s.plan.seconds, s.tmp,
                               f"{name} gRPC")  # fmt: skip
            if problem := srv.check_reply_bytes(g.extra, frame):
                s.failures.append(f"h2load {name} gRPC at concurrency {c}: {problem}")
            r = lg.wrk(f"http://127.0.0.1:{http_port}/v2/models/{MLP}/infer",
                       rest_body.read_bytes(), "application/json", c, s.plan.seconds, s.tmp,
                       f"{name} REST")  # fmt: skip
            found[name]["gRPC"].append(s.check(g, "peers"))
            found[name]["REST"].append(s.check(r, "peers"))

    srv.check_output(gateway.port, server.port, MLP, s.model_file)
    with s.peak_rss([server, gateway], "peers"):
        sweep("protoserve", server.port, gateway.port)
    for name, python in s.peer_pythons.items():
        http_port, grpc_port = srv.free_port(), srv.free_port()
        workdir = s.tmp / f"peer-{name}"
        argv, env, chosen = srv.peer_command(name, python, s.model_file, workdir, MLP,
                                             http_port, grpc_port, PEER_SETTINGS[name])  # fmt: skip
        settings[name] = {k: v for k, v in chosen.items() if v is not None}
        proc = srv.spawn(s.tmp, name, argv, env=env, port=http_port, cwd=workdir)
        s.procs.append(proc)
        try:
            ready = ("/v2/health/ready", f"/v2/models/{MLP}/ready")
            waited = await srv.wait_ready(proc, time.monotonic() + 240, paths=ready)
            settings[name]["ready_after_s"] = round(waited, 1)
            srv.check_output(http_port, grpc_port, MLP, s.model_file)
            with s.peak_rss([proc], "peers"):
                sweep(name, grpc_port, http_port)
        finally:
            proc.stop(timeout=10)
    targets = []
    c16 = 16 if 16 in levels else levels[-1]
    for proto in ("gRPC", "REST"):
        ours = at(found["protoserve"][proto], c16)
        peers = ((n, at(by[proto], c16)) for n, by in found.items() if n != "protoserve")
        best_name, best = max(peers, key=lambda item: item[1].throughput)
        value = ratio(ours.throughput, best.throughput)
        targets.append(target(
            f"{proto}: protoserve / best peer ({best_name}) throughput at concurrency {c16}, "
            "with a lower p99", value, ">= 1.5, p99 lower",
            value >= 1.5 and ours.p99_ms < best.p99_ms,
            f"{fig(ours.throughput)} vs {fig(best.throughput)} req/s; p99 "
            f"{fig(ours.p99_ms)} vs {fig(best.p99_ms)} ms"))  # fmt: skip
    for c, goal in KSERVE_TARGETS.items():
        if c not in levels or "kserve" not in found:
            continue
        ours, theirs = at(found["protoserve"]["gRPC"], c), at(found["kserve"]["gRPC"], c)
        value = ratio(ours.throughput, theirs.throughput)
        targets.append(target(
            f"gRPC unary (OIP ModelInfer, {MLP}): protoserve / KServe throughput at concurrency "
            f"{c}, access logs on", value, f">= {goal:.1f}", value >= goal,
            f"{fig(ours.throughput)} vs {fig(theirs.throughput)} req/s; p99 {fig(ours.p99_ms)} "
            f"vs {fig(theirs.p99_ms)} ms", issue=18))  # fmt: skip
    return section(
        "peers", "Peers: the same TorchScript model on protoserve, MLServer and KServe",
        f"`{MLP}` (a TorchScript MLP, one row of {_model.FEATURES} float32 per request) "
        "served by protoserve (a model repository folder: the `.pt` file and its tensors "
        "in model.toml), MLServer and KServe's model server (each a custom runtime of a "
        "few lines, the way their documentation serves a TorchScript file, in a "
        "virtualenv of its own). The same request bytes go to all three over the Open "
        "Inference Protocol: h2load over gRPC (one HTTP/2 connection; a call counts only "
        "with a good reply's bytes), wrk over REST JSON (one keep-alive connection per "
        "concurrent request). protoserve's REST is its gateway, a second process. One "
        "peer runs at a time. Every server writes its per-request log lines, each's "
        "default: protoserve's server and gateway an access line per call (INFO), MLServer "
        "its debug lines, KServe its latency lines. perf_analyzer cannot drive either peer: "
        "it asks for the model configuration (Triton's ModelConfig) first, which neither "
        "serves.",
        {"window_s": s.plan.seconds, "concurrency": list(levels),
         "protoserve": "batching on (max 32 rows, 2 ms), one server process + gateway, "
                       "--log-level INFO (access lines on)",
         **settings},
        series=[series(f"{n} {proto}", pts) for n, by in found.items()
                for proto, pts in by.items()],
        targets=targets, plot=len(levels) > 1,
    )  # fmt: skip


WORKERS = (1, 2)


def serve_help(s: Suite) -> str:
    got = subprocess.run([s.python, "-m", "protoserve.clients.cli", "serve", "--help"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    return got.stdout + got.stderr


async def one_against_two(
    s: Suite, flag: str, more: Sequence[str], *, warm_up: bool
) -> tuple[dict[int, list[lg.Point]], dict[int, float]]:
    """``protoserve serve --FLAG 1`` against ``--FLAG 2`` (and ``more`` flags): the peers'
    OIP ModelInfer through h2load, ``workers_connections`` x ``workers_streams`` calls,
    rounds alternating which goes first, every reply checked by its bytes; ``warm_up``:
    each connection's first calls, not counted, before the first round. The points of
    each, and its req/s over all rounds."""
    p = s.plan
    conns, c = p.workers_connections, p.workers_connections * p.workers_streams
    grpc_body, _ = srv.write_load_bodies(s.tmp / "oip-bodies", MLP)
    message = grpc_body.read_bytes()[5:]
    procs = {n: await s.server(f"{flag}-{n}", f"--{flag}", str(n), *more) for n in (1, 2)}
    found: dict[int, list[lg.Point]] = {n: [] for n in (1, 2)}
    with s.peak_rss(list(procs.values()), flag):
        frames = {n: srv.grpc_reply_frame_size(proc.port, grpc_body) for n, proc in procs.items()}
        for r in range(p.rounds):
            for n in (1, 2) if r % 2 == 0 else (2, 1):
                url, label = f"http://{procs[n].target}", f"--{flag} {n}"
                if warm_up and r == 0:
                    lg.h2load_grpc(url, srv.GRPC_PATH, message, c, None, s.tmp, "warm-up",
                                   requests=10 * c, connections=conns)  # fmt: skip
                point = lg.h2load_grpc(url, srv.GRPC_PATH, message, c, p.seconds, s.tmp, label,
                                       connections=conns)  # fmt: skip
                if problem := srv.check_reply_bytes(point.extra, frames[n]):
                    s.failures.append(f"{flag}: h2load {label}: {problem}")
                found[n].append(s.check(point, flag))
    for proc in procs.values():
        proc.stop()
    rate = {n: ratio(sum(x.ok for x in pts), sum(x.seconds for x in pts))
            for n, pts in found.items()}  # fmt: skip
    return found, rate


def one_against_two_table(flag: str, found: dict[int, list[lg.Point]],
                          rate: dict[int, float]) -> dict[str, Any]:  # fmt: skip
    """:func:`one_against_two`'s figures as the report's table."""
    return table("Throughput (req/s over all rounds)",
                 [flag, "req/s", "p50 ms", "p99 ms", f"/ --{flag} 1"],
                 [[n, fig(rate[n]), fig(lg.percentile([x.p50_ms for x in found[n]], 50)),
                   fig(max(x.p99_ms for x in found[n])), fig(ratio(rate[n], rate[1]))]
                  for n in found])  # fmt: skip


async def scenario_workers(s: Suite) -> dict[str, Any]:
    """``protoserve serve --workers 1`` against ``--workers 2``: the peers' ModelInfer."""
    p = s.plan
    conns, per = p.workers_connections, p.workers_streams
    c = conns * per
    description = (
        "`protoserve serve --workers N` (N server processes on one port, SO_REUSEPORT; access "
        f"lines on) with N = {' and '.join(map(str, WORKERS))}, the peers' request: OIP "
        f"ModelInfer of one row on `{MLP}`, h2load on {conns} connections with {per} calls in "
        f"flight on each ({c} in all; the kernel spreads connections over the processes, not "
        f"calls), {fig(p.seconds)} s per window, {p.rounds} round(s) alternating which goes "
        "first. Every call is checked by its reply's bytes. The load generator shares the "
        f"machine's {os.cpu_count()} cores with the servers. Reported, not targeted.")  # fmt: skip
    if "--workers" not in serve_help(s):
        why = "`protoserve serve --help` has no `--workers` yet: not measured"
        print(f"suite: workers: skipped: {why}", file=sys.stderr, flush=True)
        return section("workers", "Server processes: --workers 1 against 2", description,
                       notes=[f"SKIPPED: {why}."])  # fmt: skip
    found, rate = await one_against_two(s, "workers", ACCESS_LOGS, warm_up=True)
    value = ratio(rate[2], rate[1])
    return section(
        "workers", "Server processes: --workers 1 against 2", description,
        {"connections": conns, "streams_per_connection": per, "window_s": p.seconds,
         "rounds": p.rounds},
        series=[series(f"--workers {n}", pts) for n, pts in found.items()],
        tables=[one_against_two_table("workers", found, rate)],
        targets=[target(f"ModelInfer throughput, --workers 2 / --workers 1 ({conns} "
                        f"connections x {per} calls; reported, no target)", value, "reported",
                        None, f"{fig(rate[2])} vs {fig(rate[1])} req/s", issue=18)],
    )  # fmt: skip


REPLICAS = 3


def predict_message() -> pb.PredictRequest:
    """One v1 Predict of the MLP: one row of float32."""
    row = struct.pack(f"<{_model.FEATURES}f", *_model.sample_rows(1)[0])
    return pb.PredictRequest(model=MLP, inputs=[pb.Tensor(
        name="INPUT0", data_type=pb.DATA_TYPE_FLOAT32, shape=[1, _model.FEATURES],
        raw_data=row)])  # fmt: skip


async def scenario_replicas(s: Suite) -> dict[str, Any]:
    """One gateway over 1 server against over 3 (issue #19): throughput, spread, a drain."""
    p = s.plan
    c = p.replicas_connections
    description = (
        f"`protoserve gateway --upstream ipv4:A,B,C` over {REPLICAS} `protoserve serve` "
        "processes (round robin, client-side health checking, retries of calls refused "
        "before any header: gateway/_balancing.py) against the same gateway flags over one "
        f"server. wrk POSTs v1 Predict of one row on `{MLP}` over {c} keep-alive "
        f"connections, {fig(p.seconds)} s a window, {p.rounds} round(s) alternating. On "
        f"this machine's {os.cpu_count()} cores the extra servers share the cores with the "
        "gateway and wrk: the ratio says what balancing costs here, not what more machines "
        "give. Then one server gets SIGTERM in the middle of a window: every call must still "
        "be answered 200.")  # fmt: skip
    servers = [await s.server(f"replica-{i}", "--shutdown-grace", "10") for i in range(REPLICAS)]
    upstream = "ipv4:" + ",".join(proc.target for proc in servers)
    gateways = {}
    for n, dial in ((1, servers[0].target), (REPLICAS, upstream)):
        name = f"gateway-over-{n}"
        proc = srv.launch(s.python, s.tmp, name, "gateway", ["--upstream", dial])
        s.procs.append(proc)
        await srv.wait_ready(proc, time.monotonic() + 120, paths=["/v1/models"])
        gateways[n] = proc
    body = json.dumps(as_json(predict_message())).encode()
    found: dict[int, list[lg.Point]] = {n: [] for n in gateways}
    counts_before = [lg.value(lg.scrape(x.metrics_url), "protoserve_requests_total",
                              method="Predict") for x in servers]  # fmt: skip
    with s.peak_rss([*servers, *gateways.values()], "replicas"):
        for r in range(p.rounds):
            for n in (1, REPLICAS) if r % 2 == 0 else (REPLICAS, 1):
                url = f"http://{gateways[n].target}/v1/models/{MLP}:predict"
                point = lg.wrk(url, body, "application/json", c, p.seconds, s.tmp,
                               f"gateway over {n}")  # fmt: skip
                found[n].append(s.check(point, "replicas"))
        counts = [lg.value(lg.scrape(x.metrics_url), "protoserve_requests_total",
                           method="Predict") - b for x, b in zip(servers, counts_before,
                                                                 strict=True)]  # fmt: skip
        # Over 1 the first server took its share too: the spread is what the others got
        # beside it, so compare the two that only the balanced gateway called.
        over_n = sum(x.ok for x in found[REPLICAS])
        spread = [counts[0] - sum(x.ok for x in found[1]), *counts[1:]]
        # The drain: SIGTERM to the last server in the middle of a window.
        url = f"http://{gateways[REPLICAS].target}/v1/models/{MLP}:predict"
        drained = servers[-1]
        window = asyncio.create_task(asyncio.to_thread(
            lg.wrk, url, body, "application/json", c, p.seconds, s.tmp, "drain"))  # fmt: skip
        await asyncio.sleep(p.seconds / 2)
        signalled = time.monotonic()
        drained.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(drained.proc.wait, 60)
        drain_s = time.monotonic() - signalled
        drain = s.check(await window, "replicas: drain")
    rate = {n: ratio(sum(x.ok for x in pts), sum(x.seconds for x in pts))
            for n, pts in found.items()}  # fmt: skip
    value = ratio(rate[REPLICAS], rate[1])
    even = over_n / REPLICAS
    worst = max(abs(n - even) / even for n in spread) if even else float("nan")
    if code != 0:
        s.failures.append(f"replicas: the drained server exited with {code}")
    return section(
        "replicas", f"Many servers: a gateway over 1 against over {REPLICAS}", description,
        {"connections": c, "window_s": p.seconds, "rounds": p.rounds},
        series=[series(f"gateway over {n}", pts) for n, pts in found.items()],
        tables=[
            table("Throughput (req/s over all rounds)",
                  ["servers", "req/s", "p50 ms", "p99 ms", "/ over 1"],
                  [[n, fig(rate[n]), fig(lg.percentile([x.p50_ms for x in found[n]], 50)),
                    fig(max(x.p99_ms for x in found[n])), fig(ratio(rate[n], rate[1]))]
                   for n in found]),
            table(f"Calls per server, gateway over {REPLICAS} (each server's own counter)",
                  ["server", "Predict calls", "/ even share"],
                  [[x.name, int(n), fig(ratio(n, even))] for x, n in zip(servers, spread,
                                                                          strict=True)]),
            table("SIGTERM to one server in the middle of a window",
                  ["calls answered 200", "calls failed", "server exit", "SIGTERM to exit s"],
                  [[drain.ok, drain.failed, code, fig(drain_s)]]),
        ],
        targets=[
            target(f"Predict throughput through the gateway, {REPLICAS} servers / 1 "
                   "(reported, no target on one machine)", value, "reported", None,
                   f"{fig(rate[REPLICAS])} vs {fig(rate[1])} req/s", issue=19),
            target("Largest distance of a server's calls from an even share", worst,
                   "<= 0.20", worst <= 0.2, f"{[int(n) for n in spread]} calls", issue=19),
            target("Calls failed while one server drained (SIGTERM) under load", drain.failed,
                   "0", drain.failed == 0, f"{drain.ok} answered 200", issue=19),
        ],
    )  # fmt: skip


INSTANCES = (1, 2)


async def scenario_instances(s: Suite) -> dict[str, Any]:
    """``serve --instances 1`` against ``--instances 2`` (issue #20): the peers' ModelInfer."""
    p = s.plan
    conns, per = p.workers_connections, p.workers_streams
    c = conns * per
    description = (
        "`protoserve serve --instances N` (N copies of each model in one process, each with "
        f"a worker thread of its own) with N = {' and '.join(map(str, INSTANCES))}: OIP "
        f"ModelInfer of one row on `{MLP}`, h2load on {conns} connections x {per} calls, "
        f"{fig(p.seconds)} s per window, {p.rounds} round(s) alternating. One process, one "
        "event loop: what a second copy buys a small model whose calls do not use every "
        f"core, on this machine's {os.cpu_count()} cores (torch's intra-op threads per "
        "copy as set; the load generator shares the cores). Reported, not targeted.")  # fmt: skip
    found, rate = await one_against_two(s, "instances", (), warm_up=False)
    value = ratio(rate[2], rate[1])
    return section(
        "instances", "Model instances: --instances 1 against 2", description,
        {"connections": conns, "streams_per_connection": per, "window_s": p.seconds,
         "rounds": p.rounds},
        series=[series(f"--instances {n}", pts) for n, pts in found.items()],
        tables=[one_against_two_table("instances", found, rate)],
        targets=[target(f"ModelInfer throughput, --instances 2 / 1 ({c} calls in flight; "
                        "reported, no target)", value, "reported", None,
                        f"{fig(rate[2])} vs {fig(rate[1])} req/s", issue=20)],
    )  # fmt: skip


async def scenario_memory(s: Suite) -> dict[str, Any]:
    return section(
        "memory", "Memory",
        "Resident set size (RSS, MiB) of each process and its children: idle is sampled "
        "just before a phase starts, peak every 0.2 s while it runs. PSS (proportional "
        "set size) counts a library mapped by several processes of one tree once: "
        "MLServer runs its model in a worker process beside its main one, and both "
        "map torch.",
        tables=[table("RSS, MiB", ["process", "idle RSS", "idle PSS", "peak RSS under load",
                                   "phase"], s.memory)],
    )  # fmt: skip


# The runtime's scenarios (issue #5) --------------------------------------------------------------


async def embeddings(proc: srv.Proc, texts: Sequence[str], together: bool) -> list[list[float]]:
    """The vector of each text from ``proc``: all at once, or one at a time."""
    async with grpc.aio.insecure_channel(proc.target) as channel:
        embed = stubs.InferenceServiceStub(channel).Embed
        if together:
            replies = await asyncio.gather(*(embed(embed_request(t), timeout=120) for t in texts))
        else:
            replies = [await embed(embed_request(t), timeout=120) for t in texts]
    return [list(r.embeddings[0].values) for r in replies]


async def scenario_embed(s: Suite) -> dict[str, Any]:
    p = s.plan
    on, off = await s.server(), await s.unbatched()
    c = p.embed_clients
    # The vectors of the sample texts, untimed (and a warm-up): the batched server's one at
    # a time, against the batched and the unbatched servers' all at once.
    texts = embed_texts(p.embed_sample, p.embed_chars)
    alone = await embeddings(on, texts, together=False)
    for what, proc in (("batched", on), ("unbatched", off)):
        vectors = zip(alone, await embeddings(proc, texts, together=True), strict=True)
        diff = max((abs(x - y) for a, b in vectors for x, y in zip(a, b, strict=True)), default=-1)
        if not 0 <= diff <= 1e-5:  # nothing compared fails too
            s.failures.append(f"embed: max abs diff (concurrent {what} vs one at a time) = "
                              f"{diff:.3g} > 1e-5")  # fmt: skip
    message = embed_request(texts[0]).SerializeToString()
    phases = (("one at a time (batched server)", on, 1),
              (f"{c} concurrent (batched server)", on, c),
              (f"{c} concurrent (--no-batching)", off, c))  # fmt: skip
    found: dict[str, list[lg.Point]] = {name: [] for name, *_ in phases}
    for _ in range(p.rounds):  # the phases alternate, so drift hits them alike
        for name, proc, n in phases:
            async with s.around("embed", name, proc):
                point = h2load(s, proc, "Embed", message, n, name, p.embed_seconds / p.rounds)
            found[name].append(point)
    rates = [
        ratio(sum(pt.ok for pt in pts), sum(pt.seconds for pt in pts)) for pts in found.values()
    ]
    one, conc, unb = rates
    return section(
        "embed", "1. Embed: dynamic batching",
        f"One text of {len(texts[0])} characters per request (h2load), {fig(p.embed_seconds)} s "
        f"per phase in {p.rounds} alternating round(s). Before them, untimed, the vectors of "
        f"{len(texts)} texts of {p.embed_chars[0]}-{p.embed_chars[-1]} characters sent all at "
        "once to each server must equal those sent one at a time (within 1e-5).",
        {"clients": c, "seconds": p.embed_seconds, "rounds": p.rounds},
        series=[series(name, pts) for name, pts in found.items()],
        tables=[table("Ratios", ["", "ratio"], [
            ["concurrent batched / one at a time", ratio(conc, one)],
            ["batched / unbatched at concurrency", ratio(conc, unb)]]),
            metrics_table(s, "embed")],
    )  # fmt: skip


def mismatches(reference: Sequence[lg.Stream], streams: Sequence[lg.Stream]) -> list[int]:
    """Indices of ``streams`` whose text or tokens differ from the good reference stream."""
    pairs = enumerate(zip(reference, streams, strict=False))
    return [i for i, (ref, got) in pairs if not ref.error
            and (got.text, got.token_ids) != (ref.text, ref.token_ids)]  # fmt: skip


async def scenario_generate(s: Suite) -> dict[str, Any]:
    p = s.plan
    on, off = await s.server(), await s.unbatched()
    requests = stream_requests(p.gen_streams, p.gen_tokens)
    for proc in (on, off):  # warm-up: four short generations
        await lg.grpc_streams(proc.target, stream_requests(4, 4, 1), 4, "warm-up")
    n_alone = min(p.gen_alone or len(requests), len(requests))
    names = (f"alone, one after another ({n_alone} of {len(requests)}, batched server)",
             f"{len(requests)} concurrent (batched server)",
             f"{len(requests)} concurrent (--no-batching, round-robin)")  # fmt: skip
    async with s.around("generate", names[0], on):
        alone = await s.streams(on, requests[:n_alone], 1, names[0], "generation")
    async with s.around("generate", names[1], on):
        conc = await s.streams(on, requests, len(requests), names[1], "generation")
    async with s.around("generate", names[2], off):
        rr = await s.streams(off, requests, len(requests), names[2], "generation")
    differ = mismatches(alone.streams, conc.streams)
    differ_rr = mismatches(alone.streams, rr.streams)
    compared = sum(1 for ref in alone.streams if not ref.error)
    for problem, bad in (
        (f"{len(differ)} concurrent batched streams differ from their alone text: {differ}",
         len(differ) > MAX_ROUNDED_TEXTS),
        (f"{len(differ_rr)} --no-batching streams differ from their alone text", differ_rr),
        ("no stream could be compared with its alone run", not compared),
    ):  # fmt: skip
        if bad:
            s.failures.append(f"generation: {problem}")
    return section(
        "generate", "2. Generation: continuous batching",
        f"GenerateStream, max_new_tokens={p.gen_tokens}, temperature 0.8, seeds 1000+i, "
        "distinct prompts. Throughput: tokens over the wall time from the first call to the "
        "last stream's end (alone: one stream at a time); latency columns are time to first "
        "token; gap: between successive messages carrying tokens.",
        {"streams": len(requests), "tokens": p.gen_tokens, "alone": n_alone},
        series=[series(pt.label, [pt]) for pt in (alone, conc, rr)],
        tables=[table("Ratios", ["", "ratio"], [
            ["concurrent continuous / alone", ratio(conc.throughput, alone.throughput)],
            ["continuous / round-robin (concurrent)", ratio(conc.throughput, rr.throughput)]]),
            metrics_table(s, "generate")],
        notes=[f"correctness: {compared} streams compared with their alone run: "
               f"**{len(differ)} mismatches** (batched, to float rounding: at most "
               f"{MAX_ROUNDED_TEXTS} allowed), {len(differ_rr)} (--no-batching)"],
        mismatched=differ,
    )  # fmt: skip


def overload_row(s: Suite, path: str, point: lg.Point, fit: int, notes: list[str]) -> list[Any]:
    """A row of the overload table; what went wrong goes to the failures and ``notes``."""
    codes = [("OK" if not st.error else "RESOURCE_EXHAUSTED" if st.code in REFUSED else st.code)
             for st in point.streams]  # fmt: skip
    pairs = list(zip(point.streams, codes, strict=True))
    refused = [st for st, code in pairs if code == "RESOURCE_EXHAUSTED"]
    accepted = [st.seconds for st, code in pairs if code == "OK"]
    other = dict(Counter(c for c in codes if c not in ("OK", "RESOURCE_EXHAUSTED")))
    delays = sorted({st.retry_delay for st in refused if st.retry_delay is not None})
    with_delay = sum(1 for st in refused if st.retry_delay is not None)
    for problem, bad in ((f"unexpected outcomes {other}", other),
                         (f"{len(refused) - with_delay} of {len(refused)} refusals carried no "
                          "retry delay", with_delay != len(refused)),
                         ("nothing was refused", not refused),
                         ("nothing was accepted", not accepted)):  # fmt: skip
        if bad:
            s.failures.append(f"overload ({path}): {problem}")
    if len(accepted) != fit:
        notes.append(f"NOTE ({path}): {len(accepted)} accepted, not the {fit} that fit (a "
                     "call may have ended before the last arrived)")  # fmt: skip
    times = [st.seconds * 1e3 for st in refused]
    return [path, len(codes), len(accepted), len(refused), other or 0,
            fig(lg.percentile(times, 50)), fig(lg.percentile(times, 99)),
            f"{with_delay}/{len(refused)} ({', '.join(f'{d:g} s' for d in delays)})",
            fig(lg.percentile(accepted, 50))]  # fmt: skip


async def scenario_overload(s: Suite) -> dict[str, Any]:
    p = s.plan
    flags = ("--max-queue", str(p.overload_max_queue), "--max-active", str(p.overload_max_active))
    proc = await s.server("overload", *flags)
    fit = p.overload_max_queue + p.overload_max_active
    requests = stream_requests(p.overload_requests, p.overload_tokens, 2000)
    await lg.grpc_streams(proc.target, requests[:1], 1, "warm-up")
    notes: list[str] = []
    async with s.around("overload", "gRPC", proc):
        burst = await lg.grpc_streams(proc.target, requests, len(requests), "gRPC")
    rows = [overload_row(s, "gRPC GenerateStream", burst, fit, notes)]
    if p.overload_gateway:
        url = f"http://{(await s.gateway(proc)).target}"
        bodies = [{"inputs": r.inputs, "parameters": {**as_json(r.parameters), "seed": 3000 + i}}
                  for i, r in enumerate(requests)]  # fmt: skip
        async with s.around("overload", "gateway", proc):
            burst = await lg.sse_streams(url, TEXT_MODEL, bodies, len(bodies), "gateway")
        rows.append(overload_row(s, "gateway POST :generateStream (SSE)", burst, fit, notes))
    counted = {k: v["rejections_total"] for k, v in s.metrics["overload"].items()}
    return section(
        "overload", "3. Overload",
        f"`--max-queue {p.overload_max_queue} --max-active {p.overload_max_active}`; "
        f"{p.overload_requests} generations of max_new_tokens={p.overload_tokens} sent at once "
        f"(expected accepted: max_queue + max_active = {fit}). Retry info: gRPC RetryInfo "
        "detail / HTTP 429 with Retry-After, on the refusals.",
        {"requests": p.overload_requests, "tokens": p.overload_tokens},
        tables=[table("Refusals", ["path", "sent", "accepted OK", "refused", "other",
                                   "refusal p50 ms", "refusal p99 ms", "retry info",
                                   "accepted p50 s"], rows)],
        notes=[*notes, "protoserve_rejections_total (overload server): "
               + ", ".join(f"+{fig(n)} over the {k} burst" for k, n in counted.items())],
    )  # fmt: skip


def shown(c: Counter[str]) -> dict[str, float]:
    """The figures the metrics' tables show of COUNTED deltas (histograms' means added)."""

    def mean(name: str) -> float:
        return ratio(c[f"{name} sum"], c[f"{name} count"])

    return {"batch_size[embed] count": c["batch_size[embed] count"],
            "batch_size[embed] mean": mean("batch_size[embed]"),
            "batch_size[generate] count": c["batch_size[generate] count"],
            "batch_size[generate] mean": mean("batch_size[generate]"),
            "generated_tokens_total": c["generated_tokens_total"],
            "queue_duration_seconds count": c["queue_duration_seconds count"],
            "queue_duration mean ms": 1e3 * mean("queue_duration_seconds"),
            "rejections_total": c["rejections_total"]}  # fmt: skip


def metrics_table(s: Suite, scenario: str) -> dict[str, Any]:
    """The servers' /metrics over each phase of ``scenario`` (summed over rounds), and the
    batched server's over its two phases."""
    phases = s.metrics[scenario]
    columns = [shown(c) for c in [*phases.values(), sum(list(phases.values())[:2], Counter())]]
    rows = [[key, *(fig(c[key]) for c in columns)] for key in columns[0]]
    return table("Server metrics: deltas over each phase; batch_size mean = sum / count",
                 ["metric", *phases, "batched server, whole scenario"], rows)  # fmt: skip


# The OpenAI route (issue #17) ---------------------------------------------------------------------


async def _run_aiperf(s: Suite, url: str) -> dict[str, Any]:
    """aiperf's summary of the chat route streaming; a failed run, a failed request or
    fewer requests than asked are failures of the suite."""
    p = s.plan
    python = s.peer_pythons["aiperf"]
    tokenizer = _openai.write_byte_tokenizer(s.tmp / "byte-tokenizer")
    print("suite: openai: aiperf ...", file=sys.stderr, flush=True)
    try:
        summary: dict[str, Any] = await asyncio.to_thread(
            _openai.aiperf, python, url, tokenizer, s.tmp / "aiperf",
            concurrency=p.aiperf_concurrency, requests=p.aiperf_requests,
            input_tokens=p.aiperf_input_tokens, output_tokens=p.openai_tokens)  # fmt: skip
    except RuntimeError as error:
        s.failures.append(f"openai: aiperf failed: {error}")
        return {}
    failed = _openai.metric(summary, "error_request_count")
    counted = _openai.metric(summary, "request_count")
    if failed > 0:  # NaN (no failed request counted) is not
        s.failures.append(f"openai: aiperf counted {fig(failed)} failed requests: "
                          f"{summary.get('error_summary')}")  # fmt: skip
    if counted != p.aiperf_requests:
        s.failures.append(f"openai: aiperf counted {fig(counted)} requests, not "
                          f"{p.aiperf_requests}")  # fmt: skip
    return summary


async def scenario_openai(s: Suite) -> dict[str, Any]:
    p = s.plan
    server = await s.server()
    gateway = await s.gateway(server)
    url = f"http://{gateway.target}"
    rows, targets, notes, native_pts, chat_pts = [], [], [], [], []
    with s.peak_rss([server, gateway], "openai"):
        for c, count in p.openai_counts:
            chats = _openai.chat_bodies(generation_prompts(count), tokens=p.openai_tokens,
                                        temperature=0.8, first_seed=4000)  # fmt: skip
            native_run = lg.sse_streams(url, TEXT_MODEL, _openai.native_bodies(chats), c,
                                        "native SSE")  # fmt: skip
            chat_run = _openai.chat_streams(url, chats, c, "OpenAI chat")
            if len(rows) % 2:  # alternate which goes first: not always on a fresher machine
                o, n = await chat_run, await native_run
            else:
                n, o = await native_run, await chat_run
            native_pts.append(s.check(n, "openai"))
            chat_pts.append(s.check(o, "openai"))
            differ = [i for i, (a, b) in enumerate(zip(n.streams, o.streams, strict=True))
                      if not a.error and not b.error and a.text != b.text]  # fmt: skip
            allowed = 0 if c == 1 else MAX_ROUNDED_TEXTS
            if len(differ) > allowed:
                s.failures.append(f"openai: at concurrency {c}, {len(differ)} of {count} texts "
                                  f"differ between the routes (at most {allowed})")  # fmt: skip
            notes.append(f"concurrency {c}: {len(differ)} of {count} texts differ between "
                         f"the routes (at most {allowed} allowed)")  # fmt: skip
            native_text = n.extra["first_text_p50_ms"]
            ttft = ratio(o.p50_ms, native_text)
            rows.append([c, count, fig(n.p50_ms), fig(native_text), fig(o.p50_ms), fig(ttft),
                         fig(n.extra["gap_p50_ms"]), fig(o.extra["gap_p50_ms"]),
                         fig(ratio(o.extra["gap_p50_ms"], n.extra["gap_p50_ms"])),
                         fig(ratio(o.throughput, n.throughput))])  # fmt: skip
            targets.append(target(f"OpenAI chat / native SSE time to first token (p50) at "
                                  f"concurrency {c}", ttft, "<= 1.2", ttft <= 1.2,
                                  f"{fig(o.p50_ms)} vs {fig(native_text)} ms (to the first "
                                  "text)"))  # fmt: skip
        summary = await _run_aiperf(s, url)
    return section(
        "openai", "The OpenAI route",
        f"Streamed generations of bytelm ({p.openai_tokens} new tokens, temperature 0.8, "
        "distinct prompts and seeds) through the gateway on the native route (`POST "
        "/v1/models/bytelm:generateStream`, SSE) and on the OpenAI route (`POST "
        "/openai/v1/chat/completions`, `\"stream\": true`), driven by the same client code "
        "on keep-alive HTTP/1.1 connections; the native request carries the prompt the chat "
        "route renders from its message, and its stop sequence. Latency columns are time to "
        "first token: to the first message with tokens (native), and to the first with text "
        "(both routes; OpenAI's chunks carry no token ids, and text held back, such as a "
        "newline that may begin the stop sequence, delays both alike); the target compares "
        "the latter. `gap` is between chunks with text. Then "
        f"aiperf profiles the chat route streaming (concurrency {p.aiperf_concurrency}, "
        f"{p.aiperf_requests} requests, {p.aiperf_input_tokens} input tokens, "
        f"{p.openai_tokens} output tokens asked, greedy), counting tokens with a byte-level "
        "tokenizer written for the run (bytelm's tokens are bytes; no network here).",
        {"tokens": p.openai_tokens, "streams": dict(p.openai_counts),
         "aiperf": {"concurrency": p.aiperf_concurrency, "requests": p.aiperf_requests}},
        series=[series("native SSE", native_pts), series("OpenAI chat", chat_pts)],
        tables=[table("OpenAI chat vs native SSE (ms; ratios OpenAI / native)",
                      ["concurrency", "streams", "native TTFT p50 (token)",
                       "native TTFT p50 (text)", "OpenAI TTFT p50 (text)", "TTFT (text)",
                       "native gap p50", "OpenAI gap p50", "gap", "tokens/s"], rows),
                table("aiperf on the OpenAI chat route (streaming)",
                      ["metric", "avg", "p50", "p90", "p99"],
                      [[r[0], *(fig(x) if isinstance(x, float) else x for x in r[1:])]
                       for r in _openai.summary_rows(summary)])],
        targets=targets, notes=notes, aiperf=summary,
    )  # fmt: skip


# Batched decoding on every dispatch path (issue #13) ---------------------------------------------


async def scenario_decoding(s: Suite) -> dict[str, Any]:
    p, rows, measured = s.plan, [], []
    sizes = {"steps": p.decode_steps, "texts": p.decode_texts, "text_tokens": p.decode_text_tokens,
             "repeats": p.decode_repeats}  # fmt: skip
    for name, env, why in dispatch_paths(s):
        print(f"suite: decoding on {name} ...", file=sys.stderr, flush=True)
        try:
            r = None if why else run_model(s, "decoding", env, **sizes)
        except RuntimeError as error:
            s.failures.append(f"decoding on {name}: {error}")
            r = None
        if r is None:
            rows.append([f"`{name}`", why or "FAILED", "", "", "", "", ""])
            continue
        measured.append(r)
        rounding, text, speed = r["rounding"], r["text"], r["speed"]
        batched = speed["batched"]
        first = f" (first at {sorted(text['first_at'])})" if text["differ"] else ""
        rows.append([
            f"`{r['path']}`", f"{fig(rounding['max_abs'])} / {fig(rounding['max_rel'])}",
            f"{text['differ']} of {text['sequences']}{first}",
            "passes" if r["probe"]["exact_passes"] else "fails",
            f"{fig(batched['1'])} / {fig(batched['32'])} ({batched['32'] / batched['1']:.2f}x)",
            fig(speed["exact"]["32"]) if speed["exact"] else "n/a", fig(speed["row by row"]["32"]),
        ])  # fmt: skip
    return section(
        "decoding", "Batched decoding on every dispatch path",
        "For each dispatch path this machine can run, a process of its own measures "
        "bytelm's `BatchedDecoding` (shipped weights, no server): the largest logit "
        f"difference of a batched step against each row's lone step ({p.decode_steps} steps "
        f"of 32 sequences); {p.decode_texts} texts of {p.decode_text_tokens} tokens, greedy "
        "and sampled, decoded together against each alone; the median step time of 1, 8 and "
        "32 sequences batched, exact (`--batch-invariant`) and row by row, as tokens/s.",
        {"steps": p.decode_steps, "texts": p.decode_texts, "tokens": p.decode_text_tokens},
        tables=[table("Batched vs alone, per path", [
            "path", "max abs / rel logit diff, batched vs alone", "texts differing",
            "exact check", "batched tok/s at 1 / 32 (x)", "exact tok/s at 32",
            "row by row at 32"], rows)],
        paths=measured,
    )  # fmt: skip


# The run -----------------------------------------------------------------------------------------


def find_perf_analyzer() -> tuple[Path, dict[str, str]]:
    """perf_analyzer and the environment it runs in, as `nox -s bench` sets them."""
    binary, libs = os.environ.get(PERF_ANALYZER_ENV, ""), os.environ.get(PERF_ANALYZER_LIBS_ENV, "")
    if not binary or not Path(binary).exists():
        raise SystemExit(f"perf_analyzer not found: run `nox -s bench` (it installs it), or "
                         f"set {PERF_ANALYZER_ENV} and {PERF_ANALYZER_LIBS_ENV}")  # fmt: skip
    return Path(binary), {**os.environ, "LD_LIBRARY_PATH": libs}


def write_repository(root: Path, model_file: Path) -> None:
    """A model repository: the MLP as a TorchScript file with its tensors declared, and bytelm."""
    (root / MLP / "1").mkdir(parents=True)
    shutil.copy(model_file, root / MLP / "1" / "model.pt")
    tensor = f'dtype = "float32"\nshape = [-1, {_model.FEATURES}]\n'
    (root / MLP / "model.toml").write_text(
        f'source = "model.pt"\n\n[inputs.INPUT0]\n{tensor}\n[outputs.OUTPUT0]\n{tensor}\n'
        "[batching]\npredict_batches = true\n\n"
        f'[warmup.inputs.INPUT0]\ndtype = "float32"\nshape = [1, {_model.FEATURES}]\n'
    )
    (root / TEXT_MODEL / "1").mkdir(parents=True)
    (root / TEXT_MODEL / "model.toml").write_text('source = "bytelm"\n[warmup]\ntext = "def "\n')


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    tools = {tool for name in args.scenarios for tool in TOOLS.get(name, ())}
    if missing := sorted(t for t in tools - {"perf_analyzer"} if shutil.which(t) is None):
        raise SystemExit(f"the suite needs {' and '.join(missing)}: apt-get install wrk "
                         "nghttp2-client")  # fmt: skip
    binary, pa_env = find_perf_analyzer() if "perf_analyzer" in tools else (None, {})
    _model.build_torchscript(model_file := tmp / "mlp.pt")
    write_repository(tmp / "repository", model_file)
    s = Suite(args, args.plan, tmp, args.server_python or sys.executable, binary, pa_env,
              model_file)  # fmt: skip
    # Set-up, not timed: the peers' virtualenvs (minutes the first time, nothing after).
    setup = time.perf_counter()
    if "peers" in args.scenarios:
        s.peer_pythons = {name: srv.ensure_venv(name, srv.ROOT) for name in srv.PEERS}
    if "openai" in args.scenarios:
        s.peer_pythons["aiperf"] = _openai.ensure_aiperf()
    setup_s = round(time.perf_counter() - setup, 1)
    dispatch = python_says(s, "from protoserve.server.runtime.dispatch import describe_current "
                              "as d; print(d())")  # fmt: skip
    tools_run = [str(binary) if t == "perf_analyzer" else t for t in sorted(tools)]
    started = time.perf_counter()
    results: dict[str, Any] = {
        "title": "protoserve benchmarks", "name": args.name,
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": bool(args.quick), "setup_s": setup_s, "command": args.command,
        "machine": {**machine(), "dispatch": dispatch},
        "versions": versions(tools_run, pa_env or None), "scenarios": [], "failures": s.failures,
    }  # fmt: skip
    with srv.stopping(s.procs):
        for name in (n for n in SCENARIOS if n in args.scenarios):
            print(f"suite: {name} ...", file=sys.stderr, flush=True)
            phase = time.perf_counter()
            scenario = await globals()[f"scenario_{name}"](s)
            if scenario["settings"]:  # not memory's: it gathers the others' figures
                scenario["settings"]["wall_s"] = round(time.perf_counter() - phase, 1)
            results["scenarios"].append(scenario)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    # What protoserve's processes logged at WARNING or above, shutdown included.
    ours = [p for p in s.procs if "protoserve.clients.cli" in p.cmd]
    results["logs"] = {p.name: tail for p in ours if (tail := p.warnings_tail(30).strip())}
    return results


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add = parser.add_argument
    add("group", nargs="?", choices=tuple(GROUPS), default="suite", help="default: suite")
    add("--quick", action="store_true", help="shorter runs: the suite within 5 minutes")
    add("--scenarios", help=f"comma-separated, of {', '.join(SCENARIOS)} (default: the group's)")
    add("--set", action="append", default=[], metavar="NAME=VALUE",
        help="a figure of the plan (Plan, above): seconds=2, embed_chars=(10, 20)")  # fmt: skip
    add("--out", type=Path, default=RESULTS, help="folder of the report")
    add("--name", help="file name of the report (default: the date, group and mode)")
    add("--server-python", help="the Python that runs protoserve (default: this one)")
    add("--server-threads", type=int, help="OMP_NUM_THREADS of the servers (default: unset)")
    add("--baseline", type=Path, help="a report's JSON whose gRPC stream TTFT at concurrency 1 "
        "the run's is compared to (default: the newest of the same mode in --out)")  # fmt: skip
    args = parser.parse_args(argv)
    args.command = " ".join(["nox -s bench", *(["--", *argv] if argv else [])])
    chosen = args.scenarios.split(",") if args.scenarios else GROUPS[args.group]
    args.scenarios = {x.strip() for x in chosen if x.strip()}
    if unknown := args.scenarios - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    args.plan = QUICK if args.quick else FULL
    for item in args.set:
        key, _, text = item.partition("=")
        try:
            old, new = getattr(args.plan, key), ast.literal_eval(text)
            if not isinstance(new, type(old)) and not isinstance(old, float):
                raise TypeError(f"not a {type(old).__name__}")
            args.plan = dataclasses.replace(args.plan, **{key: new})
        except (AttributeError, TypeError, ValueError, SyntaxError) as error:
            parser.error(f"--set {item}: {error}")
    if args.name is None:
        group = "" if args.group == "suite" else f"-{args.group}"
        args.name = dt.date.today().isoformat() + group + ("-quick" if args.quick else "")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="protoserve-bench-") as tmp:
        results = asyncio.run(run(args, Path(tmp)))
    for path in _report.write_report(results, args.out).values():
        print(path)
    if results["failures"]:
        print(f"suite: {len(results['failures'])} failure(s); see the report", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
