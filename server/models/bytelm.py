"""ByteLM: the server's built-in decoder-only byte-level transformer.

The model reads raw UTF-8 bytes (ids 0..255) plus one special id, ``eot_id``
(256), which separates documents during training and doubles as the
beginning-of-text token when a prompt is empty. It is deliberately small so
that it can be trained on a laptop-class CPU and shipped inside the package
(see :mod:`protoserve.server.models.train` and the ``weights/`` folder).

Public surface:

* :class:`ByteLMConfig` / :class:`ByteLM` -- the architecture (pre-LayerNorm
  GPT blocks, rotary position embeddings, tied input/output embeddings).
* :class:`KVCache` -- per-layer key/value storage for incremental decoding.
* :func:`sample_next` / :func:`generate_tokens` -- sampling and streaming
  generation, one decode step per ``next()``.
* :func:`token_logprobs` / :func:`generate_scored` -- a sampled token's log
  probability and the most likely alternatives, from the raw logits.
* :class:`BatchedDecoding` -- continuous batching: many sequences decoding
  together, one forward pass per step, each with the tokens
  :func:`generate_tokens` gives it alone: to float rounding, or exactly.
* :func:`embed` -- mean-pooled final hidden states for a batch of texts.
* :func:`load_pretrained` / :func:`save_pretrained` -- weights I/O.
* :func:`encode` / :func:`decode_bytes` -- text <-> ids.
"""

from __future__ import annotations

import heapq
import importlib.resources
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = [
    "CONFIG_NAME",
    "EOT_ID",
    "ROUNDING_TOLERANCE",
    "WEIGHTS_NAME",
    "BatchedDecoding",
    "ByteLM",
    "ByteLMConfig",
    "KVCache",
    "TokenLogprobs",
    "decode_bytes",
    "default_weights_dir",
    "embed",
    "encode",
    "generate_scored",
    "generate_tokens",
    "load_pretrained",
    "read_metadata",
    "rounding_difference",
    "rounding_tolerance",
    "sample_next",
    "save_pretrained",
    "token_logprobs",
]

#: Id of the end-of-text token (also used as beginning-of-text).
EOT_ID = 256
#: File names inside a weights directory.
WEIGHTS_NAME = "bytelm.safetensors"
CONFIG_NAME = "bytelm.json"


@dataclass(frozen=True)
class ByteLMConfig:
    """Hyper-parameters of a :class:`ByteLM`.

    Attributes:
        vocab_size: Number of token ids: 256 byte values plus the EOT id.
        eot_id: Id of the end-of-text token; must be ``< vocab_size``.
        n_layer: Number of transformer blocks.
        n_head: Number of attention heads; must divide ``d_model``.
        d_model: Width of the residual stream.
        context_length: Maximum number of positions the model attends over.
            Training uses windows of this length and :func:`generate_tokens`
            slides its cache to stay within it.
        rope_base: Base of the rotary position embedding frequencies.
    """

    vocab_size: int = 257
    eot_id: int = EOT_ID
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    context_length: int = 256
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_head != 0:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if (self.d_model // self.n_head) % 2 != 0:
            # RoPE rotates pairs of channels, so each head needs an even width.
            raise ValueError("head dimension (d_model // n_head) must be even for RoPE")
        if not 0 <= self.eot_id < self.vocab_size:
            raise ValueError(f"eot_id={self.eot_id} outside vocab_size={self.vocab_size}")
        if self.context_length < 2:
            raise ValueError("context_length must be at least 2")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_head

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ByteLMConfig:
        """Builds a config from a dict, ignoring unknown keys.

        Unknown keys are ignored so that newer files (with extra fields) still
        load in older code.
        """
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class KVCache:
    """Key/value cache for incremental decoding of a batch of ``B`` sequences.

    Storage is preallocated to ``capacity`` positions per layer (default: the
    model's ``context_length``) so that appending a token is an in-place copy
    rather than a re-allocation. All sequences in the batch share the same
    length: the cache holds positions ``0 .. length-1`` for every row.

    Attributes:
        keys: One ``[B, n_head, capacity, head_dim]`` tensor per layer.
        values: Same shape as ``keys``.
        length: Number of positions currently filled.
    """

    def __init__(
        self,
        config: ByteLMConfig,
        batch_size: int,
        *,
        capacity: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Allocates an empty cache.

        Args:
            config: Config of the model that will fill the cache.
            batch_size: Number of sequences ``B``.
            capacity: Maximum number of positions; defaults to
                ``config.context_length``.
            device: Device of the cache tensors.
            dtype: Dtype of the cache tensors (should match the model).
        """
        self.capacity = config.context_length if capacity is None else capacity
        self.batch_size = batch_size
        shape = (batch_size, config.n_head, self.capacity, config.head_dim)
        self.keys: list[Tensor] = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)
        ]
        self.values: list[Tensor] = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)
        ]
        self.length = 0

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Stores new keys/values for ``layer`` and returns all of them.

        The cache ``length`` is not advanced here, because every layer appends
        at the same offset; :meth:`advance` is called once per forward pass.

        Args:
            layer: Layer index.
            k: New keys, ``[B, n_head, T, head_dim]``.
            v: New values, same shape.

        Returns:
            Keys and values for positions ``0 .. length+T-1``.

        Raises:
            ValueError: If the cache would overflow its capacity.
        """
        t = k.shape[2]
        end = self.length + t
        if end > self.capacity:
            raise ValueError(f"KVCache overflow: {end} positions > capacity {self.capacity}")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, t: int) -> None:
        """Marks ``t`` more positions as filled (after all layers appended)."""
        self.length += t

    def reset(self) -> None:
        """Empties the cache without freeing its storage."""
        self.length = 0


def _rope_tables(
    positions: Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Returns ``(cos, sin)`` of shape ``[T, head_dim/2]`` for the positions."""
    inv_freq = 1.0 / (
        base
        ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates channel pairs of ``x`` ``[B, H, T, D]`` by the position angles.

    Uses the "half split" layout (first half / second half of the channels
    form the pairs), which is equivalent to interleaved pairs up to a fixed
    permutation of the learned projections.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class _Attention(nn.Module):
    """Multi-head causal self-attention with RoPE and an optional KV cache."""

    def __init__(self, config: ByteLMConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        layer: int,
        cache: KVCache | None,
        mask: Tensor | None,
    ) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q = q.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        q = _apply_rope(q, cos, sin)
        k = _apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        if mask is None:
            # No cache prefix and no padding: the fused causal path is fastest.
            # With a cache and a single query, attending to every cached key
            # is exactly causal, so no mask is needed either.
            causal = cache is None or (t > 1 and k.shape[2] == t)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out: Tensor = self.proj(y.transpose(1, 2).reshape(b, t, d))
        return out


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, config: ByteLMConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = _Attention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.fc = nn.Linear(config.d_model, 4 * config.d_model, bias=False)
        self.out = nn.Linear(4 * config.d_model, config.d_model, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        layer: int,
        cache: KVCache | None,
        mask: Tensor | None,
    ) -> Tensor:
        x = x + self.attn(self.ln1(x), cos, sin, layer, cache, mask)
        out: Tensor = x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))
        return out


class ByteLM(nn.Module):
    """Decoder-only byte-level transformer (GPT-style, RoPE, tied embeddings).

    Positions are encoded with rotary embeddings computed on the fly, so the
    only limit on positions is the one callers impose (``context_length``);
    :func:`generate_tokens` restarts positions at 0 when it slides its cache.
    """

    def __init__(self, config: ByteLMConfig) -> None:
        """Creates a randomly initialised model (GPT-2 style init)."""
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        blocks = [_Block(config) for _ in range(config.n_layer)]
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(config.d_model)
        self.apply(self._init_weights)
        # Scale residual output projections by depth so the residual stream's
        # variance does not grow with the number of layers (GPT-2 trick).
        for block in blocks:
            for proj in (block.attn.proj, block.out):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Returns the number of parameters (tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: Tensor,
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Runs the model on a batch of token ids.

        Args:
            idx: Token ids, ``LongTensor[B, T]``, values in ``[0, vocab_size)``.
            cache: Optional KV cache. When given, ``idx`` continues the
                sequences already in the cache (positions start at
                ``cache.length``), the new keys/values are appended, and
                ``cache.length`` advances by ``T``.
            attention_mask: Optional ``BoolTensor[B, T]``, True for real
                tokens and False for padding. Padded keys are never attended
                to. With a cache, every cached position is treated as real.
                Note that a query whose every visible key is padding (e.g. a
                row that is all padding) produces NaNs; callers must give
                each row at least one real first token.

        Returns:
            ``(logits, hidden)``: logits ``[B, T, vocab_size]`` and the final
            LayerNorm hidden states ``[B, T, d_model]``.
        """
        b, t = idx.shape
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + t, device=idx.device)
        x = self.wte(idx)
        cos, sin = _rope_tables(positions, self.config.head_dim, self.config.rope_base, x.dtype)

        mask: Tensor | None = None
        if attention_mask is not None:
            total = start + t
            # Query i (absolute position start+i) may see keys j <= start+i.
            key_pos = torch.arange(total, device=idx.device)
            causal = key_pos[None, :] <= positions[:, None]  # [T, total]
            keys_real = torch.ones(b, total, dtype=torch.bool, device=idx.device)
            keys_real[:, start:] = attention_mask.to(torch.bool)
            mask = causal[None, None, :, :] & keys_real[:, None, None, :]  # [B,1,T,total]
        elif cache is not None and t > 1 and start > 0:
            # Several new queries after a cached prefix: SDPA's is_causal
            # aligns the mask top-left, which is wrong here, so build it.
            key_pos = torch.arange(start + t, device=idx.device)
            mask = (key_pos[None, :] <= positions[:, None])[None, None]

        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, i, cache, mask)
        if cache is not None:
            cache.advance(t)
        hidden = self.ln_f(x)
        # Tied embeddings: the output projection reuses the input table.
        logits = F.linear(hidden, self.wte.weight)
        return logits, hidden


def sample_next(
    logits: Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator,
) -> int:
    """Samples one token id from a logits vector.

    Args:
        logits: ``Tensor[V]`` of unnormalised log-probabilities.
        temperature: ``0`` means greedy (argmax, generator untouched);
            otherwise logits are divided by it before the softmax.
        top_k: Keep only the ``top_k`` most likely ids; ``0`` means no limit.
        top_p: Keep the smallest set of most likely ids whose probability
            mass reaches ``top_p``; ``1.0`` means no limit. The most likely id
            is always kept, so ``0`` keeps only it: greedy, as OpenAI's API
            reads ``top_p: 0``, taken from the logits as temperature ``0`` is.
        generator: Source of randomness; the result is a deterministic
            function of ``logits``, the parameters and the generator state.

    Returns:
        The sampled token id.

    Raises:
        ValueError: On a negative temperature/top_k or top_p outside [0, 1].
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    logits = logits.detach().to(torch.float32).reshape(-1)
    if temperature == 0 or top_p == 0:
        # Greedy: the argmax of the logits themselves, not of rounded probabilities
        # (two logits that differ can round to one probability, a tie to break).
        return int(torch.argmax(logits).item())
    scaled = logits / temperature
    if 0 < top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Drop an id if the mass *before* it already reaches top_p; this keeps
        # the id that crosses the threshold and, for any top_p above 0, the first.
        drop_sorted = (cumulative - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator).item())


class TokenLogprobs(NamedTuple):
    """A sampled token's log probability and the most likely tokens at its position.

    Attributes:
        logprob: The token's ``log_softmax`` of the raw logits.
        top: ``(id, logprob)`` of the most likely ids, most likely first.
    """

    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(logits: Tensor, token: int, top: int) -> TokenLogprobs:
    """The log probabilities of ``token`` and of the ``top`` most likely ids.

    They are the model's own: ``log_softmax`` of the raw float32 logits, before
    temperature, top-k or top-p reshape them for sampling. Ids of equal log
    probability come lowest id first (a stable sort), so the order does not
    depend on the kernels of the machine.

    Args:
        logits: ``Tensor[V]``, the logits ``token`` was sampled from.
        token: The sampled id.
        top: How many alternatives, ``>= 0``.
    """
    logprobs = torch.log_softmax(logits.detach().to(torch.float32).reshape(-1), dim=-1)
    chosen = float(logprobs[token])
    if top <= 0:
        return TokenLogprobs(chosen, ())
    values, ids = torch.sort(logprobs, descending=True, stable=True)
    pairs = zip(ids[:top].tolist(), values[:top].tolist(), strict=True)
    return TokenLogprobs(chosen, tuple((int(i), float(v)) for i, v in pairs))


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


def _on_host(logits: Tensor) -> Tensor:
    """Logits as float32 on the CPU, where sampling and log probabilities run (with a
    CPU generator, so that a seed gives the same tokens on every device): one copy
    per step, none for float32 logits already there."""
    return logits.detach().to("cpu", torch.float32)


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device``: to a GPU from pinned memory, without waiting."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def generate_tokens(
    model: ByteLM,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
) -> Iterator[int]:
    """Streams newly generated token ids, one decode step per ``next()``.

    The first ``next()`` runs the prefill over the prompt and samples the
    first token; each later ``next()`` feeds the previous token through the
    KV cache and samples one more. The function is a plain synchronous
    generator: closing it early (``.close()``) is always safe and simply
    drops the cache. Each step runs under ``torch.inference_mode()``, which
    is not held while suspended, so successive ``next()`` calls may come
    from different threads (one at a time).

    Generation stops, without yielding it, when ``eot_id`` is sampled, and
    after ``max_new_tokens`` tokens. When the sequence reaches the model's
    ``context_length``, the cache is rebuilt from the last
    ``context_length // 2`` tokens (positions restart at 0), so output may be
    longer than the context. An empty prompt starts from ``eot_id`` as
    beginning-of-text; a prompt longer than the context keeps only its last
    ``context_length`` ids.

    Args:
        model: The model; it is not modified (run under inference mode).
        prompt_ids: Prompt token ids in ``[0, vocab_size)``.
        max_new_tokens: Maximum number of ids to yield; ``<= 0`` yields none.
        temperature: See :func:`sample_next`.
        top_k: See :func:`sample_next`.
        top_p: See :func:`sample_next`.
        seed: Seed of a generator local to this call; the same seed, prompt
            and parameters give the same tokens. The global RNG is not used.

    Yields:
        Each new token id as soon as it is sampled.

    Raises:
        ValueError: On an out-of-range prompt id or sampling parameter.
    """
    for token, _ in generate_scored(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    ):
        yield token


def generate_scored(
    model: ByteLM,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    logprobs: int | None = None,
) -> Iterator[tuple[int, TokenLogprobs | None]]:
    """:func:`generate_tokens`, each id with its log probabilities when asked.

    The other arguments are :func:`generate_tokens`'s, and so are the ids.

    Args:
        logprobs: None: none (and no ``log_softmax`` is computed); ``k >= 0``:
            :func:`token_logprobs` of each id, with ``k`` alternatives.

    Yields:
        ``(id, logprobs)``: each new token id as soon as it is sampled, and its
        :class:`TokenLogprobs` (None when not asked).
    """
    config = model.config
    history = _prompt_history(config, prompt_ids)
    if max_new_tokens <= 0:
        return
    keep = max(1, config.context_length // 2)
    device, dtype = _model_device_dtype(model)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    cache: KVCache | None = None
    token = config.eot_id
    for _ in range(max_new_tokens):
        # Inference mode is entered per step, never held across a yield:
        # it is thread-local state, and the caller's code (possibly on
        # another thread, e.g. an executor) runs while we are suspended.
        with torch.inference_mode():
            if cache is None:
                cache = KVCache(config, 1, device=device, dtype=dtype)
                ids = history
            else:
                ids, history = _next_ids(cache, history, token, keep)
            logits, _ = model(torch.tensor([ids], dtype=torch.long, device=device), cache=cache)
            last = _on_host(logits[0, -1])
            token = sample_next(
                last,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
            )
            if token == config.eot_id:
                return
            scored = None if logprobs is None else token_logprobs(last, token, logprobs)
        yield token, scored


def _prompt_history(config: ByteLMConfig, prompt_ids: list[int]) -> list[int]:
    """The ids a generation starts from: the prompt's last ``context_length``, or
    ``eot_id`` alone for an empty prompt. Raises ValueError for an id out of range."""
    for tok in prompt_ids:
        if not 0 <= tok < config.vocab_size:
            raise ValueError(f"prompt id {tok} outside [0, {config.vocab_size})")
    # The whole history is kept only as far back as a slide needs it.
    history = list(prompt_ids) if prompt_ids else [config.eot_id]
    return history[-config.context_length :]


def _next_ids(
    cache: KVCache, history: list[int], token: int, keep: int
) -> tuple[list[int], list[int]]:
    """The ids the step after ``token`` feeds the model, and the history kept: ``token``
    alone through the cache; or, once the cache is full, the recent ``keep`` ids again
    from an empty cache (positions restart at 0), so there is room to go on one at a time."""
    history.append(token)
    if cache.length < cache.capacity:
        return [token], history
    history = history[-keep:]
    cache.reset()
    return history, history


#: Element-wise CPU kernels run SIMD code over whole multiples of (at most) this
#: many elements and scalar code over the rest of each piece of work; see
#: :func:`_rowwise_gelu`.
_VECTOR_STEP = 64
#: Most rows :meth:`BatchedDecoding._probe_batched_step` tries at once.
_PROBE_ROWS = 64
#: How far a batched step's logits may be from a lone step's, relative to the row's
#: largest logit, in the default (not exact) mode. float32 rounds each product and
#: sum to 6e-8; a dot product of 1024 terms (bytelm's widest) can be off by at most
#: 1024 times that, 6e-5, of its terms' magnitudes, and is in practice far closer:
#: measured at most 2e-6 on every dispatch path of an AMD EPYC (bench/decoding.py,
#: docs/adr/0015-batch-invariance.md). A step that mixed up rows, or a model whose
#: ``forward`` the batched step does not reproduce, is off by far more than this.
ROUNDING_TOLERANCE = 1e-4
#: The same for a model in a 16-bit dtype, in units of its rounding (its ``eps``): each
#: activation is rounded to 8 (bfloat16) or 11 (float16) bits, so a batched row may be
#: a few units off where float32 is not; a mixed-up row is off by the whole logit.
_HALF_ROUNDING_UNITS = 8


def rounding_tolerance(dtype: torch.dtype) -> float:
    """How far a batched step may be from a lone step for a model in ``dtype``:
    :data:`ROUNDING_TOLERANCE` for float32, 8 units of rounding for 16-bit dtypes
    (6e-2 for bfloat16, 8e-3 for float16)."""
    return max(ROUNDING_TOLERANCE, _HALF_ROUNDING_UNITS * torch.finfo(dtype).eps)


def rounding_difference(alone: Tensor, batched: Tensor) -> float:
    """How far ``batched`` logits are from ``alone``: ``max |batched - alone| / max |alone|``.

    0.0 when they are equal bit for bit; ``inf`` where they disagree on a value
    that is not finite (a masked ``-inf`` logit against a computed one, a NaN).
    """
    if torch.equal(alone, batched):
        return 0.0
    alone, batched = alone.to(torch.float32), batched.to(torch.float32)
    diff = (alone - batched).abs().masked_fill(alone == batched, 0.0)
    worst = float(torch.nan_to_num(diff, nan=math.inf, posinf=math.inf).max())
    finite = alone[torch.isfinite(alone)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return worst / scale if scale > 0 else math.inf


def _gelu(x: Tensor) -> Tensor:
    """The model's GELU (tanh approximation), as one call over every row."""
    return F.gelu(x, approximate="tanh")


class _SlotCache(KVCache):
    """A batch-1 :class:`KVCache` whose storage is one row of a shared store.

    Its tensors are ``[1, n_head, capacity, head_dim]`` views of row ``row`` of
    the store's per-layer tensors, with the same shape and strides as a freshly
    allocated batch-1 cache, so the model fills and reads it exactly as it does
    the cache of :func:`generate_tokens`.

    Attributes:
        row: Index of the row (the slot) in the store.
    """

    def __init__(self, keys: list[Tensor], values: list[Tensor], row: int) -> None:
        # KVCache.__init__ is not called on purpose: the storage already exists.
        self.row = row
        self.capacity = keys[0].shape[2]
        self.batch_size = 1
        self.keys = [k[row : row + 1] for k in keys]
        self.values = [v[row : row + 1] for v in values]
        self.length = 0


class _Sequence:
    """State of one sequence in a :class:`BatchedDecoding`.

    ``history``, ``cache.length`` and ``token`` follow the bookkeeping of
    :func:`generate_tokens` exactly: ``token`` is the last sampled id, not yet
    in ``history`` or the cache. ``scored`` holds its log probabilities when
    ``logprobs`` asks for them (:func:`generate_scored`).
    """

    __slots__ = (
        "cache",
        "done",
        "generator",
        "history",
        "logprobs",
        "scored",
        "temperature",
        "token",
        "top_k",
        "top_p",
    )

    def __init__(
        self,
        cache: _SlotCache,
        history: list[int],
        generator: torch.Generator,
        *,
        temperature: float,
        top_k: int,
        top_p: float,
        logprobs: int | None,
    ) -> None:
        self.cache = cache
        self.history = history
        self.generator = generator
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.logprobs = logprobs
        self.token = -1
        self.scored: TokenLogprobs | None = None
        self.done = False


def _rowwise_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)`` for ``x`` ``[B, 1, in]``, as ``B`` one-row products.

    ``F.linear`` over ``B`` rows is one ``B``-row matrix product, and BLAS may
    round it differently from the one-row product that a lone sequence
    computes (it typically does, in the last bits). A batched matrix multiply
    with the weight broadcast over the batch is ``B`` one-row products with
    the same operand layout as ``F.linear`` on one row, so each row gets what
    the lone sequence gets, in a single call. (PyTorch computes very small
    products, under 400 multiply-adds, with a kernel of its own instead; the
    check in :class:`BatchedDecoding` then sends such tiny models row by row.)
    """
    return torch.bmm(x, weight.t().unsqueeze(0).expand(x.shape[0], -1, -1))


def _rowwise_gelu(x: Tensor) -> Tensor:
    """``F.gelu(x, approximate="tanh")`` for ``x`` ``[B, 1, w]``, row by row exact.

    The CPU kernel runs SIMD code over whole vectors and scalar code, which
    rounds ``tanh`` differently, over the last ``n % (2 * lanes)`` elements of
    each piece of work. A lone row is one piece, all SIMD when ``w`` is a
    multiple of the vector step; a large batch is cut into equal pieces, one
    per thread. With the row count padded to a multiple of the thread count,
    every piece is a whole number of rows, so again no element of a row
    falls in a scalar tail. For any other ``w`` the rows go one at a time.
    """
    b, _, width = x.shape
    if width % _VECTOR_STEP != 0:
        return torch.cat([F.gelu(row, approximate="tanh") for row in torch.split(x, 1)])
    pad = -b % torch.get_num_threads()
    if pad:
        x = torch.cat((x, x.new_zeros(pad, 1, width)))
    return F.gelu(x, approximate="tanh")[:b]


class BatchedDecoding:
    """Continuous batching: many sequences decode together, one forward pass per step.

    :meth:`add` starts a sequence: it runs the prompt alone through the model
    (the prefill) and samples the first token. :meth:`step` advances any
    subset of the live sequences by one token with a single forward pass,
    each sequence at its own position, and samples each with its own
    parameters and generator. :meth:`remove` ends a sequence and frees its
    slot for another. Sequences may join and leave between any two steps.

    Every sequence is decoded as :func:`generate_tokens` decodes it alone, for
    the same prompt, parameters and seed, whatever else is in the batch: the
    same prompt handling (an empty prompt starts from ``eot_id``; a long one
    keeps its last ``context_length`` ids), the same context slide (a sequence
    whose cache is full re-prefills, alone, from its last ``context_length //
    2`` ids), the same generator seeding and the same :func:`sample_next`
    calls. There is no ``max_new_tokens``: the caller stops stepping a
    sequence when it has enough tokens.

    How close a batched step's logits are to a lone step's depends on the mode
    (docs/adr/0015-batch-invariance.md):

    - **Batched** (the default): the linear layers are one matrix product over
      all the rows, the fastest way to run them. BLAS rounds a product of many
      rows differently from one of a single row, so each row's logits are the
      lone step's to float rounding (within :data:`ROUNDING_TOLERANCE`), and
      where two tokens are that close a sequence may take the other one.
    - **Exact** (``exact=True``; the server's ``--batch-invariant``): a batched
      step computes, for each row, the very floating-point operations the lone
      step computes, so every sequence gets exactly the tokens it gets alone.
      Row-wise operations (embedding, LayerNorm, RoPE, residual adds) do not
      depend on the other rows; the linear layers are batches of one-row matrix
      products (:func:`_rowwise_linear`); GELU keeps every row out of the
      kernel's scalar tail (:func:`_rowwise_gelu`). This is 7-25% slower at
      32 sequences, and it holds only where the kernels that torch and MKL pick
      for this CPU give a row of a batched product what they give a lone row
      (on an Intel Xeon with AVX-512, MKL's did not: issue #13).

    In both, attention is the same ``scaled_dot_product_attention`` call over
    the sequence's own cache that the lone sequence makes, one call per row.
    The construction tries a batched step against lone steps on the machine at
    hand (:attr:`batched`); where the mode's promise does not hold, each step
    runs the model once per sequence, exactly as it runs alone.

    Keys and values live in one preallocated store per layer,
    ``[max_sequences, n_head, context_length, head_dim]``; each live sequence
    owns one row (a slot) and its own length. Not thread-safe: one call at a
    time (from any thread); each call runs under ``torch.inference_mode()``.

    Attributes:
        model: The model; it is not modified.
        max_sequences: Most live sequences (added and not yet removed).
        exact: The mode: True when every sequence must get exactly the tokens
            it gets alone.
        batched: True when steps run as one batched forward pass; False when
            the construction-time check found the mode's promise broken here
            (this platform's kernels not row-exact, or the model's ``forward``
            overridden), so that steps run the model once per sequence.
        probe_difference: What that check measured: the largest
            :func:`rounding_difference` of a batched row from its lone step.
    """

    def __init__(self, model: ByteLM, max_sequences: int, *, exact: bool = False) -> None:
        """Allocates the key/value store and checks the batched step.

        Args:
            model: The model.
            max_sequences: Most sequences held at once.
            exact: Every sequence gets bit for bit the tokens it gets alone
                (see the class notes); False: to float rounding, faster.

        Raises:
            ValueError: If ``max_sequences < 1``.
        """
        if max_sequences < 1:
            raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
        config = model.config
        self.model = model
        self.max_sequences = max_sequences
        self.exact = exact
        self._config = config
        self._device, dtype = _model_device_dtype(model)
        ctx = config.context_length
        with torch.inference_mode():
            shape = (max_sequences, config.n_head, ctx, config.head_dim)
            self._keys = [
                torch.zeros(shape, device=self._device, dtype=dtype) for _ in range(config.n_layer)
            ]
            self._values = [
                torch.zeros(shape, device=self._device, dtype=dtype) for _ in range(config.n_layer)
            ]
            # One RoPE row per position, each computed as a lone decode step
            # at that position computes it.
            tables = [
                _rope_tables(
                    torch.arange(p, p + 1, device=self._device),
                    config.head_dim,
                    config.rope_base,
                    dtype,
                )
                for p in range(ctx)
            ]
            self._cos = torch.cat([cos for cos, _ in tables])
            self._sin = torch.cat([sin for _, sin in tables])
        self._caches = [_SlotCache(self._keys, self._values, row) for row in range(max_sequences)]
        # A heap of free slots: the lowest is used first.
        self._free = list(range(max_sequences))
        self._sequences: dict[int, _Sequence] = {}
        self._next_handle = 0
        #: How far a batched row may be from its lone step in the default mode.
        self.tolerance = rounding_tolerance(dtype)
        self.probe_difference = self._probe_batched_step()
        self.batched = (
            self.probe_difference == 0.0 if exact else self.probe_difference <= self.tolerance
        )

    @property
    def size(self) -> int:
        """Number of live sequences (added and not yet removed)."""
        return len(self._sequences)

    def add(
        self,
        prompt_ids: list[int],
        *,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int,
        logprobs: int | None = None,
    ) -> tuple[int, int | None]:
        """Starts a sequence: prefills its prompt alone and samples its first token.

        Args:
            prompt_ids: Prompt token ids in ``[0, vocab_size)``.
            temperature: See :func:`sample_next`.
            top_k: See :func:`sample_next`.
            top_p: See :func:`sample_next`.
            seed: Seed of the sequence's own generator, as in
                :func:`generate_tokens`.
            logprobs: None, or ``k >= 0``: each token's log probabilities,
                with ``k`` alternatives, as :func:`generate_scored` gives them;
                read them with :meth:`logprobs` after each token.

        Returns:
            ``(handle, token)``: the handle for :meth:`step` and
            :meth:`remove`, and the first token id, or None when ``eot_id``
            was sampled (the sequence has ended; it still holds its slot
            until removed).

        Raises:
            RuntimeError: If ``max_sequences`` sequences are live already.
            ValueError: On an out-of-range prompt id or sampling parameter;
                nothing is added then.
        """
        if not self._free:
            raise RuntimeError(
                f"BatchedDecoding is full: all {self.max_sequences} sequences are live; "
                "remove one before adding another"
            )
        config = self._config
        vocab = config.vocab_size
        for tok in prompt_ids:
            if not 0 <= tok < vocab:
                raise ValueError(f"prompt id {tok} outside [0, {vocab})")
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed)
        history = list(prompt_ids) if prompt_ids else [config.eot_id]
        if len(history) > config.context_length:
            history = history[-config.context_length :]
        slot = heapq.heappop(self._free)
        seq = _Sequence(
            self._caches[slot],
            history,
            generator,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            logprobs=logprobs,
        )
        try:
            with torch.inference_mode():
                token = self._prefill(seq)
        except BaseException:
            heapq.heappush(self._free, slot)
            raise
        handle = self._next_handle
        self._next_handle += 1
        self._sequences[handle] = seq
        return handle, token

    def step(self, handles: Sequence[int]) -> list[int | None]:
        """Samples one more token for each of ``handles``, in one forward pass.

        The pass feeds each sequence's last token at its own position. A
        sequence whose cache is full (``context_length`` positions) instead
        slides, like :func:`generate_tokens`: it re-prefills alone from its
        last ``context_length // 2`` ids.

        Args:
            handles: Any subset of the live sequences, in any order, each at
                most once. Sequences left out simply do not advance.

        Returns:
            Per handle, in the same order: the new token id, or None when
            ``eot_id`` was sampled. A sequence that has ended gives None
            again, without computing anything.

        Raises:
            KeyError: On an unknown (or removed) handle.
            ValueError: If a handle appears twice.
        """
        seqs = [self._sequence(h) for h in handles]
        if len(set(handles)) != len(seqs):
            raise ValueError("a sequence handle appears more than once in one step")
        ctx = self._config.context_length
        keep = max(1, ctx // 2)
        results: list[int | None] = [None] * len(seqs)
        rows: list[int] = []  # indices into seqs of the batched single-token rows
        with torch.inference_mode():
            for i, seq in enumerate(seqs):
                if seq.done:
                    continue
                seq.history.append(seq.token)
                if seq.cache.length >= ctx:
                    # Full context: re-prefill from the recent half, exactly as
                    # generate_tokens does (alone: it is a multi-token pass).
                    seq.history = seq.history[-keep:]
                    results[i] = self._prefill(seq)
                elif self.batched:
                    rows.append(i)
                else:
                    idx = torch.tensor([[seq.token]], dtype=torch.long, device=self._device)
                    logits, _ = self.model(idx, cache=seq.cache)
                    results[i] = self._sample(seq, _on_host(logits[0, -1]))
            if rows:
                # The whole batch's logits come to the CPU in one copy.
                logits = _on_host(
                    self._forward([seqs[i].token for i in rows], [seqs[i].cache for i in rows])
                )
                greedy = [j for j, i in enumerate(rows) if seqs[i].temperature == 0]
                if greedy:
                    # One argmax for all greedy rows: per row, the same first
                    # maximal index sample_next's argmax returns.
                    picks = logits[greedy].argmax(dim=-1).tolist()
                    for j, token in zip(greedy, picks, strict=True):
                        results[rows[j]] = self._accept(seqs[rows[j]], token, logits[j])
                for j, i in enumerate(rows):
                    if seqs[i].temperature != 0:
                        results[i] = self._sample(seqs[i], logits[j])
        return results

    def logprobs(self, handle: int) -> TokenLogprobs | None:
        """The log probabilities of the last token :meth:`add` or :meth:`step` gave
        ``handle``; None when the sequence did not ask for them (or has ended).

        Raises:
            KeyError: On an unknown (or removed) handle.
        """
        seq = self._sequence(handle)
        return None if seq.done else seq.scored

    def remove(self, handle: int) -> None:
        """Ends a sequence and frees its slot (whether or not it has ended).

        Raises:
            KeyError: On an unknown (or already removed) handle.
        """
        seq = self._sequence(handle)
        del self._sequences[handle]
        seq.cache.reset()
        heapq.heappush(self._free, seq.cache.row)

    def _sequence(self, handle: int) -> _Sequence:
        try:
            return self._sequences[handle]
        except KeyError:
            raise KeyError(f"unknown sequence handle {handle!r}") from None

    def _prefill(self, seq: _Sequence) -> int | None:
        """Refills ``seq``'s cache from its history alone and samples a token."""
        seq.cache.reset()
        idx = torch.tensor([seq.history], dtype=torch.long, device=self._device)
        logits, _ = self.model(idx, cache=seq.cache)
        return self._sample(seq, _on_host(logits[0, -1]))

    def _sample(self, seq: _Sequence, logits: Tensor) -> int | None:
        token = sample_next(
            logits,
            temperature=seq.temperature,
            top_k=seq.top_k,
            top_p=seq.top_p,
            generator=seq.generator,
        )
        return self._accept(seq, token, logits)

    def _accept(self, seq: _Sequence, token: int, logits: Tensor) -> int | None:
        """Records ``token``, sampled from ``logits``; None when it ends the text."""
        if token == self._config.eot_id:
            seq.done = True
            return None
        seq.token = token
        if seq.logprobs is not None:
            seq.scored = token_logprobs(logits, token, seq.logprobs)
        return token

    def _forward(self, tokens: list[int], caches: list[_SlotCache]) -> Tensor:
        """One decode step of several sequences as one batch; returns logits ``[B, V]``.

        Row ``i`` feeds ``tokens[i]`` at position ``caches[i].length`` and is
        what ``model(tokens[i], cache=caches[i])`` computes for that sequence
        alone: bit for bit when :attr:`exact`, else to float rounding (see the
        class notes); each cache advances by one.
        """
        linear, gelu = (_rowwise_linear, _rowwise_gelu) if self.exact else (F.linear, _gelu)
        model, config = self.model, self._config
        b, d = len(tokens), config.d_model
        n_head, head_dim = config.n_head, config.head_dim
        lengths = [c.length for c in caches]
        rows = torch.tensor([c.row for c in caches], device=self._device)
        positions = torch.tensor(lengths, device=self._device)
        # Per-row RoPE angles, broadcast over the heads.
        cos = self._cos[positions].view(b, 1, 1, -1)
        sin = self._sin[positions].view(b, 1, 1, -1)
        x = model.wte(torch.tensor(tokens, dtype=torch.long, device=self._device).view(b, 1))
        for layer, module in enumerate(model.blocks):
            block = cast(_Block, module)
            attn = block.attn
            q, k, v = torch.split(linear(block.ln1(x), attn.qkv.weight), d, dim=2)
            q = _apply_rope(q.view(b, 1, n_head, head_dim).transpose(1, 2), cos, sin)
            k = _apply_rope(k.view(b, 1, n_head, head_dim).transpose(1, 2), cos, sin)
            v = v.view(b, 1, n_head, head_dim).transpose(1, 2)
            # Each row's new key/value goes to its own slot, at its own position.
            self._keys[layer][rows, :, positions] = k[:, :, 0]
            self._values[layer][rows, :, positions] = v[:, :, 0]
            # Attention row by row: the call a lone sequence makes, over the
            # same [1, n_head, length, head_dim] view of its own cache.
            y = torch.cat(
                [
                    F.scaled_dot_product_attention(
                        q_row, c.keys[layer][:, :, : n + 1], c.values[layer][:, :, : n + 1]
                    )
                    for q_row, c, n in zip(torch.split(q, 1), caches, lengths, strict=True)
                ]
            )
            x = x + linear(y.transpose(1, 2).reshape(b, 1, d), attn.proj.weight)
            x = x + linear(gelu(linear(block.ln2(x), block.fc.weight)), block.out.weight)
        for c in caches:
            c.advance(1)
        return linear(model.ln_f(x), model.wte.weight).view(b, -1)

    def _probe_batched_step(self) -> float:
        """The largest difference between a batched step's logits and lone steps' here and now.

        A batched step relies on kernels (BLAS, element-wise loops) giving each
        row what they give a lone row, bit for bit (:attr:`exact`) or to float
        rounding. That is a property of the platform (the CPU and the code path
        torch and MKL pick for it) rather than a promise, so it is tried once,
        on random sequences in up to ``_PROBE_ROWS`` slots: all the rows in slot
        order, then every other one reversed, each time against the model's own
        forward pass on each row alone. The store is left empty afterwards.

        Returns:
            The largest :func:`rounding_difference` of a row: 0.0 when every
            row equals its lone step bit for bit.
        """
        config = self._config
        n = min(self.max_sequences, _PROBE_ROWS)
        gen = torch.Generator(device="cpu").manual_seed(0)
        caches = self._caches[:n]
        worst = 0.0
        try:
            with torch.inference_mode():
                for i, cache in enumerate(caches):
                    cache.reset()
                    length = 1 + i % min(8, config.context_length - 1)
                    prompt = torch.randint(0, config.vocab_size, (1, length), generator=gen)
                    self.model(prompt.to(self._device), cache=cache)
                tokens = torch.randint(0, config.vocab_size, (n,), generator=gen).tolist()
                # Each time at the same positions (below context_length).
                for order in (list(range(n)), list(range(n))[::-2]):
                    batched = self._forward([tokens[i] for i in order], [caches[i] for i in order])
                    for row, i in enumerate(order):
                        caches[i].length -= 1
                        idx = torch.tensor([[tokens[i]]], dtype=torch.long, device=self._device)
                        alone, _ = self.model(idx, cache=caches[i])
                        caches[i].length -= 1
                        worst = max(worst, rounding_difference(alone[0, -1], batched[row]))
        finally:
            for cache in caches:
                cache.reset()
        return worst


def embed(model: ByteLM, batch_ids: list[list[int]], *, on_device: bool = False) -> Tensor:
    """Returns mean-pooled final hidden states for a batch of token sequences.

    Sequences are right-padded and masked, so each row's result does not
    depend on what else is in the batch (causal attention means right padding
    cannot affect real positions, and pooling covers real tokens only).
    Sequences longer than ``context_length`` are truncated to their first
    ``context_length`` ids; an empty sequence is embedded as ``[eot_id]``.

    Args:
        model: The model.
        batch_ids: ``N`` lists of token ids.

        on_device: Leave the result on the model's device (the caller gathers
            several passes and copies them to the CPU at once); else on the CPU.

    Returns:
        ``Tensor[N, d_model]``, float32, not normalised. ``N == 0`` gives an
        empty ``[0, d_model]`` tensor.
    """
    config = model.config
    device, _ = _model_device_dtype(model)
    if not batch_ids:
        return torch.zeros(
            0, config.d_model, dtype=torch.float32, device=device if on_device else None
        )
    rows = [list(ids[: config.context_length]) or [config.eot_id] for ids in batch_ids]
    width = max(len(r) for r in rows)
    idx = torch.full((len(rows), width), config.eot_id, dtype=torch.long)
    real = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        real[i, : len(r)] = True
    idx, real = _to_device(idx, device), _to_device(real, device)
    with torch.inference_mode():
        _, hidden = model(idx, attention_mask=real)
        weights = real.to(torch.float32).unsqueeze(-1)
        pooled: Tensor = (hidden.to(torch.float32) * weights).sum(dim=1) / weights.sum(dim=1)
    return pooled if on_device else pooled.cpu()


def default_weights_dir() -> Path:
    """Returns the package's shipped weights folder (``server/models/weights``)."""
    return Path(str(importlib.resources.files("protoserve.server.models") / "weights"))


def save_pretrained(
    model: ByteLM,
    directory: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
) -> tuple[Path, Path]:
    """Writes ``bytelm.safetensors`` and ``bytelm.json`` into ``directory``.

    Args:
        model: Model to save.
        directory: Target folder (created if missing).
        metadata: Extra JSON-serialisable training metadata stored under the
            ``"metadata"`` key of ``bytelm.json``.
        dtype: Storage dtype of the floating-point tensors (fp16 keeps the
            file small; :func:`load_pretrained` converts back to float32).

    Returns:
        Paths of the weights file and the JSON file.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: (t.detach().to(dtype) if t.is_floating_point() else t.detach()).cpu().contiguous()
        for name, t in model.state_dict().items()
    }
    weights_path = out / WEIGHTS_NAME
    config_path = out / CONFIG_NAME
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    # safetensors creates the file owner-only; shipped data must be readable
    # by whoever runs the installed server.
    weights_path.chmod(0o644)
    doc = {
        "config": model.config.to_dict(),
        "storage_dtype": str(dtype).removeprefix("torch."),
        "metadata": dict(metadata or {}),
    }
    config_path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return weights_path, config_path


def load_pretrained(directory: str | Path | None = None) -> ByteLM:
    """Loads a saved model as float32 in eval mode.

    Args:
        directory: Folder holding ``bytelm.safetensors`` and ``bytelm.json``;
            ``None`` means the package's shipped weights folder.

    Returns:
        The model, on CPU, float32, ``eval()`` mode.

    Raises:
        FileNotFoundError: If either file is missing.
        RuntimeError: If the weights do not match the config.
    """
    folder = default_weights_dir() if directory is None else Path(directory)
    config_path = folder / CONFIG_NAME
    weights_path = folder / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"ByteLM file not found: {p}")
    doc = json.loads(config_path.read_text(encoding="utf-8"))
    config = ByteLMConfig.from_dict(doc["config"])
    model = ByteLM(config)
    state = {
        k: v.to(torch.float32) if v.is_floating_point() else v
        for k, v in load_file(str(weights_path)).items()
    }
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def read_metadata(directory: str | Path | None = None) -> dict[str, Any]:
    """Returns the ``metadata`` section of ``bytelm.json`` (training info)."""
    folder = default_weights_dir() if directory is None else Path(directory)
    doc = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    return dict(doc.get("metadata", {}))


def encode(text: str) -> list[int]:
    """Returns the UTF-8 bytes of ``text`` as token ids (0..255)."""
    return list(text.encode("utf-8"))


def decode_bytes(ids: Iterable[int]) -> bytes:
    """Returns the bytes for ``ids``, dropping EOT (and any id > 255)."""
    return bytes(i for i in ids if 0 <= i < 256)
