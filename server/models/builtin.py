"""The built-in model: a small byte-level transformer trained on Python's own source.

It ships inside the package (``weights/``), so a server starts with a real
model and nothing downloaded. Trained by ``python -m protoserve.server.models.train``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

import protoserve.server.models.bytelm as bytelm
from protoserve.server.runtime.model import (
    BatchDecoder,
    Decoding,
    GenerationParams,
    Model,
    Token,
    TokenChoice,
)

__all__ = ["EMBED_TOKENS_PER_PASS", "ByteLMModel"]

#: Most (padded) tokens in one forward pass of ``embed``.
EMBED_TOKENS_PER_PASS = 1024


class ByteLMModel(Model):
    """Text generation (token by token, KV cache) and embeddings (mean-pooled hidden states)."""

    follows_device = True  # its weights, caches and tensors go to self.device

    name = "bytelm"
    version = "1"
    description = (
        "A small byte-level decoder-only transformer trained on the Python standard "
        "library's source. Tokens are bytes (ids 0-255) plus end of text (256)."
    )
    default_max_new_tokens = 64
    max_new_tokens_limit = 2048
    max_input_tokens = 8192
    max_batch_texts = 256
    supports_logprobs = True

    def __init__(self, weights: str | None = None) -> None:
        self._weights = weights
        self._model: bytelm.ByteLM | None = None
        self.metadata: dict[str, Any] = {}

    def load(self) -> None:
        # Inference threads: the worker thread owns the model; intra-op threads
        # are torch's default (one per core).
        model = bytelm.load_pretrained(self._weights)
        # The runtime has set the device and dtype (docs/devices.md); a model loaded
        # without one stays on the CPU in float32. The KV caches, the batched
        # decoder's store and every input follow the weights' device and dtype.
        device = self.device if isinstance(self.device, torch.device) else None
        dtype = self.dtype if isinstance(self.dtype, torch.dtype) else None
        self._model = model.to(device=device, dtype=dtype)
        self.metadata = bytelm.read_metadata(self._weights)

    @property
    def model(self) -> bytelm.ByteLM:
        if self._model is None:
            raise RuntimeError("the model is not loaded")
        return self._model

    def count_tokens(self, text: str) -> int:
        return len(bytelm.encode(text))

    def generate(self, text: str, params: GenerationParams) -> Iterator[Token]:
        for token_id, scored in bytelm.generate_scored(
            self.model,
            bytelm.encode(text),
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            seed=params.seed,
            logprobs=params.logprobs,
        ):
            yield _token(token_id, scored)

    def batch_decoder(self, max_sequences: int) -> BatchDecoder:
        # Continuous batching with the tokens generate() gives each request: to float
        # rounding, or bit for bit when the server asks for batch invariance.
        return _ByteLMDecoder(self.model, max_sequences, exact=self.batch_invariant)

    def embed(self, texts: list[str]) -> torch.Tensor:
        # Windows of the model's context: a longer text is embedded from its end.
        # An empty text is embedded as the end-of-text token alone.
        config = self.model.config
        batch = [bytelm.encode(t)[-config.context_length :] or [config.eot_id] for t in texts]
        # Texts of similar length go through the model together, at most
        # EMBED_TOKENS_PER_PASS (padded) tokens at a time: padding is wasted
        # work, and on a CPU a pass much larger than the caches is slower per
        # token (measured: 64 texts of ~80 bytes, 150 texts/s in one pass,
        # 199 in passes of 1024 tokens). Rows never affect each other.
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))
        # Gathered on the model's device; the runtime copies them to the CPU at once.
        device = next(self.model.parameters()).device
        vectors = torch.empty(len(batch), config.d_model, device=device)
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end + 1 - start) * len(batch[order[end]]) <= (
                EMBED_TOKENS_PER_PASS
            ):
                end += 1
            rows = order[start:end]
            vectors[rows] = bytelm.embed(self.model, [batch[i] for i in rows], on_device=True)
            start = end
        return vectors


class _ByteLMDecoder(BatchDecoder):
    """Continuous batching of ByteLM generations over :class:`bytelm.BatchedDecoding`.

    A sequence's state is its ``BatchedDecoding`` handle. Each sequence gets the
    tokens :meth:`ByteLMModel.generate` would give it: to float rounding, or, with
    ``exact``, bit for bit.
    """

    def __init__(self, model: bytelm.ByteLM, max_sequences: int, *, exact: bool) -> None:
        self.max_sequences = max_sequences
        self._batch = bytelm.BatchedDecoding(model, max_sequences, exact=exact)
        difference = self._batch.probe_difference
        dtype = _weights_dtype(model)
        if not self._batch.batched:
            self.decoding = Decoding.SEQUENTIAL
            self.decoding_note = (
                f"a batched step is not bit-exact on this machine's kernels (a row off by "
                f"{difference:.1e} of its largest logit)"
                if exact
                else f"a batched step is off by {difference:.1e} of the largest logit, more "
                f"than {dtype} rounding allows ({self._batch.tolerance:.0e}): the model's "
                "forward is not what the batched step computes (overridden?), or rounds "
                f"coarser than {dtype}"
            )
        else:
            self.decoding = Decoding.BATCHED_EXACT if exact else Decoding.BATCHED

    def prefill(self, text: str, params: GenerationParams) -> tuple[Any, Token | None]:
        handle, token_id = self._batch.add(
            bytelm.encode(text),
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            seed=params.seed,
            logprobs=params.logprobs,
        )
        return handle, self._token(handle, token_id)

    def step(self, states: Sequence[Any]) -> list[Token | None]:
        ids = self._batch.step(states)
        return [self._token(state, i) for state, i in zip(states, ids, strict=True)]

    def release(self, state: Any) -> None:
        self._batch.remove(state)

    def _token(self, handle: int, token_id: int | None) -> Token | None:
        """The token a sequence just got, with its log probabilities when it asked;
        None stays None (end of text)."""
        if token_id is None:
            return None
        return _token(token_id, self._batch.logprobs(handle))


def _weights_dtype(model: bytelm.ByteLM) -> str:
    """The dtype of a model's weights, by name (``float32``)."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _token(token_id: int, scored: bytelm.TokenLogprobs | None) -> Token:
    """The token for a byte id, with its log probabilities when there are some."""
    if scored is None:
        return Token(token_id, bytes((token_id,)))
    top = tuple(TokenChoice(i, _data(i), logprob) for i, logprob in scored.top)
    return Token(token_id, bytes((token_id,)), scored.logprob, top)


def _data(token_id: int) -> bytes:
    """The bytes of an id: a byte, or none for end of text (an alternative, never chosen)."""
    return bytes((token_id,)) if token_id < 256 else b""
