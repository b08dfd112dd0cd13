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
* :func:`embed` -- mean-pooled final hidden states for a batch of texts.
* :func:`load_pretrained` / :func:`save_pretrained` -- weights I/O.
* :func:`encode` / :func:`decode_bytes` -- text <-> ids.
"""

from __future__ import annotations

import importlib.resources
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = [
    "CONFIG_NAME",
    "EOT_ID",
    "WEIGHTS_NAME",
    "ByteLM",
    "ByteLMConfig",
    "KVCache",
    "decode_bytes",
    "default_weights_dir",
    "embed",
    "encode",
    "generate_tokens",
    "load_pretrained",
    "read_metadata",
    "sample_next",
    "save_pretrained",
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
            is always kept.
        generator: Source of randomness; the result is a deterministic
            function of ``logits``, the parameters and the generator state.

    Returns:
        The sampled token id.

    Raises:
        ValueError: On a negative temperature/top_k or top_p outside (0, 1].
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.detach().to(torch.float32).reshape(-1)
    if temperature == 0:
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
        # the id that crosses the threshold and always keeps the first one.
        drop_sorted = (cumulative - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


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
    config = model.config
    vocab = config.vocab_size
    for tok in prompt_ids:
        if not 0 <= tok < vocab:
            raise ValueError(f"prompt id {tok} outside [0, {vocab})")
    if max_new_tokens <= 0:
        return
    ctx = config.context_length
    keep = max(1, ctx // 2)
    device, dtype = _model_device_dtype(model)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)

    # The whole history is kept only as far back as a slide needs it.
    history: list[int] = list(prompt_ids) if prompt_ids else [config.eot_id]
    if len(history) > ctx:
        history = history[-ctx:]

    cache: KVCache | None = None
    token = config.eot_id
    for _ in range(max_new_tokens):
        # Inference mode is entered per step, never held across a yield:
        # it is thread-local state, and the caller's code (possibly on
        # another thread, e.g. an executor) runs while we are suspended.
        with torch.inference_mode():
            if cache is None:
                cache = KVCache(config, 1, device=device, dtype=dtype)
                idx = torch.tensor([history], dtype=torch.long, device=device)
            else:
                history.append(token)
                if cache.length >= ctx:
                    # Full context: re-prefill from the recent half so there
                    # is room to keep decoding one token at a time.
                    history = history[-keep:]
                    cache.reset()
                    idx = torch.tensor([history], dtype=torch.long, device=device)
                else:
                    idx = torch.tensor([[token]], dtype=torch.long, device=device)
            logits, _ = model(idx, cache=cache)
            token = sample_next(
                logits[0, -1],
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
            )
        if token == config.eot_id:
            return
        yield token


def embed(model: ByteLM, batch_ids: list[list[int]]) -> Tensor:
    """Returns mean-pooled final hidden states for a batch of token sequences.

    Sequences are right-padded and masked, so each row's result does not
    depend on what else is in the batch (causal attention means right padding
    cannot affect real positions, and pooling covers real tokens only).
    Sequences longer than ``context_length`` are truncated to their first
    ``context_length`` ids; an empty sequence is embedded as ``[eot_id]``.

    Args:
        model: The model.
        batch_ids: ``N`` lists of token ids.

    Returns:
        ``Tensor[N, d_model]``, float32, not normalised. ``N == 0`` gives an
        empty ``[0, d_model]`` tensor.
    """
    config = model.config
    device, _ = _model_device_dtype(model)
    if not batch_ids:
        return torch.zeros(0, config.d_model, dtype=torch.float32)
    rows = [list(ids[: config.context_length]) or [config.eot_id] for ids in batch_ids]
    width = max(len(r) for r in rows)
    idx = torch.full((len(rows), width), config.eot_id, dtype=torch.long)
    real = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        real[i, : len(r)] = True
    idx, real = idx.to(device), real.to(device)
    with torch.inference_mode():
        _, hidden = model(idx, attention_mask=real)
        weights = real.to(torch.float32).unsqueeze(-1)
        pooled: Tensor = (hidden.to(torch.float32) * weights).sum(dim=1) / weights.sum(dim=1)
    return pooled.cpu()


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
