"""The models alone: the peers' TorchScript MLP, and each model's own speed with no server.

Every server in the peer comparison loads the MLP file written here. Run as a process of
its own (the servers' Python; for ``decoding``, a dispatch path's environment),
``python bench/_model.py WHAT '{"keyword": value}'`` prints as JSON what the driver
compares the servers with: ``embed``, ``predict``, ``plain_decode`` (the ``limit``
scenario's generation limit: the model's own batched forward, one step of every sequence
per pass), ``decode`` (the same work through bytelm's ``BatchedDecoding``, the server's
decoder, shown beside it), ``decoding`` (``BatchedDecoding`` on this path: rounding,
texts and speed; docs/adr/0015-batch-invariance.md).
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

INPUT, OUTPUT = "INPUT0", "OUTPUT0"
FEATURES, HIDDEN, SEED = 64, 256, 0
BATCHES = (1, 8, 32)


def build_torchscript(path: Path) -> None:
    """Write the seeded MLP to ``path`` as TorchScript: 64 -> 256 -> 64 float32, small on
    purpose (a request costs mostly what the server adds), the same weights every run."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SEED)
        layers = (
            torch.nn.Linear(FEATURES, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, FEATURES),
        )
        module = torch.nn.Sequential(*layers).eval()
    finally:  # seeding must not change the random stream of the process that builds it
        torch.random.set_rng_state(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(module).save(str(path))  # type: ignore[no-untyped-call]


def sample_rows(count: int, *, seed: int = 1) -> list[list[float]]:
    """``count`` input rows of ``FEATURES`` floats in [-1, 1), the same for the same seed."""
    rows = torch.rand(count, FEATURES, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return [[float(v) for v in row] for row in rows]


def reference_output(path: Path, rows: list[list[float]]) -> list[float]:
    """What the model at ``path`` answers for ``rows``, run in this process, flattened."""
    module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    with torch.inference_mode():
        out = module(torch.tensor(rows, dtype=torch.float32))
    return [float(v) for row in out for v in row]


# The limit: batched forward passes in a loop -----------------------------------------------------


def _loop(step: Callable[[], Any], seconds: float, batch: int) -> dict[str, Any]:
    """Calls of ``step`` that fit in ``seconds`` (after two untimed ones), as items/s."""
    step()
    step()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        step()
        calls += 1
    return {"calls": calls, "seconds": elapsed, "items_per_s": calls * batch / elapsed}


def _bytelm() -> Any:
    from protoserve.server.models.builtin import ByteLMModel

    model = ByteLMModel()
    model.load()
    return model


def embed(batch: int, seconds: float, text: str) -> dict[str, Any]:
    """bytelm's ``embed`` on ``batch`` copies of ``text``: texts per second."""
    model = _bytelm()
    return _loop(lambda: model.embed([text] * batch), seconds, batch)


def predict(batch: int, seconds: float, model_file: str) -> dict[str, Any]:
    """The TorchScript MLP on a ``[batch, FEATURES]`` float32 input: rows per second."""
    module = torch.jit.load(model_file, map_location="cpu")  # type: ignore[no-untyped-call]
    module.eval()
    x = torch.randn(batch, FEATURES, generator=torch.Generator().manual_seed(0))

    def step() -> None:
        with torch.inference_mode():
            module(x)

    return _loop(step, seconds, batch)


def plain_decode(batch: int, tokens: int, prompts: list[str], temperature: float = 0.8,
                 first_seed: int = 1000, repeats: int = 3, device: str = "cpu",
                 dtype: str = "float32") -> dict[str, Any]:  # fmt: skip
    """The generation limit: ``batch`` sequences of bytelm (the server's weights) decoded
    by the model's own ``forward`` on a ``[batch, 1]`` input over one batched ``KVCache``,
    ``tokens`` tokens each, as tokens/s of the steps and of it all (with the prefill).

    Every linear layer is one ``F.linear`` over the batch and attention one
    ``scaled_dot_product_attention`` over ``[batch, n_head, length, head_dim]``: nothing is
    row by row and nothing is checked against a lone run. The cache holds one length for
    every row, so each prompt is cut (from its start) or repeated (in front) to the mean
    prompt length and the batch prefills as one ``[batch, length]`` pass. Sampled as the
    server samples: each row's own seeded generator and one ``sample_next`` per row per step
    (top-k 0, top-p 1); an end of text is fed back like any token, so every row steps
    ``tokens - 1`` times after its first token. The run of median decode time of
    ``repeats`` (after an untimed one); ``sample_seconds``: the part of its steps spent
    sampling. ``device`` and ``dtype`` (a torch dtype's name) place the model, as the
    server's ``--device`` and ``--dtype`` do (the GPU bench, bench/gpu.py)."""
    from protoserve.server.models import bytelm

    model = bytelm.load_pretrained().to(device=device, dtype=getattr(torch, dtype))
    config = model.config
    ids = [bytelm.encode(prompts[i % len(prompts)]) or [config.eot_id] for i in range(batch)]
    length = max(1, round(statistics.mean(len(row) for row in ids)))
    rows = [(row * (length // len(row) + 1))[-length:] for row in ids]
    if length + tokens > config.context_length:
        raise ValueError(f"{length} prompt + {tokens} new tokens exceed the model's context")

    def sample(logits: torch.Tensor, generators: list[torch.Generator]) -> list[int]:
        return [bytelm.sample_next(logits[i, -1], temperature=temperature, top_k=0, top_p=1.0,
                                   generator=g) for i, g in enumerate(generators)]  # fmt: skip

    def run() -> tuple[float, float, float]:
        generators = [torch.Generator().manual_seed(first_seed + i) for i in range(batch)]
        with torch.inference_mode():
            started = time.perf_counter()
            cache = bytelm.KVCache(config, batch, capacity=length + tokens, device=device,
                                   dtype=getattr(torch, dtype))  # fmt: skip
            logits, _ = model(torch.tensor(rows, dtype=torch.long, device=device), cache=cache)
            next_ids = sample(logits.cpu(), generators)
            prefilled = time.perf_counter()
            sampling = 0.0
            for _ in range(tokens - 1):
                step = torch.tensor(next_ids, dtype=torch.long, device=device).view(batch, 1)
                logits, _ = model(step, cache=cache)
                before = time.perf_counter()
                # One copy of the step's logits to the host, as the server's decoder makes.
                next_ids = sample(logits.float().cpu(), generators)
                sampling += time.perf_counter() - before
        return prefilled - started, time.perf_counter() - prefilled, sampling

    run()  # untimed: the first pass pays one-off costs
    # The median of ``repeats`` runs by decode time: one run is a fraction of a second.
    prefill_s, decode_s, sample_s = sorted((run() for _ in range(repeats)), key=lambda r: r[1])[
        repeats // 2
    ]
    stepped, produced = batch * (tokens - 1), batch * tokens
    return {"tokens": produced, "prompt_tokens": length, "prefill_seconds": prefill_s,
            "decode_seconds": decode_s, "sample_seconds": sample_s,
            "decode_tokens_per_s": stepped / decode_s if decode_s else float("nan"),
            "tokens_per_s": produced / (prefill_s + decode_s)}  # fmt: skip


def decode(batch: int, tokens: int, prompts: list[str], temperature: float = 0.8,
           first_seed: int = 1000) -> dict[str, Any]:  # fmt: skip
    """bytelm's batch decoder (``BatchedDecoding``, the server's; on a path where its check
    fails it steps one sequence at a time): prefill ``batch`` prompts, then ``tokens`` steps
    of all at once (as requests of ``max_new_tokens=tokens``): tokens/s of the steps, and of
    it all; ``decoding``: the decoder's mode."""
    from protoserve.server.runtime.model import GenerationParams

    decoder = _bytelm().batch_decoder(batch)

    def run() -> tuple[int, float, float]:
        started, states, produced = time.perf_counter(), [], 0
        for i in range(batch):
            params = GenerationParams(max_new_tokens=tokens, temperature=temperature, top_k=0,
                                      top_p=1.0, seed=first_seed + i)  # fmt: skip
            state, token = decoder.prefill(prompts[i % len(prompts)], params)
            states.append(state)
            produced += token is not None
        prefilled = time.perf_counter()
        live = list(states)
        for _ in range(tokens - 1):
            if not live:
                break
            out = decoder.step(live)
            produced += sum(t is not None for t in out)
            for state, token in zip(live, out, strict=True):
                if token is None:
                    decoder.release(state)
            live = [s for s, t in zip(live, out, strict=True) if t is not None]
        for state in live:
            decoder.release(state)
        return produced, prefilled - started, time.perf_counter() - prefilled

    run()  # untimed: the first pass pays one-off costs
    produced, prefill_s, decode_s = run()
    stepped = produced - batch  # every sequence's first token came from its prefill
    return {"tokens": produced, "prefill_seconds": prefill_s, "decode_seconds": decode_s,
            "decode_tokens_per_s": stepped / decode_s if decode_s else float("nan"),
            "tokens_per_s": produced / (prefill_s + decode_s),
            "decoding": getattr(getattr(decoder, "decoding", None), "name", "?")}  # fmt: skip


# Batched decoding on this process's dispatch path ------------------------------------------------


def _rounding(model: Any, steps: int, rows: int) -> dict[str, float]:
    """Largest |batched - alone| over ``steps`` steps of ``rows`` sequences."""
    from protoserve.server.models import bytelm

    rng = random.Random(1)
    dec = bytelm.BatchedDecoding(model, rows)
    ctx = model.config.context_length
    worst = worst_rel = 0.0
    caches = dec._caches[:rows]
    with torch.inference_mode():
        for cache in caches:
            model(torch.randint(0, 256, (1, rng.randint(1, ctx - steps - 1))), cache=cache)
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
        handle, first = dec.add(prompt, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed)  # fmt: skip
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
        alone = list(bytelm.generate_tokens(model, prompt, max_new_tokens=tokens,
                                            temperature=temperature, top_k=top_k, top_p=top_p,
                                            seed=seed))  # fmt: skip
        if alone != batched:
            pairs = enumerate(zip(alone, batched, strict=False))
            differ.append(next((j for j, (a, b) in pairs if a != b), min(len(alone), len(batched))))
    return {"sequences": sequences, "tokens": tokens, "differ": len(differ), "first_at": differ}


def _speed(model: Any, repeats: int) -> dict[str, Any]:
    """Median step time of 1, 8, 32 sequences in each mode, as tokens per second."""
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


def decoding(steps: int, texts: int, text_tokens: int, repeats: int) -> dict[str, Any]:
    from protoserve.server.models import bytelm
    from protoserve.server.runtime import dispatch

    model = bytelm.load_pretrained()
    exact = bytelm.BatchedDecoding(model, 32, exact=True)
    probe = {"batched": bytelm.BatchedDecoding(model, 32).probe_difference,
             "exact_passes": exact.batched, "exact": exact.probe_difference}  # fmt: skip
    return {"path": dispatch.describe_current(), "aten": torch.backends.cpu.get_cpu_capability(),
            "probe": probe, "rounding": _rounding(model, steps, 32),
            "text": _text(model, texts, text_tokens), "speed": _speed(model, repeats)}  # fmt: skip


def main(argv: list[str]) -> int:
    what, kwargs = argv
    measure = {"embed": embed, "predict": predict, "plain_decode": plain_decode, "decode": decode,
               "decoding": decoding}[what]  # fmt: skip
    torch.manual_seed(0)
    print(json.dumps({**measure(**json.loads(kwargs)), "torch_threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
