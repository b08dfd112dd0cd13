"""The benchmark suite (issue #7): protoserve against the model's own speed and its peers.

One command (``nox -s bench``, or ``python bench/suite.py`` from a Python with
protoserve installed) runs every scenario and writes ``bench/results/<date>.md``,
``.json`` and PNG plots. Every figure the report judges is a ratio of two things
measured in this run, on this machine, one after the other:

- **Gateway overhead**: one small unary call (a TorchScript MLP, one row) straight
  to the server over gRPC and through the gateway over HTTP/1.1 keep-alive, by
  perf_analyzer (and, in full mode, h2load vs wrk on the v1 API), at concurrency
  1, 16 and 64; time to first token and the gap between tokens over gRPC streaming
  and over the gateway's Server-Sent Events (our own client, the same for both).
- **Distance to the limit**: the model's batched forward pass in a loop in a
  process of its own (``bench/_limits.py``), against the server at concurrency 64:
  Embed (bytelm), Predict (the MLP), and generation tokens per second.
- **Batching**: dynamic batching on and off (Embed at concurrency 64); continuous
  batching against one stream at a time and against round-robin stepping.
- **Dispatch paths**: continuous batching (32 streams against one stream) on every
  CPU code path this machine can run (``ATEN_CPU_CAPABILITY`` and
  ``MKL_ENABLE_INSTRUCTIONS``), a server started on each.
- **Peers**: the same TorchScript file served by protoserve, MLServer and KServe
  (each peer in a virtualenv of its own), driven by perf_analyzer over the Open
  Inference Protocol, gRPC and REST.
- **Memory**: resident memory of every server and gateway, idle and under load.

Every counted request must have succeeded: a failed one is listed under
*Failures* in the report and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _harness as h
import _loadgen
import _model
import _peers
import _report
import grpc

RESULTS = h.ROOT / "bench" / "results"
MLP = "mlp"
TEXT_MODEL = "bytelm"
#: Environment variables `nox -s bench` sets: where perf_analyzer is, and its libraries.
PERF_ANALYZER_ENV = "PROTOSERVE_PERF_ANALYZER"
PERF_ANALYZER_LIBS_ENV = "PROTOSERVE_PERF_ANALYZER_LD_LIBRARY_PATH"
EMBED_PATH = "/protoserve.inference.v1.InferenceService/Embed"
PREDICT_PATH = "/protoserve.inference.v1.InferenceService/Predict"
JSON_TENSORS = ("--input-tensor-format", "json", "--output-tensor-format", "json")
SCENARIOS = ("gateway", "streams", "limit", "batching", "paths", "peers", "memory")


@dataclass(frozen=True)
class Plan:
    """How long and how wide each measurement is: the full run or ``--quick``."""

    seconds: float  # one measurement window (one concurrency level of one series)
    levels: tuple[int, ...]  # concurrency levels of the unary sweeps
    peer_levels: tuple[int, ...]
    stream_tokens: int
    stream_counts: dict[int, int]  # concurrency -> streams measured
    limit_batch: int
    both_generators: bool  # h2load/wrk beside perf_analyzer in the gateway scenario


FULL = Plan(8.0, (1, 16, 64), (1, 16, 64), 64, {1: 16, 16: 64}, 64, True)
QUICK = Plan(3.0, (1, 16, 64), (16,), 32, {1: 6, 16: 32}, 64, False)


@dataclass
class Suite:
    """What the scenarios share: the run's settings, processes and findings."""

    args: argparse.Namespace
    plan: Plan
    tmp: Path
    python: str
    pb: Any
    stubs: Any
    perf_analyzer: Path
    pa_env: dict[str, str]
    model_file: Path
    procs: list[h.Proc] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    memory: list[list[Any]] = field(default_factory=list)
    server: h.Proc | None = None
    gateway: h.Proc | None = None
    #: Each peer's Python, in its own virtualenv (made before the timed run).
    peer_pythons: dict[str, Path] = field(default_factory=dict)

    def check(self, point: _loadgen.Point, where: str) -> _loadgen.Point:
        """Keep ``point``; a failed request in it is a failure of the run."""
        if point.failed or point.ok == 0:
            sample = point.extra.get("error_sample") or point.extra.get("errors") or ""
            self.failures.append(
                f"{where}: {point.label} at concurrency {point.concurrency}: "
                f"{point.failed} failed, {point.ok} ok {sample}".strip()
            )
        return point

    def perf(self, url: str, protocol: str, model: str, c: int, label: str) -> _loadgen.Point:
        point = _loadgen.perf_analyzer(
            self.perf_analyzer,
            self.pa_env,
            url=url,
            protocol=protocol,
            model=model,
            concurrency=c,
            seconds=self.plan.seconds,
            tmp=self.tmp,
            label=label,
            # REST clients send JSON: the binary tensor extension is Triton's, not REST's.
            extra_args=JSON_TENSORS if protocol == "http" else (),
            # Report the windows as measured: on shared cores a stability rule only
            # decides how long to wait, and a run that never settles is not a failure.
            stability=100.0,
            max_trials=3,
        )
        return self.check(point, "perf_analyzer")


# ---------------------------------------------------------------------------
# Shapes of the report.


def series(label: str, generator: str, points: Sequence[_loadgen.Point]) -> dict[str, Any]:
    return {"label": label, "generator": generator, "points": [p.as_dict() for p in points]}


def target(name: str, value: float, goal: str, met: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "value": value, "target": goal, "met": bool(met), "detail": detail}


def at(points: Sequence[_loadgen.Point], c: int) -> _loadgen.Point:
    return next(p for p in points if p.concurrency == c)


def fig(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


# ---------------------------------------------------------------------------
# Starting things.


def write_repository(root: Path, model_file: Path, features: int) -> Path:
    """A model repository: the MLP as a TorchScript file with its tensors declared, and bytelm."""
    mlp = root / MLP
    (mlp / "1").mkdir(parents=True)
    shutil.copy(model_file, mlp / "1" / "model.pt")
    (mlp / "model.toml").write_text(
        'source = "model.pt"\n\n'
        f'[inputs.INPUT0]\ndtype = "float32"\nshape = [-1, {features}]\n\n'
        f'[outputs.OUTPUT0]\ndtype = "float32"\nshape = [-1, {features}]\n\n'
        "[batching]\npredict_batches = true\n\n"
        f'[warmup.inputs.INPUT0]\ndtype = "float32"\nshape = [1, {features}]\n'
    )
    text = root / TEXT_MODEL
    (text / "1").mkdir(parents=True)
    (text / "model.toml").write_text('source = "bytelm"\n[warmup]\ntext = "def "\n')
    return root


async def start_server(
    s: Suite, name: str, *flags: str, env: dict[str, str] | None = None
) -> h.Proc:
    repo = s.tmp / "repository"
    if not repo.exists():
        write_repository(repo, s.model_file, _model.FEATURES)
    common = ["--model-repository", str(repo), "--max-active", "64", "--max-queue", "256"]
    proc = h.launch(s.python, s.tmp, name, "serve", [*common, *flags], True, env=env)
    s.procs.append(proc)
    deadline = time.monotonic() + 240
    await h.wait_ready(proc, s.pb, s.stubs, deadline, model=TEXT_MODEL)
    await h.wait_ready(proc, s.pb, s.stubs, deadline, model=MLP)
    return proc


async def start_gateway(s: Suite, upstream: h.Proc) -> h.Proc:
    proc = h.launch(s.python, s.tmp, "gateway", "gateway", ["--upstream", upstream.target], False)
    s.procs.append(proc)
    await h.wait_gateway(proc, time.monotonic() + 120)
    return proc


def mib(n: float) -> float:
    return round(n / 2**20, 1)


@contextlib.contextmanager
def peak_rss(s: Suite, procs: Sequence[tuple[str, h.Proc]], phase: str) -> Iterator[None]:
    """Sample the resident memory of ``procs`` (with their children) while the block runs."""
    idle = {name: _loadgen.tree_rss_bytes(p.pid) for name, p in procs}
    # Proportional set size: a library two processes of a tree map counts once in all.
    pss = {name: sum(_peers.tree_pss(p.pid).values()) for name, p in procs}
    sampler = _loadgen.RssSampler([p.pid for _, p in procs], tree=True)
    sampler.start()
    try:
        yield
    finally:
        sampler.stop()
        for name, p in procs:
            s.memory.append(
                [name, mib(idle[name]), mib(pss[name]), mib(sampler.peak(p.pid)), phase]
            )


# ---------------------------------------------------------------------------
# Requests, as bytes for h2load and JSON for wrk.


def predict_request(s: Suite, rows: int) -> Any:
    import numpy as np

    data = np.asarray(_model.sample_rows(rows), dtype=np.float32)
    return s.pb.PredictRequest(
        model=MLP,
        inputs=[
            s.pb.Tensor(
                name="INPUT0",
                data_type=s.pb.DATA_TYPE_FLOAT32,
                shape=list(data.shape),
                raw_data=data.tobytes(),
            )
        ],
    )


def embed_text() -> str:
    return h.embed_texts(1, chars=(80, 80))[0]


def stream_requests(s: Suite, count: int, tokens: int) -> list[Any]:
    return [
        s.pb.GenerateStreamRequest(
            model=TEXT_MODEL,
            inputs=prompt,
            parameters=s.pb.GenerationParameters(
                max_new_tokens=tokens, temperature=0.8, seed=1000 + i
            ),
        )
        for i, prompt in enumerate(h.generation_prompts(count))
    ]


def as_json(message: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True)


def h2load(s: Suite, proc: h.Proc, path: str, message: bytes, c: int, label: str) -> _loadgen.Point:
    """h2load on one of our servers; h2load ignores grpc-status, the server's counter does not."""
    method = path.rsplit("/", 1)[1]
    url = proc.metrics_url or ""
    before = _loadgen.settled_requests(url, method)
    point = _loadgen.h2load_grpc(f"http://{proc.target}", path, message, c, s.plan.seconds,
                                 s.tmp, label)  # fmt: skip
    delta = _loadgen.requests_delta(before, _loadgen.settled_requests(url, method))
    point.extra["grpc_codes"] = delta
    if problem := _loadgen.check_grpc_counts(point, delta):
        s.failures.append(f"h2load {label} at concurrency {c}: {problem}")
    return s.check(point, "h2load")


# ---------------------------------------------------------------------------
# Scenarios.


async def scenario_gateway(s: Suite) -> dict[str, Any]:
    assert s.server and s.gateway
    grpc_pts, http_pts, h2_pts, wrk_pts = [], [], [], []
    procs = [("protoserve server", s.server), ("protoserve gateway", s.gateway)]
    with peak_rss(s, procs, "gateway, unary"):
        for i, c in enumerate(s.plan.levels):
            # Alternate which goes first, so that neither always runs on a fresher machine.
            for proto in ("grpc", "http") if i % 2 == 0 else ("http", "grpc"):
                if proto == "grpc":
                    grpc_pts.append(s.perf(s.server.target, "grpc", MLP, c, "gRPC direct"))
                else:
                    http_pts.append(s.perf(s.gateway.target, "http", MLP, c, "REST via gateway"))
        if s.plan.both_generators:
            message = predict_request(s, 1)
            body = json.dumps(as_json(message)).encode()
            url = f"http://{s.gateway.target}/v1/models/{MLP}:predict"
            for c in s.plan.levels:
                h2_pts.append(
                    h2load(s, s.server, PREDICT_PATH, message.SerializeToString(), c, "v1 gRPC")
                )
                wrk_pts.append(
                    s.check(
                        _loadgen.wrk(
                            url, body, "application/json", c, s.plan.seconds, s.tmp, "v1 REST"
                        ),
                        "wrk",
                    )
                )
    out_series = [
        series("gRPC direct", "perf_analyzer", grpc_pts),
        series("REST via gateway", "perf_analyzer", http_pts),
    ]
    targets = []
    if 16 in s.plan.levels:
        g, r = at(grpc_pts, 16), at(http_pts, 16)
        value = h.ratio(r.throughput, g.throughput)
        targets.append(
            target(
                "REST / gRPC throughput at concurrency 16 (perf_analyzer)",
                value,
                ">= 0.70",
                value >= 0.70,
                f"{fig(r.throughput)} vs {fig(g.throughput)} infer/s; "
                f"p99 {fig(r.p99_ms)} vs {fig(g.p99_ms)} ms",
            )
        )
    ratios = [
        [c, fig(at(http_pts, c).throughput / at(grpc_pts, c).throughput), ""] for c in s.plan.levels
    ]
    if h2_pts:
        out_series += [series("v1 gRPC", "h2load", h2_pts), series("v1 REST", "wrk", wrk_pts)]
        for row in ratios:
            c = row[0]
            row[2] = fig(at(wrk_pts, c).throughput / at(h2_pts, c).throughput)
    return {
        "id": "gateway",
        "title": "Gateway overhead: unary calls",
        "description": (
            f"One call of the `{MLP}` TorchScript model (one row of {_model.FEATURES} float32) "
            "straight to the server over gRPC, and through `protoserve gateway` over HTTP/1.1 "
            "keep-alive (JSON). perf_analyzer drives both over the Open Inference Protocol "
            "(ModelInfer / `POST /v2/models/mlp/infer`); in full mode h2load (gRPC, HTTP/2, one "
            "connection) and wrk (HTTP/1.1, one connection per concurrent request) drive the "
            "v1 API's Predict the same way."
        ),
        "settings": {"window_s": s.plan.seconds, "concurrency": list(s.plan.levels)},
        "series": out_series,
        "plot": True,
        "tables": [
            {
                "title": "REST / gRPC throughput",
                "header": ["concurrency", "perf_analyzer (OIP)", "wrk / h2load (v1)"],
                "rows": ratios,
            }
        ],
        "targets": targets,
        "notes": [],
    }


async def scenario_streams(s: Suite) -> dict[str, Any]:
    assert s.server and s.gateway
    tokens = s.plan.stream_tokens
    rows, grpc_pts, sse_pts = [], [], []
    procs = [("protoserve server", s.server), ("protoserve gateway", s.gateway)]
    with peak_rss(s, procs, "streams"):
        for c, count in s.plan.stream_counts.items():
            requests = stream_requests(s, count, tokens)
            bodies = [{"inputs": r.inputs, "parameters": as_json(r.parameters)} for r in requests]
            grpc_run = _loadgen.grpc_streams(s.server.target, requests, c, "gRPC stream")
            sse_run = _loadgen.sse_streams(
                f"http://{s.gateway.target}", TEXT_MODEL, bodies, c, "SSE via gateway"
            )
            # Alternate which goes first, so that neither always runs on a fresher machine.
            if len(rows) % 2:
                e, g = await sse_run, await grpc_run
            else:
                g, e = await grpc_run, await sse_run
            grpc_pts.append(s.check(g, "streams"))
            sse_pts.append(s.check(e, "streams"))
            rows.append(
                [
                    c,
                    count,
                    fig(e.p50_ms / g.p50_ms),
                    fig(e.p99_ms / g.p99_ms),
                    fig(e.extra["gap_p50_ms"] / g.extra["gap_p50_ms"]),
                    fig(e.throughput / g.throughput),
                ]
            )
    targets = []
    for c in s.plan.stream_counts:
        g, e = at(grpc_pts, c), at(sse_pts, c)
        value = h.ratio(e.p50_ms, g.p50_ms)
        targets.append(
            target(
                f"SSE / gRPC time to first token (p50) at concurrency {c}",
                value,
                "<= 1.2",
                value <= 1.2,
                f"{fig(e.p50_ms)} vs {fig(g.p50_ms)} ms",
            )
        )
    return {
        "id": "streams",
        "title": "Gateway overhead: streaming generation",
        "description": (
            f"GenerateStream on bytelm ({tokens} new tokens, temperature 0.8, distinct seeds and "
            "prompts) over gRPC, and the same requests through the gateway as Server-Sent "
            "Events (`POST /v1/models/bytelm:generateStream`, HTTP/1.1 keep-alive). One client "
            "of ours drives both (perf_analyzer, wrk and h2load cannot read SSE): latency "
            "columns are time to first token; `gap` is the time between token events."
        ),
        "settings": {"tokens": tokens, "streams": dict(s.plan.stream_counts)},
        "series": [
            series("gRPC stream", "grpc-stream-client", grpc_pts),
            series("SSE via gateway", "sse-client", sse_pts),
        ],
        "plot": False,
        "tables": [
            {
                "title": "SSE / gRPC",
                "header": [
                    "concurrency",
                    "streams",
                    "TTFT p50",
                    "TTFT p99",
                    "gap p50",
                    "tokens/s",
                ],
                "rows": rows,
            }
        ],
        "targets": targets,
        "notes": [],
    }


def limit(s: Suite, *argv: str) -> dict[str, Any]:
    """``bench/_limits.py`` in a process of its own, with the server's Python."""
    cmd = [s.python, str(h.ROOT / "bench" / "_limits.py"), *argv]
    got = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=h.ROOT)
    if got.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{got.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(got.stdout.strip().splitlines()[-1])
    return result


async def scenario_limit(s: Suite) -> dict[str, Any]:
    assert s.server
    batch, secs = s.plan.limit_batch, s.plan.seconds
    text = embed_text()
    tokens = s.plan.stream_tokens
    prompts = s.tmp / "prompts.json"
    prompts.write_text(json.dumps(h.generation_prompts(batch)))

    alone_embed = limit(s, "embed", "--batch", str(batch), "--seconds", str(secs), "--text", text)
    message = s.pb.EmbedRequest(model=TEXT_MODEL, inputs=[text]).SerializeToString()
    with peak_rss(s, [("protoserve server", s.server)], "limit"):
        served_embed = h2load(s, s.server, EMBED_PATH, message, batch, "Embed, server")

        alone_predict = limit(
            s, "predict", "--batch", str(batch), "--seconds", str(secs),
            "--model-file", str(s.model_file), "--features", str(_model.FEATURES),
        )  # fmt: skip
        served_predict = s.perf(s.server.target, "grpc", MLP, batch, "Predict, server")

        alone_decode = limit(
            s, "decode", "--batch", str(batch), "--tokens", str(tokens),
            "--prompts-json", str(prompts), "--temperature", "0.8", "--first-seed", "1000",
        )  # fmt: skip
        served_gen = s.check(
            await _loadgen.grpc_streams(
                s.server.target, stream_requests(s, batch, tokens), batch, "generation, server"
            ),
            "limit",
        )
    rows = [
        [
            "Embed (bytelm, texts/s)",
            fig(alone_embed["items_per_s"]),
            fig(served_embed.throughput),
            fig(served_embed.throughput / alone_embed["items_per_s"]),
        ],
        [
            f"Predict ({MLP}, rows/s)",
            fig(alone_predict["items_per_s"]),
            fig(served_predict.throughput),
            fig(served_predict.throughput / alone_predict["items_per_s"]),
        ],
        [
            "Generation (bytelm, tokens/s, decode steps)",
            fig(alone_decode["decode_tokens_per_s"]),
            fig(served_gen.throughput),
            fig(served_gen.throughput / alone_decode["decode_tokens_per_s"]),
        ],
        [
            "Generation (bytelm, tokens/s, prefill + decode)",
            fig(alone_decode["tokens_per_s"]),
            fig(served_gen.throughput),
            fig(served_gen.throughput / alone_decode["tokens_per_s"]),
        ],
    ]
    e = served_embed.throughput / alone_embed["items_per_s"]
    p = served_predict.throughput / alone_predict["items_per_s"]
    g = served_gen.throughput / alone_decode["decode_tokens_per_s"]
    return {
        "id": "limit",
        "title": "Distance to the limit",
        "description": (
            f"The model's own batched forward pass in a loop, batch {batch}, in a process of "
            "its own with the server's Python and torch threads (`bench/_limits.py`), against "
            f"the server with {batch} requests in flight, one item each: Embed (one text of "
            f"{len(text)} characters; h2load), Predict (one row; perf_analyzer over gRPC), and "
            f"generation ({batch} GenerateStream calls of {tokens} tokens at once; our "
            "client). The load generator shares the cores with the server; the loop has them "
            "to itself."
        ),
        "settings": {"batch": batch, "window_s": secs, "tokens": tokens, "text_chars": len(text)},
        "series": [
            series("Embed, server", "h2load", [served_embed]),
            series("Predict, server", "perf_analyzer", [served_predict]),
            series("generation, server", "grpc-stream-client", [served_gen]),
        ],
        "plot": False,
        "tables": [
            {
                "title": "In-process batched forward vs the server",
                "header": ["work", "model alone", "server", "server / alone"],
                "rows": rows,
            }
        ],
        "targets": [
            target(
                f"Embed throughput / batched forward at concurrency {batch}",
                e,
                ">= 0.80",
                e >= 0.8,
                f"{fig(served_embed.throughput)} vs {fig(alone_embed['items_per_s'])} texts/s",
            ),
            target(
                f"Predict throughput / batched forward at concurrency {batch}",
                p,
                ">= 0.80",
                p >= 0.8,
                f"{fig(served_predict.throughput)} vs {fig(alone_predict['items_per_s'])} rows/s",
            ),
            target(
                f"Generation tokens/s / batched decode at {batch} streams",
                g,
                ">= 0.70",
                g >= 0.7,
                f"{fig(served_gen.throughput)} vs {fig(alone_decode['decode_tokens_per_s'])} "
                "tokens/s",
            ),
        ],
        "notes": [],
    }


async def scenario_batching(s: Suite) -> dict[str, Any]:
    assert s.server
    off = await start_server(s, "unbatched", "--no-batching")
    c = s.plan.limit_batch
    text = embed_text()
    message = s.pb.EmbedRequest(model=TEXT_MODEL, inputs=[text]).SerializeToString()
    with peak_rss(s, [("protoserve server", s.server), ("unbatched server", off)], "batching"):
        on_embed = h2load(s, s.server, EMBED_PATH, message, c, "Embed, batching on")
        off_embed = h2load(s, off, EMBED_PATH, message, c, "Embed, batching off")
        count = s.plan.stream_counts[16] // 2
        tokens = s.plan.stream_tokens
        requests = stream_requests(s, count, tokens)
        together = s.check(
            await _loadgen.grpc_streams(s.server.target, requests, 16, "continuous"), "batching"
        )
        alone = s.check(
            await _loadgen.grpc_streams(s.server.target, requests, 1, "one at a time"),
            "batching",
        )
        turns = s.check(
            await _loadgen.grpc_streams(off.target, requests, 16, "round-robin (no batching)"),
            "batching",
        )
    off.stop()
    rows = [
        [
            f"Embed at concurrency {c}, req/s",
            fig(on_embed.throughput),
            fig(off_embed.throughput),
            fig(on_embed.throughput / off_embed.throughput),
        ],
        [
            f"Embed at concurrency {c}, p99 ms",
            fig(on_embed.p99_ms),
            fig(off_embed.p99_ms),
            fig(on_embed.p99_ms / off_embed.p99_ms),
        ],
        [
            f"{count} generations of {tokens} tokens, tokens/s: continuous (16 at once) vs "
            "one at a time",
            fig(together.throughput),
            fig(alone.throughput),
            fig(together.throughput / alone.throughput),
        ],
        [
            "the same, continuous vs round-robin (batching off, 16 at once)",
            fig(together.throughput),
            fig(turns.throughput),
            fig(together.throughput / turns.throughput),
        ],
    ]
    return {
        "id": "batching",
        "title": "Batching",
        "description": (
            "Dynamic batching: Embed (one text per request, h2load) at concurrency "
            f"{c} against the server with batching on and a second server started with "
            "`--no-batching`. Continuous batching: the same generations 16 at once (decoded "
            "together), one at a time, and 16 at once on the `--no-batching` server "
            "(generations take turns, one step each)."
        ),
        "settings": {"window_s": s.plan.seconds, "streams": count, "tokens": tokens},
        "series": [
            series("Embed, batching on", "h2load", [on_embed]),
            series("Embed, batching off", "h2load", [off_embed]),
            series("continuous", "grpc-stream-client", [together]),
            series("one at a time", "grpc-stream-client", [alone]),
            series("round-robin", "grpc-stream-client", [turns]),
        ],
        "plot": False,
        "tables": [{"title": "On vs off", "header": ["", "on", "off", "on / off"], "rows": rows}],
        "targets": [],
        "notes": [],
    }


def dispatch_paths(s: Suite) -> list[tuple[str, dict[str, str], str | None]]:
    """Every CPU dispatch path, as the server's Python sees this machine:
    (name, the environment that selects it, why this machine cannot run it)."""
    code = (
        "import json; from protoserve.server.dispatch import dispatch_paths as d; "
        "print(json.dumps([[str(p), p.env(), why] for p, why in d()]))"
    )
    out = subprocess.run([s.python, "-c", code], capture_output=True, text=True, check=True)
    return [(name, env, why) for name, env, why in json.loads(out.stdout.splitlines()[-1])]


def dispatch_of(python: str) -> str:
    """How ``python`` runs torch: its capability, MKL's cap, the CPU."""
    code = "from protoserve.server.dispatch import describe_current as d; print(d())"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    return out.stdout.strip() or out.stderr.strip()[-300:]


async def scenario_paths(s: Suite) -> dict[str, Any]:
    """Continuous batching on every dispatch path: 32 streams at once against one stream."""
    tokens = s.plan.stream_tokens
    requests = stream_requests(s, 32, tokens)
    rows, targets, series_out, notes = [], [], [], []
    for i, (name, env, why) in enumerate(dispatch_paths(s)):
        if why:
            notes.append(f"`{name}` not measured: {why}.")
            continue
        proc = await start_server(s, f"path-{i}", "--max-active", "32", env=env)
        async with grpc.aio.insecure_channel(proc.target) as channel:
            stub = s.stubs.InferenceServiceStub(channel)
            found = await stub.GetModel(s.pb.GetModelRequest(name=TEXT_MODEL), timeout=10)
            decoding = s.pb.Decoding.Name(found.model.decoding)
        together = s.check(
            await _loadgen.grpc_streams(proc.target, requests, 32, f"{name}: 32 at once"),
            "paths",
        )
        alone = s.check(
            await _loadgen.grpc_streams(proc.target, requests[:8], 1, f"{name}: one at a time"),
            "paths",
        )
        proc.stop()
        s.procs.remove(proc)
        ratio = together.throughput / alone.throughput
        speeds = [fig(together.throughput), fig(alone.throughput)]
        rows.append([f"`{name}`", decoding, *speeds, fig(ratio)])
        targets.append(
            target(
                f"Generation tokens/s, 32 streams / one stream, `{name}`",
                ratio,
                ">= 3",
                ratio >= 3,
                " vs ".join(speeds),
            )
        )
        series_out.append(series(f"{name}: 32 at once", "grpc-stream-client", [together]))
        series_out.append(series(f"{name}: one at a time", "grpc-stream-client", [alone]))
    return {
        "id": "paths",
        "title": "Continuous batching on every dispatch path",
        "description": (
            "A server started on each CPU code path this machine can run "
            "(`ATEN_CPU_CAPABILITY` x `MKL_ENABLE_INSTRUCTIONS`, `--max-active 32`, default "
            f"decoding): 32 generations of {tokens} tokens at once against 8 of them one at a "
            "time, tokens per second. `decoding` is what the server's GetModel reports."
        ),
        "settings": {"tokens": tokens, "streams": 32},
        "series": series_out,
        "plot": False,
        "tables": [
            {
                "title": "32 streams against one stream",
                "header": [
                    "path",
                    "decoding",
                    "32 at once, tok/s",
                    "one at a time, tok/s",
                    "ratio",
                ],
                "rows": rows,
            }
        ],
        "targets": targets,
        "notes": notes,
    }


#: Per-request logging off in every server: protoserve runs at --log-level WARNING.
PEER_SETTINGS = {"mlserver": {"debug": False}, "kserve": {"enable_latency_logging": False}}


def drive_oip(
    s: Suite, name: str, grpc_target: str, http_base: str, bodies: tuple[Path, Path], c: int
) -> tuple[_loadgen.Point, _loadgen.Point]:
    """One concurrency level on one server: h2load over gRPC, then wrk over REST."""
    grpc_body, rest_body = bodies
    frame = _peers.grpc_reply_frame_size(int(grpc_target.rsplit(":", 1)[1]), grpc_body)
    g = _loadgen.h2load_grpc(
        f"http://{grpc_target}", _peers.GRPC_PATH, grpc_body.read_bytes()[5:], c,
        s.plan.seconds, s.tmp, f"{name} gRPC",
    )  # fmt: skip
    if problem := _peers.check_reply_bytes(g.extra, frame):
        s.failures.append(f"h2load {name} gRPC at concurrency {c}: {problem}")
    r = _loadgen.wrk(
        f"{http_base}/v2/models/{MLP}/infer", rest_body.read_bytes(), "application/json", c,
        s.plan.seconds, s.tmp, f"{name} REST",
    )  # fmt: skip
    return s.check(g, "peers"), s.check(r, "peers")


async def scenario_peers(s: Suite) -> dict[str, Any]:
    assert s.server and s.gateway
    levels = s.plan.peer_levels
    bodies = _peers.write_load_bodies(s.tmp / "oip-bodies", MLP)
    found: dict[str, dict[str, list[_loadgen.Point]]] = {}
    settings: dict[str, Any] = {}

    def sweep(name: str, grpc_target: str, http_base: str) -> None:
        found[name] = {"grpc": [], "http": []}
        for c in levels:
            g, r = drive_oip(s, name, grpc_target, http_base, bodies, c)
            found[name]["grpc"].append(g)
            found[name]["http"].append(r)

    _peers.check_peer_output(s.gateway.port, MLP, s.model_file)
    _peers.check_peer_output_grpc(s.server.port, MLP, s.model_file)
    pairs = [("protoserve server", s.server), ("protoserve gateway", s.gateway)]
    with peak_rss(s, pairs, "peers"):
        sweep("protoserve", s.server.target, f"http://{s.gateway.target}")
    for name in _peers.PEERS:
        python = s.peer_pythons[name]
        http_port, grpc_port = h.free_port(), h.free_port()
        workdir = s.tmp / f"peer-{name}"
        chosen = _peers.effective_settings(name, PEER_SETTINGS[name])
        argv, env = _peers.peer_command(
            name, python, s.model_file, workdir, MLP, http_port, grpc_port, PEER_SETTINGS[name]
        )
        settings[name] = {k: v for k, v in chosen.items() if v is not None}
        proc = h.spawn(s.tmp, name, argv, env=env, port=http_port, cwd=workdir)
        s.procs.append(proc)
        try:
            waited = _peers.wait_peer_ready(http_port, MLP, time.monotonic() + 240, proc.proc)
            settings[name]["ready_after_s"] = round(waited, 1)
            _peers.check_peer_output(http_port, MLP, s.model_file)
            _peers.check_peer_output_grpc(grpc_port, MLP, s.model_file)
            with peak_rss(s, [(name, proc)], "peers"):
                sweep(name, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}")
        finally:
            _peers.stop_peer(proc.proc)
    out_series = [
        series(f"{server} {'gRPC' if proto == 'grpc' else 'REST'}", pts[0].generator, pts)
        for server, by in found.items()
        for proto, pts in by.items()
    ]
    targets = []
    c16 = 16 if 16 in levels else levels[-1]
    for proto, word in (("grpc", "gRPC"), ("http", "REST")):
        ours = at(found["protoserve"][proto], c16)
        best_name, best = max(
            ((n, at(by[proto], c16)) for n, by in found.items() if n != "protoserve"),
            key=lambda item: item[1].throughput,
        )
        value = h.ratio(ours.throughput, best.throughput)
        targets.append(
            target(
                f"{word}: protoserve / best peer ({best_name}) throughput at concurrency "
                f"{c16}, with a lower p99",
                value,
                ">= 1.5, p99 lower",
                value >= 1.5 and ours.p99_ms < best.p99_ms,
                f"{fig(ours.throughput)} vs {fig(best.throughput)} req/s; p99 "
                f"{fig(ours.p99_ms)} vs {fig(best.p99_ms)} ms",
            )
        )
    return {
        "id": "peers",
        "title": "Peers: the same TorchScript model on protoserve, MLServer and KServe",
        "description": (
            f"`{MLP}` (a TorchScript MLP, one row of {_model.FEATURES} float32 per request) "
            "served by protoserve (a model repository folder: the `.pt` file and its tensors "
            "in model.toml), MLServer and KServe's model server (each a custom runtime of a "
            "few lines, the way their documentation serves a TorchScript file, in a "
            "virtualenv of its own). The same request bytes go to all three over the Open "
            "Inference Protocol: h2load over gRPC (one HTTP/2 connection; a call counts only "
            "with a good reply's bytes), wrk over REST JSON (one keep-alive connection per "
            "concurrent request). protoserve's REST is its gateway, a second process. One "
            "peer runs at a time. perf_analyzer cannot drive either peer: it asks for the "
            "model configuration (Triton's ModelConfig) first, which neither serves."
        ),
        "settings": {
            "window_s": s.plan.seconds,
            "concurrency": list(levels),
            "protoserve": "batching on (max 32 rows, 2 ms), one server process + gateway",
            **settings,
        },
        "series": out_series,
        "plot": len(levels) > 1,
        "tables": [],
        "targets": targets,
        "notes": [],
    }


def scenario_memory(s: Suite) -> dict[str, Any]:
    return {
        "id": "memory",
        "title": "Memory",
        "description": (
            "Resident set size (RSS, MiB) of each process and its children: idle is sampled "
            "just before a phase starts, peak every 0.2 s while it runs. PSS (proportional "
            "set size) counts a library mapped by several processes of one tree once: "
            "MLServer runs its model in a worker process beside its main one, and both "
            "map torch."
        ),
        "settings": {},
        "series": [],
        "plot": False,
        "tables": [
            {
                "title": "RSS, MiB",
                "header": ["process", "idle RSS", "idle PSS", "peak RSS under load", "phase"],
                "rows": s.memory,
            }
        ],
        "targets": [],
        "notes": [],
    }


# ---------------------------------------------------------------------------
# The run.


def versions(s: Suite) -> dict[str, str]:
    out = h.dist_versions("protoserve")
    out["python"] = sys.version.split()[0]
    out.update(h.dist_versions("torch", "grpcio", "protobuf", "starlette", "uvicorn"))
    for tool, argv in (
        ("perf_analyzer", [str(s.perf_analyzer), "--version"]),
        ("wrk", ["wrk", "--version"]),
        ("h2load", ["h2load", "--version"]),
    ):
        with contextlib.suppress(OSError):
            got = subprocess.run(argv, capture_output=True, text=True, env=s.pa_env, check=False)
            # "wrk debian/4.1.0-3+b2 [epoll] ...", "h2load nghttp2/1.52.0", "Perf Analyzer
            # Version 2.51.0 (commit ...)": the first word that is a version, after any "/".
            words = [w.rsplit("/", 1)[-1] for w in (got.stdout + got.stderr).split()]
            out[tool] = next((w for w in words if w[:1].isdigit() and "." in w), "?")
    return out


def find_perf_analyzer() -> tuple[Path, dict[str, str]]:
    """perf_analyzer and the environment it runs in: from `nox -s bench`, else `nox -s compat`."""
    binary = os.environ.get(PERF_ANALYZER_ENV)
    libs = os.environ.get(PERF_ANALYZER_LIBS_ENV, "")
    if not binary:
        compat = h.ROOT / ".nox" / "compat"
        binary = str(compat / "bin" / "perf_analyzer")
        libs = os.pathsep.join(
            str(p.parent)
            for pattern in (
                "libb64/**/libb64.so.0d",
                "lib/python*/site-packages/nvidia/**/libcudart.so.12",
            )
            for p in sorted(compat.glob(pattern))[:1]
        )
    if not Path(binary).exists():
        raise SystemExit(
            "perf_analyzer not found: run the suite with `nox -s bench` (it installs it), or set "
            f"{PERF_ANALYZER_ENV} and {PERF_ANALYZER_LIBS_ENV}"
        )
    env = {**os.environ, "LD_LIBRARY_PATH": libs}
    return Path(binary), env


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    plan = QUICK if args.quick else FULL
    if missing := [tool for tool in ("wrk", "h2load") if shutil.which(tool) is None]:
        raise SystemExit(
            f"the suite needs {' and '.join(missing)}: apt-get install wrk nghttp2-client"
        )
    pb, stubs = h.import_protoserve(tmp)
    binary, pa_env = find_perf_analyzer()
    model_file = tmp / "mlp.pt"
    _model.build_torchscript(model_file)
    s = Suite(args, plan, tmp, args.server_python or h.server_python(), pb, stubs, binary,
              pa_env, model_file)  # fmt: skip
    # Set-up, not timed: the peers' virtualenvs (minutes the first time, nothing after).
    setup = time.perf_counter()
    if "peers" in args.scenarios:
        s.peer_pythons = {name: _peers.ensure_venv(name, h.ROOT) for name in _peers.PEERS}
    setup_s = round(time.perf_counter() - setup, 1)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "title": "protoserve benchmarks",
        "name": args.name,
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": bool(args.quick),
        "setup_s": setup_s,
        "command": command_line(args),
        "machine": {**h.machine(), "dispatch": dispatch_of(s.python)},
        "versions": versions(s),
        "scenarios": [],
        "failures": s.failures,
    }
    chosen = [name for name in SCENARIOS if name in args.scenarios]
    runners: dict[str, Callable[[Suite], Any]] = {
        "gateway": scenario_gateway,
        "streams": scenario_streams,
        "limit": scenario_limit,
        "batching": scenario_batching,
        "paths": scenario_paths,
        "peers": scenario_peers,
    }
    with h.stopping(s.procs):
        s.server = await start_server(s, "server")
        s.gateway = await start_gateway(s, s.server)
        for name in chosen:
            if name == "memory":
                continue
            print(f"suite: {name} ...", file=sys.stderr, flush=True)
            phase = time.perf_counter()
            scenario = await runners[name](s)
            scenario["settings"]["wall_s"] = round(time.perf_counter() - phase, 1)
            results["scenarios"].append(scenario)
    if "memory" in chosen:
        results["scenarios"].append(scenario_memory(s))
    results["wall_s"] = round(time.perf_counter() - started, 1)
    return results


def command_line(args: argparse.Namespace) -> str:
    """The command that runs this suite again, as the report shows it."""
    flags = ["--quick"] if args.quick else []
    if args.scenarios != set(SCENARIOS):
        flags += ["--scenarios", ",".join(n for n in SCENARIOS if n in args.scenarios)]
    return "nox -s bench" + (" -- " + " ".join(flags) if flags else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter windows: within 5 minutes")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, of {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the report")
    parser.add_argument("--name", help="file name of the report (default: the date)")
    parser.add_argument("--server-python", help="the Python that runs protoserve")
    args = parser.parse_args(argv)
    args.scenarios = {x.strip() for x in args.scenarios.split(",") if x.strip()}
    if unknown := args.scenarios - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if args.name is None:
        args.name = dt.date.today().isoformat() + ("-quick" if args.quick else "")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="protoserve-bench-") as tmp:
        results = asyncio.run(run(args, Path(tmp)))
    written = _report.write_report(results, args.out)
    for path in written.values():
        print(path)
    if results["failures"]:
        print(f"suite: {len(results['failures'])} failure(s); see the report", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
