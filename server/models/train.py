"""Trains the built-in :class:`~protoserve.server.models.bytelm.ByteLM`.

The corpus is the running Python's own standard library source (``*.py``
under ``sysconfig.get_paths()["stdlib"]``), which is always available offline
and is the kind of text the demo server is asked to continue. Usage::

    python -m protoserve.server.models.train [--out DIR] [--minutes M]
        [--steps N] [--threads T] [--seed S]

Training stops at ``--minutes`` of wall clock or ``--steps`` optimiser steps,
whichever comes first, then measures validation loss on held-out files and
writes ``bytelm.safetensors`` (fp16) and ``bytelm.json`` into ``--out``
(default: the package's ``weights/`` folder).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import shlex
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from protoserve.server.models.bytelm import (
    EOT_ID,
    ByteLM,
    ByteLMConfig,
    default_weights_dir,
    save_pretrained,
)

#: Directory names never used for training (tests are huge and repetitive,
#: idlelib is GUI code, site-packages is third-party code).
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages"})
#: One file in this many goes to validation (about 2%).
VAL_EVERY = 50
#: Seconds between progress lines.
LOG_EVERY_S = 30.0


@dataclass(frozen=True)
class Corpus:
    """Token streams for training and validation.

    Attributes:
        train: 1-D int64 tensor: train files' bytes separated by EOT.
        val: 1-D int64 tensor: validation files' bytes separated by EOT.
        train_files: Number of training files.
        val_files: Number of validation files.
        root: Standard library directory the files came from.
    """

    train: torch.Tensor
    val: torch.Tensor
    train_files: int
    val_files: int
    root: str


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """Returns the sorted ``.py`` files of the standard library.

    Args:
        root: Directory to scan; defaults to the running interpreter's stdlib.

    Returns:
        Paths sorted by their path relative to ``root`` (deterministic for a
        given Python installation), skipping :data:`SKIP_DIRS`.
    """
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(base):
        # Prune in place so os.walk does not descend into skipped folders.
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(base).as_posix())


def _join(chunks: Sequence[bytes]) -> torch.Tensor:
    """Concatenates byte chunks into one id stream with EOT between them."""
    total = sum(len(c) for c in chunks) + len(chunks)
    out = torch.empty(total, dtype=torch.int64)
    pos = 0
    for chunk in chunks:
        n = len(chunk)
        if n:
            out[pos : pos + n] = torch.frombuffer(bytearray(chunk), dtype=torch.uint8).to(
                torch.int64
            )
        out[pos + n] = EOT_ID
        pos += n + 1
    return out


def load_corpus(root: str | Path | None = None) -> Corpus:
    """Reads the standard library and splits it into train/validation.

    Every :data:`VAL_EVERY`-th file (in sorted order) is held out, so the
    split is deterministic and spread across the whole library.
    """
    files = stdlib_files(root)
    train_chunks: list[bytes] = []
    val_chunks: list[bytes] = []
    for i, path in enumerate(files):
        try:
            data = path.read_bytes()
        except OSError:
            continue  # unreadable file: skip rather than fail the whole run
        (val_chunks if i % VAL_EVERY == VAL_EVERY // 2 else train_chunks).append(data)
    return Corpus(
        train=_join(train_chunks),
        val=_join(val_chunks),
        train_files=len(train_chunks),
        val_files=len(val_chunks),
        root=str(root if root is not None else sysconfig.get_paths()["stdlib"]),
    )


def get_batch(
    data: torch.Tensor, batch_size: int, context: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``batch_size`` random windows: inputs and next-token targets."""
    starts = torch.randint(0, data.numel() - context - 1, (batch_size,), generator=generator)
    offsets = torch.arange(context + 1)
    windows = data[starts[:, None] + offsets[None, :]]
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def evaluate(model: ByteLM, data: torch.Tensor, context: int, batch_size: int = 32) -> float:
    """Returns mean cross-entropy (nats per token) over ``data``.

    ``data`` is cut into consecutive non-overlapping windows of ``context``
    tokens (the tail that does not fill a window is dropped), so every
    predicted token is scored exactly once.
    """
    was_training = model.training
    model.eval()
    n_windows = (data.numel() - 1) // context
    total, count = 0.0, 0
    for first in range(0, n_windows, batch_size):
        idx = torch.arange(first, min(first + batch_size, n_windows))
        starts = idx * context
        windows = data[starts[:, None] + torch.arange(context + 1)[None, :]]
        logits, _ = model(windows[:, :-1])
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += windows[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)


def lr_at(progress: float, step: int, *, max_lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup for ``warmup`` steps, then cosine decay to ``min_ratio``.

    Args:
        progress: Fraction of the run done, in [0, 1]. It is the larger of the
            step fraction and the wall-clock fraction, so a time-limited run
            still completes its decay.
        step: Current step (0-based), for warmup.
        max_lr: Peak learning rate.
        warmup: Warmup steps.
        min_ratio: Final learning rate as a fraction of ``max_lr``.
    """
    if step < warmup:
        return max_lr * (step + 1) / warmup
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return max_lr * (min_ratio + (1.0 - min_ratio) * cosine)


def _param_groups(model: ByteLM, weight_decay: float) -> list[dict[str, object]]:
    """Splits parameters: decay matrices, not LayerNorm weights/biases."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    p = argparse.ArgumentParser(
        prog="python -m protoserve.server.models.train",
        description="Train the built-in ByteLM on the Python standard library.",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default: package weights/)"
    )
    p.add_argument("--minutes", type=float, default=30.0, help="wall-clock training budget")
    p.add_argument("--steps", type=int, default=1_000_000, help="maximum optimiser steps")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast for the forward pass (about 1.7x faster on AVX-512 CPUs; "
        "master weights and optimizer state stay float32)",
    )
    return p.parse_args(argv)


@dataclass(frozen=True)
class Trained:
    """What a training run did: optimiser steps, tokens seen, the smoothed training
    loss (None before the first step) and its wall-clock seconds."""

    steps: int
    tokens_seen: int
    loss_ema: float | None
    seconds: float


def train(model: ByteLM, corpus: Corpus, args: argparse.Namespace) -> Trained:
    """Train ``model`` until ``args.minutes`` of wall clock or ``args.steps`` steps,
    printing a progress line every ``LOG_EVERY_S`` seconds."""
    context = model.config.context_length
    model.train()
    optimizer = torch.optim.AdamW(
        _param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8
    )
    data_gen = torch.Generator().manual_seed(args.seed)
    budget_s = args.minutes * 60.0
    tokens_per_step = args.batch_size * context

    start = time.monotonic()
    last_log = start
    step = 0
    loss_ema: float | None = None
    log_tokens = 0
    while step < args.steps:
        elapsed = time.monotonic() - start
        if elapsed >= budget_s:
            break
        progress = max(step / args.steps, elapsed / budget_s)
        lr = lr_at(progress, step, max_lr=args.lr, warmup=args.warmup, min_ratio=0.1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(corpus.train, args.batch_size, context, data_gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits, _ = model(x)
        # The loss is computed in float32 for an accurate log-softmax.
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step += 1
        log_tokens += tokens_per_step
        value = loss.detach().item()
        # Smoothed loss: single-batch losses are noisy at batch size 16.
        loss_ema = value if loss_ema is None else 0.95 * loss_ema + 0.05 * value
        now = time.monotonic()
        if now - last_log >= LOG_EVERY_S:
            print(
                f"step {step:6d} | {log_tokens / (now - last_log):7.0f} tok/s | "
                f"train loss {loss_ema:.4f} ({loss_ema / math.log(2):.3f} bits/byte) | "
                f"lr {lr:.2e} | {now - start:6.0f}s",
                flush=True,
            )
            last_log, log_tokens = now, 0
    return Trained(step, step * tokens_per_step, loss_ema, time.monotonic() - start)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs training; returns the process exit status."""
    args = parse_args(argv)
    command = "python -m protoserve.server.models.train " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out_dir = Path(args.out) if args.out is not None else default_weights_dir()

    t0 = time.monotonic()
    corpus = load_corpus()
    print(
        f"corpus: {corpus.train_files} train files ({corpus.train.numel():,} tokens), "
        f"{corpus.val_files} val files ({corpus.val.numel():,} tokens) from {corpus.root} "
        f"[{time.monotonic() - t0:.1f}s]",
        flush=True,
    )

    config = ByteLMConfig(
        n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, context_length=args.context
    )
    model = ByteLM(config)
    print(
        f"model: {config.to_dict()} params={model.num_parameters():,} "
        f"threads={torch.get_num_threads()}",
        flush=True,
    )
    trained = train(model, corpus, args)
    print(
        f"training done: {trained.steps} steps, {trained.tokens_seen:,} tokens in "
        f"{trained.seconds:.0f}s; evaluating...",
        flush=True,
    )
    val_loss = evaluate(model, corpus.val, config.context_length)
    print(
        f"validation: loss {val_loss:.4f} nats/byte = {val_loss / math.log(2):.4f} bits/byte",
        flush=True,
    )
    metadata = _metadata(args, command, model, corpus, trained, val_loss)
    weights_path, json_path = save_pretrained(model, out_dir, metadata=metadata)
    print(
        f"saved {weights_path} ({weights_path.stat().st_size:,} bytes) and {json_path}", flush=True
    )
    return 0


def _metadata(
    args: argparse.Namespace,
    command: str,
    model: ByteLM,
    corpus: Corpus,
    trained: Trained,
    val_loss: float,
) -> dict[str, object]:
    """What ``bytelm.json`` records about the run, beside the model's configuration."""
    return {
        "steps": trained.steps,
        "tokens_seen": trained.tokens_seen,
        "train_seconds": round(trained.seconds, 1),
        "tokens_per_second": round(trained.tokens_seen / max(trained.seconds, 1e-9), 1),
        "train_loss_ema": None if trained.loss_ema is None else round(trained.loss_ema, 4),
        "val_loss_nats": round(val_loss, 4),
        "val_bits_per_byte": round(val_loss / math.log(2), 4),
        "val_tokens": int(corpus.val.numel()),
        "train_tokens": int(corpus.train.numel()),
        "train_files": corpus.train_files,
        "val_files": corpus.val_files,
        "corpus": "python stdlib *.py (excluding test/tests/idlelib/site-packages)",
        "corpus_python_version": platform.python_version(),
        "n_params": model.num_parameters(),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "grad_clip": args.grad_clip,
        "bf16_autocast": args.bf16,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command,
    }


if __name__ == "__main__":
    raise SystemExit(main())
