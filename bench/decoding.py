"""Batched decoding on every CPU dispatch path: how far from a lone run, and how fast.

The measurements behind docs/adr/0015-batch-invariance.md. For each dispatch path this
machine can run (``protoserve.server.dispatch``), a process of its own started with
``ATEN_CPU_CAPABILITY`` and ``MKL_ENABLE_INSTRUCTIONS`` set measures bytelm's
``BatchedDecoding`` (the shipped weights):

- **Rounding**: the logits of a batched step against each row's lone step (the
  model's own forward), fed the same tokens, over many steps at many positions:
  the largest absolute difference, and that over the largest logit.
- **Text**: sequences decoded together (greedy and sampled, 256 tokens, across a
  context slide) against each decoded alone by ``generate_tokens``: how many differ,
  and at which token the first difference comes.
- **Speed**: one step of 1, 8 and 32 sequences, in each mode: ``batched`` (the
  default), ``exact`` (``--batch-invariant``, where this path passes its check) and
  row by row (what an exact decoder falls back to): tokens per second.

Run it with ``nox -s bench -- decoding`` (or ``python bench/decoding.py`` with
protoserve installed); ``--quick`` measures less. Writes
``bench/results/<date>-decoding.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BATCHES = (1, 8, 32)


# ---------------------------------------------------------------------------
# The worker: one dispatch path, in a process of its own.


def _rounding(model: Any, steps: int, rows: int) -> dict[str, float]:
    """Largest |batched - alone| over ``steps`` steps of ``rows`` sequences."""
    import torch

    from protoserve.server.models import bytelm

    rng = random.Random(1)
    dec = bytelm.BatchedDecoding(model, rows)
    ctx = model.config.context_length
    worst = worst_rel = 0.0
    caches = dec._caches[:rows]
    with torch.inference_mode():
        for cache in caches:
            prompt = torch.randint(0, 256, (1, rng.randint(1, ctx - steps - 1)))
            model(prompt, cache=cache)
        tokens = [rng.randrange(256) for _ in range(rows)]
        for _ in range(steps):
            batched = dec._forward(tokens, caches)
            for row, cache in enumerate(caches):
                cache.length -= 1
                alone, _ = model(torch.tensor([[tokens[row]]]), cache=cache)
                worst = max(worst, float((alone[0, -1] - batched[row]).abs().max()))
                worst_rel = max(worst_rel, bytelm.rounding_difference(alone[0, -1], batched[row]))
            tokens = [int(t) for t in batched.argmax(dim=-1)]
    return {"max_abs": worst, "max_rel": worst_rel}


def _text(model: Any, sequences: int, tokens: int) -> dict[str, Any]:
    """Sequences decoded together against each alone: how many differ, and where."""
    from protoserve.server.models import bytelm

    rng = random.Random(2)
    code = bytelm.encode(Path(random.__file__).read_text(encoding="utf-8"))
    kinds = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 40, 0.95)]
    requests = []
    for i in range(sequences):
        start = rng.randrange(len(code) - 200)
        prompt = code[start : start + rng.randint(1, 200)]
        requests.append((prompt, *kinds[i % len(kinds)], rng.randrange(2**31)))
    dec = bytelm.BatchedDecoding(model, sequences)
    assert dec.batched, "the batched step failed its check: nothing batched to compare"
    got: list[list[int]] = []
    handles = []
    for prompt, temperature, top_k, top_p, seed in requests:
        handle, first = dec.add(
            prompt, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        )
        handles.append(handle)
        got.append([] if first is None else [first])
    live = [i for i in range(sequences) if got[i]]
    while live:
        out = dec.step([handles[i] for i in live])
        for i, token in zip(live, out, strict=True):
            if token is not None:
                got[i].append(token)
        live = [i for i, t in zip(live, out, strict=True) if t is not None and len(got[i]) < tokens]
    differ: list[int] = []
    for (prompt, temperature, top_k, top_p, seed), batched in zip(requests, got, strict=True):
        alone = list(
            bytelm.generate_tokens(
                model,
                prompt,
                max_new_tokens=tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
            )
        )
        if alone != batched:
            pairs = enumerate(zip(alone, batched, strict=False))
            differ.append(next((j for j, (a, b) in pairs if a != b), min(len(alone), len(batched))))
    return {"sequences": sequences, "tokens": tokens, "differ": len(differ), "first_at": differ}


def _speed(model: Any, repeats: int) -> dict[str, Any]:
    """Median step time of 1, 8, 32 sequences in each mode, as tokens per second."""
    import torch

    from protoserve.server.models import bytelm

    rng = random.Random(3)
    out: dict[str, Any] = {}
    for mode in ("batched", "exact", "row by row"):
        dec = bytelm.BatchedDecoding(model, max(BATCHES), exact=mode != "batched")
        if mode == "exact" and not dec.batched:
            out[mode] = None  # this path fails the exact check: it would run row by row
            continue
        dec.batched = mode != "row by row"
        for cache in dec._caches:
            with torch.inference_mode():
                model(torch.randint(0, 256, (1, rng.randint(20, 200))), cache=cache)
        per_batch = {}
        for batch in BATCHES:
            caches = dec._caches[:batch]
            tokens = [rng.randrange(256) for _ in caches]
            times = []
            with torch.inference_mode():
                for _ in range(repeats):
                    started = time.perf_counter()
                    if dec.batched:
                        dec._forward(tokens, caches)
                    else:
                        for token, cache in zip(tokens, caches, strict=True):
                            model(torch.tensor([[token]]), cache=cache)
                    times.append(time.perf_counter() - started)
                    for cache in caches:
                        cache.length -= 1
            per_batch[str(batch)] = batch / statistics.median(times)
        out[mode] = per_batch
    return out


def worker(quick: bool) -> dict[str, Any]:
    import torch

    from protoserve.server import dispatch
    from protoserve.server.models import bytelm

    model = bytelm.load_pretrained()
    dec = bytelm.BatchedDecoding(model, 32)
    exact = bytelm.BatchedDecoding(model, 32, exact=True)
    return {
        "path": dispatch.describe_current(),
        "aten": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "probe": {
            "batched": dec.probe_difference,
            "exact_passes": exact.batched,
            "exact": exact.probe_difference,
        },
        "rounding": _rounding(model, 16 if quick else 48, 32),
        "text": _text(model, 32 if quick else 64, 128 if quick else 256),
        "speed": _speed(model, 10 if quick else 30),
    }


# ---------------------------------------------------------------------------
# The parent: every path, one process each, and the report.


def run(quick: bool) -> dict[str, Any]:
    from protoserve.server import dispatch

    paths = []
    for path, why in dispatch.dispatch_paths():
        if why:
            print(f"decoding: skip {path}: {why}", file=sys.stderr, flush=True)
            paths.append({"path": str(path), "skipped": why})
            continue
        print(f"decoding: {path} ...", file=sys.stderr, flush=True)
        argv = [sys.executable, __file__, "--worker", *(["--quick"] if quick else [])]
        proc = subprocess.run(
            argv, env={**os.environ, **path.env()}, capture_output=True, text=True, check=False
        )
        if proc.returncode:
            paths.append({"path": str(path), "failed": proc.stderr.strip()[-2000:]})
            continue
        paths.append({"path": str(path), **json.loads(proc.stdout.strip().splitlines()[-1])})
    return {
        "title": "Batched decoding on every dispatch path",
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "cpu": dispatch.cpu_name(),
        "cpus": os.cpu_count(),
        "paths": paths,
    }


def _fig(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# {results['title']}",
        "",
        f"{results['started']}, {results['cpu']}, {results['cpus']} CPUs; "
        f"`nox -s bench -- decoding{' --quick' if results['quick'] else ''}`.",
        "",
        "| path | max abs / rel logit diff, batched vs alone | texts differing | "
        "exact check | batched tok/s at 1 / 32 (x) | exact tok/s at 32 | row by row at 32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in results["paths"]:
        if "skipped" in p or "failed" in p:
            lines.append(f"| `{p['path']}` | {p.get('skipped') or 'FAILED'} | | | | | |")
            continue
        r, t, s = p["rounding"], p["text"], p["speed"]
        batched = s["batched"]
        first = f" (first at {sorted(t['first_at'])})" if t["differ"] else ""
        lines.append(
            f"| `{p['path']}` | {_fig(r['max_abs'])} / {_fig(r['max_rel'])} | "
            f"{t['differ']} of {t['sequences']}{first} | "
            f"{'passes' if p['probe']['exact_passes'] else 'fails'} | "
            f"{_fig(batched['1'])} / {_fig(batched['32'])} ({batched['32'] / batched['1']:.2f}x) | "
            f"{_fig(s['exact']['32']) if s['exact'] else 'n/a'} | {_fig(s['row by row']['32'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and sequences")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the report")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.quick)))
        return 0
    results = run(args.quick)
    name = dt.date.today().isoformat() + "-decoding" + ("-quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown(results))
    print(markdown(results))
    return 1 if any("failed" in p for p in results["paths"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
