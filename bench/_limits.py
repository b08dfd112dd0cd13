"""The model's own speed, with no server: batched forward passes in a loop in one process.

The limit the suite compares the server with (``bench/suite.py``, "Distance to the
limit"). It runs as a process of its own, with the Python that runs the server and the
same torch threads, so that the two figures differ only by what serving adds::

    python bench/_limits.py embed --batch 64 --seconds 5 --text "def f(x):"
    python bench/_limits.py predict --batch 64 --seconds 5 --model-file mlp.pt --features 64
    python bench/_limits.py decode --batch 64 --tokens 64 --prompts-json prompts.json

Each prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _loop(step: Callable[[], None], seconds: float) -> tuple[int, float]:
    """Calls of ``step`` that fit in ``seconds`` (after two untimed ones), and the time taken."""
    step()
    step()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        step()
        calls += 1
    return calls, elapsed


def embed(batch: int, seconds: float, text: str) -> dict[str, Any]:
    """bytelm's ``embed`` on ``batch`` copies of ``text``: texts per second."""
    from protoserve.server.models.builtin import ByteLMModel

    model = ByteLMModel()
    model.load()
    texts = [text] * batch
    calls, elapsed = _loop(lambda: model.embed(texts), seconds)
    return {"calls": calls, "seconds": elapsed, "items_per_s": calls * batch / elapsed}


def predict(batch: int, seconds: float, model_file: Path, features: int) -> dict[str, Any]:
    """A TorchScript model on a ``[batch, features]`` float32 input: rows per second."""
    module = torch.jit.load(str(model_file), map_location="cpu")  # type: ignore[no-untyped-call]
    module.eval()
    x = torch.randn(batch, features, generator=torch.Generator().manual_seed(0))

    def step() -> None:
        with torch.inference_mode():
            module(x)

    calls, elapsed = _loop(step, seconds)
    return {"calls": calls, "seconds": elapsed, "items_per_s": calls * batch / elapsed}


def decode(
    batch: int, tokens: int, prompts: list[str], temperature: float, first_seed: int
) -> dict[str, Any]:
    """bytelm's batch decoder: prefill ``batch`` prompts, then ``tokens`` steps of all at once.

    Reports decode tokens per second (the steps alone) and end-to-end tokens per second
    (prefills and steps), each sequence ``tokens`` long as a server request with
    ``max_new_tokens=tokens`` would be (a sequence that ends early stops counting).
    """
    from protoserve.server.models.builtin import ByteLMModel
    from protoserve.server.runtime.model import GenerationParams

    model = ByteLMModel()
    model.load()
    decoder = model.batch_decoder(batch)

    def run() -> tuple[int, float, float]:
        started = time.perf_counter()
        states, produced = [], 0
        for i in range(batch):
            params = GenerationParams(
                max_new_tokens=tokens,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                seed=first_seed + i,
            )
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
            ended = [s for s, t in zip(live, out, strict=True) if t is None]
            for state in ended:
                decoder.release(state)
            live = [s for s, t in zip(live, out, strict=True) if t is not None]
        for state in live:
            decoder.release(state)
        return produced, prefilled - started, time.perf_counter() - prefilled

    run()  # untimed: the first pass pays one-off costs
    produced, prefill_s, decode_s = run()
    # Tokens of the steps alone: every sequence's first token came from its prefill.
    stepped = produced - batch
    return {
        "tokens": produced,
        "prefill_seconds": prefill_s,
        "decode_seconds": decode_s,
        "decode_tokens_per_s": stepped / decode_s if decode_s else float("nan"),
        "tokens_per_s": produced / (prefill_s + decode_s),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("embed", "predict", "decode"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--text", default="def f(x):\n    return x")
    parser.add_argument("--model-file", type=Path)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompts-json", type=Path)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--first-seed", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.what == "embed":
        out = embed(args.batch, args.seconds, args.text)
    elif args.what == "predict":
        if args.model_file is None:
            parser.error("predict needs --model-file")
        out = predict(args.batch, args.seconds, args.model_file, args.features)
    else:
        prompts = json.loads(args.prompts_json.read_text()) if args.prompts_json else ["def "]
        out = decode(args.batch, args.tokens, prompts, args.temperature, args.first_seed)
    out["torch_threads"] = torch.get_num_threads()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
