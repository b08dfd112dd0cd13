"""The device check's bench (issue #20): bytelm served on the GPU, against its own plain
batched forward on the same GPU, in float32 and bfloat16.

``scripts/device-check.sh`` runs it on a lent GPU machine; anywhere else it runs on the
CPU (``--device cpu``, shorter with ``--quick``), which checks the bench itself, not a
GPU. For each dtype, one ``protoserve serve --model bytelm --device D --dtype T``:

- generation tokens/s at 1, 16 and 64 concurrent streams (GenerateStream over gRPC,
  ``_loadgen.grpc_streams``: every stream must end by length with all its tokens),
  against the model's plain batched forward at the same batch size on the same device
  (``_model.plain_decode``: one forward pass per step for the whole batch);
- Embed at 64 concurrent calls (one text each): texts/s.

Writes ``<out>/<name>.md`` and ``.json``; exits 1 if a stream or call failed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _loadgen as lg
import _model
import _servers as srv
import torch

from protoserve.inference.v1 import inference_service_pb2 as pb

DTYPES = ("float32", "bfloat16")
STREAMS = (1, 16, 64)
PROMPTS = (
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n",
    "class Queue:\n    def __init__(self",
)


async def embed_rate(target: str, concurrency: int, seconds: float) -> dict[str, Any]:
    """Embed calls of one text each, ``concurrency`` at a time for ``seconds``."""
    import grpc

    from protoserve.inference.v1 import inference_service_pb2_grpc as stubs

    done, failed, errors = 0, 0, []
    deadline = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = stubs.InferenceServiceStub(channel)

        async def worker(w: int) -> None:
            nonlocal done, failed
            i = 0
            while time.perf_counter() < deadline:
                text = f"{PROMPTS[(w + i) % len(PROMPTS)]} # {w}.{i}"
                i += 1
                try:
                    reply = await stub.Embed(pb.EmbedRequest(model="bytelm", inputs=[text]),
                                             timeout=60)  # fmt: skip
                    if len(reply.embeddings) != 1:
                        raise ValueError(f"{len(reply.embeddings)} vectors for one text")
                    done += 1
                except (grpc.aio.AioRpcError, ValueError) as error:
                    failed += 1
                    errors.append(str(error)[:200])

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - start
    return {"texts_per_s": done / wall, "ok": done, "failed": failed, "errors": errors[:3]}


async def one_dtype(args: argparse.Namespace, tmp: Path, dtype: str) -> dict[str, Any]:
    flags = ["--model", "bytelm", "--device", args.device, "--dtype", dtype,
             "--max-active", "64", "--max-queue", "256"]  # fmt: skip
    proc = srv.launch(sys.executable, tmp, f"serve-{dtype}", "serve", flags)
    try:
        loaded = await srv.wait_ready(proc, time.monotonic() + 600, ("bytelm",))
        rows = []
        for streams in STREAMS:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(streams * args.rounds)]
            bodies = lg.stream_bodies(prompts, max_new_tokens=args.tokens, temperature=0.8,
                                      first_seed=1000)  # fmt: skip
            requests = lg.grpc_requests(bodies, pb.GenerateStreamRequest)
            point = await lg.grpc_streams(proc.target, requests, streams, f"{streams} streams")
            limit = _model.plain_decode(streams, args.tokens, list(PROMPTS), device=args.device,
                                        dtype=dtype, repeats=args.repeats)  # fmt: skip
            rows.append({"streams": streams, "tokens_per_s": point.throughput,
                         "ttft_p50_ms": point.p50_ms, "ok": point.ok, "failed": point.failed,
                         "error_sample": point.extra.get("error_sample", ""),
                         "limit_tokens_per_s": limit["decode_tokens_per_s"],
                         "ratio": point.throughput / limit["decode_tokens_per_s"]})  # fmt: skip
        embed = await embed_rate(proc.target, 64, args.seconds)
    finally:
        proc.stop()
    return {"dtype": dtype, "load_s": loaded, "generation": rows, "embed": embed}


def report(results: dict[str, Any]) -> str:
    lines = [f"# GPU bench, {results['date']}", "",
             f"**Device:** {results['device_name']} (`--device {results['device']}`); "
             f"torch {results['torch']}, Python {results['python']}; tokens per stream "
             f"{results['tokens']}.", "",
             "| dtype | streams | served tokens/s | plain batched forward tokens/s | ratio | "
             "TTFT p50 ms | failed |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in results["runs"]:
        for row in run["generation"]:
            lines.append(f"| {run['dtype']} | {row['streams']} | {row['tokens_per_s']:.0f} | "
                         f"{row['limit_tokens_per_s']:.0f} | {row['ratio']:.2f} | "
                         f"{row['ttft_p50_ms']:.1f} | {row['failed']} |")  # fmt: skip
    lines += ["", "| dtype | Embed texts/s at 64 | failed | model load s |", "|---|---|---|---|"]
    for run in results["runs"]:
        embed = run["embed"]
        lines.append(f"| {run['dtype']} | {embed['texts_per_s']:.0f} | {embed['failed']} | "
                     f"{run['load_s']:.1f} |")  # fmt: skip
    if results["failures"]:
        lines += ["", "## Failures", "", *(f"- {f}" for f in results["failures"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and rounds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", help="file name (default: <date>-gpu, or -cpu)")
    args = parser.parse_args(argv)
    args.tokens, args.rounds, args.repeats, args.seconds = (
        (16, 1, 1, 2.0) if args.quick else (128, 2, 3, 10.0)
    )
    on_gpu = args.device.startswith("cuda")
    name = args.name or f"{dt.date.today().isoformat()}-{'gpu' if on_gpu else 'cpu'}"
    with tempfile.TemporaryDirectory(prefix="protoserve-gpu-bench-") as tmp:
        runs = [asyncio.run(one_dtype(args, Path(tmp), dtype)) for dtype in DTYPES]
    failures = [
        f"{r['dtype']}, {g['streams']} streams: {g['failed']} failed: {g['error_sample']}"
        for r in runs
        for g in r["generation"]
        if g["failed"] or not g["ok"]
    ]
    failures += [f"{r['dtype']}, Embed: {r['embed']['failed']} failed: {r['embed']['errors']}"
                 for r in runs if r["embed"]["failed"] or not r["embed"]["ok"]]  # fmt: skip
    results = {
        "date": dt.date.today().isoformat(), "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device) if on_gpu else platform.processor()
        or platform.machine(), "torch": torch.__version__, "python": platform.python_version(),
        "tokens": args.tokens, "runs": runs, "failures": failures,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / f"{name}.md").write_text(report(results))
    print(args.out / f"{name}.md")
    print(report(results))
    unmeasured = any(math.isnan(g["ratio"]) for r in runs for g in r["generation"])
    return 1 if failures or unmeasured else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
