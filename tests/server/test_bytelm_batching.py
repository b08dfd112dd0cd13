"""Tests for ByteLM continuous batching (``BatchedDecoding``) and its adapter.

Two promises, one per mode (docs/adr/0015-batch-invariance.md):

- **Exact** (``exact=True``, the server's ``--batch-invariant``): every sequence
  decoded in a batch gets exactly the token ids ``generate_tokens`` yields for it
  alone -- whatever else is in the batch, whenever others join or leave, across
  context slides. Where this CPU's kernels cannot keep that batched, decoding
  runs row by row, which must be exact too.
- **Batched** (the default): every batched step's logits are each row's lone
  step's to float rounding (``ROUNDING_TOLERANCE``), on every CPU.

Most tests run on tiny random models (context 16, so slides come every few
tokens); some use the shipped weights. Bit-for-bit results hold only within one
CPU dispatch path: tests/server/test_dispatch_paths.py runs this module again
under every path the machine can execute.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from protoserve.server.models.builtin import ByteLMModel
from protoserve.server.models.bytelm import (
    ROUNDING_TOLERANCE,
    BatchedDecoding,
    ByteLM,
    ByteLMConfig,
    encode,
    generate_tokens,
    load_pretrained,
    rounding_difference,
    save_pretrained,
)
from protoserve.server.runtime import dispatch
from protoserve.server.runtime.model import BatchDecoder, Decoding, GenerationParams, Token
from tests.server.models_for_tests import NoEotByteLM

TINY = ByteLMConfig(n_layer=2, n_head=2, d_model=32, context_length=16)
#: Odd context (the slide keeps 4 of 9), one layer, narrow heads.
ODD = ByteLMConfig(n_layer=1, n_head=4, d_model=32, context_length=9)
#: As wide as the shipped model (products large enough for BLAS's own kernels).
WIDE = ByteLMConfig(n_layer=1, n_head=4, d_model=256, context_length=16)


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of a request."""

    temperature: float
    top_k: int
    top_p: float


GREEDY = Sampling(0.0, 0, 1.0)
SAMPLED = [
    Sampling(1.0, 0, 1.0),
    Sampling(0.8, 40, 1.0),
    Sampling(1.2, 0, 0.9),
    Sampling(0.7, 5, 0.95),
]
PROMPTS = [
    [],
    [65],
    encode("def f(x):"),
    encode("héllo wörld — ✓ 日本語"),  # multibyte UTF-8
    list(range(15)),  # context - 1
    list(range(16)),  # exactly the context
    list(range(40, 80)),  # longer than the context
]


def _tiny(config: ByteLMConfig = TINY, seed: int = 0) -> ByteLM:
    torch.manual_seed(seed)
    return ByteLM(config).eval()


@dataclass(eq=False)
class _Seq:
    """One sequence under test: its request and what the decoder gave it."""

    prompt: list[int]
    sampling: Sampling
    seed: int
    handle: int = -1
    tokens: list[int] = field(default_factory=list)
    ended: bool = False

    def record(self, token: int | None) -> None:
        assert not self.ended
        if token is None:
            self.ended = True
        else:
            self.tokens.append(token)


def _add(dec: BatchedDecoding, seq: _Seq) -> _Seq:
    sampling = seq.sampling
    seq.handle, token = dec.add(
        seq.prompt,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        seed=seq.seed,
    )
    seq.record(token)
    return seq


def _step(dec: BatchedDecoding, seqs: list[_Seq]) -> None:
    """Steps the live sequences among ``seqs``, in the given order."""
    live = [s for s in seqs if not s.ended]
    if live:
        for seq, token in zip(live, dec.step([s.handle for s in live]), strict=True):
            seq.record(token)


def _reference(model: ByteLM, prompt: list[int], how: Sampling, seed: int, n: int) -> list[int]:
    return list(
        generate_tokens(
            model,
            prompt,
            max_new_tokens=n,
            temperature=how.temperature,
            top_k=how.top_k,
            top_p=how.top_p,
            seed=seed,
        )
    )


def _assert_matches_reference(model: ByteLM, seq: _Seq) -> None:
    n = len(seq.tokens)
    ref = _reference(model, seq.prompt, seq.sampling, seq.seed, n + 1)
    if seq.ended:
        assert seq.tokens == ref
    else:
        assert seq.tokens == ref[:n]


def _mixed(n: int, rng: random.Random) -> list[_Seq]:
    """``n`` sequences over every prompt kind, greedy and sampled, distinct seeds."""
    kinds = [GREEDY, *SAMPLED]
    return [
        _Seq(PROMPTS[i % len(PROMPTS)], kinds[i % len(kinds)], seed=rng.randrange(2**32))
        for i in range(n)
    ]


def _exact(model: ByteLM, max_sequences: int) -> BatchedDecoding:
    """An exact decoder: bit for bit each sequence's lone tokens, batched or row by row."""
    dec = BatchedDecoding(model, max_sequences, exact=True)
    assert dec.batched == (dec.probe_difference == 0.0)
    return dec


def _require_batched(dec: BatchedDecoding) -> None:
    """Skip, saying why, where this CPU's kernels do not give a batched row what they
    give a lone row: exact decoding runs row by row there, which other tests check."""
    if not dec.batched:
        pytest.skip(
            f"the exact batched step is not bit-exact on {dispatch.describe_current()} "
            f"(a row off by {dec.probe_difference:.1e}): exact decoding runs row by row here"
        )


# --------------------------------------------------------------------------- exact mode


def test_exact_batched_step_on_this_machine() -> None:
    # The construction-time check, on this CPU's dispatch path: where it passes,
    # every exact test below exercises the batched step, not the row-by-row one.
    for config, n in ((TINY, 8), (ODD, 3), (WIDE, 19)):
        _require_batched(_exact(_tiny(config), n))


@pytest.mark.parametrize("config", [TINY, ODD], ids=["ctx16", "ctx9"])
def test_batch_matches_generate_tokens(config: ByteLMConfig) -> None:
    model = _tiny(config, seed=1)
    dec = _exact(model, 14)
    seqs = [_add(dec, s) for s in _mixed(14, random.Random(2))]
    for _ in range(50):  # several context slides each
        _step(dec, seqs)
    for seq in seqs:
        _assert_matches_reference(model, seq)
    assert any(s.ended for s in seqs)  # some sampled end of text
    assert any(len(s.tokens) == 51 for s in seqs)


def test_joining_and_leaving_do_not_change_tokens() -> None:
    model = _tiny(seed=2)
    rng = random.Random(3)
    dec = _exact(model, 6)
    pool = _mixed(12, rng)
    live: list[_Seq] = []
    finished: list[_Seq] = []
    for step in range(70):
        # Someone joins every few steps while there is room...
        if step % 4 == 0 and pool and dec.size < dec.max_sequences:
            live.append(_add(dec, pool.pop()))
        # ...and someone leaves early now and then (ended ones leave at once).
        leaving = [s for s in live if s.ended]
        if step % 9 == 5 and live:
            leaving.append(rng.choice(live))
        for seq in dict.fromkeys(leaving):
            dec.remove(seq.handle)
            live.remove(seq)
            finished.append(seq)
        _step(dec, live)
    assert len(finished) >= 6 and not pool
    for seq in finished + live:
        _assert_matches_reference(model, seq)


def test_stepping_a_subset_leaves_the_others_unchanged() -> None:
    model = _tiny(seed=3)
    rng = random.Random(4)
    dec = _exact(model, 5)
    seqs = [_add(dec, s) for s in _mixed(5, rng)]
    for step in range(60):
        # Any subset, in any order; some sequences sit out many steps in a row.
        chosen = [s for i, s in enumerate(seqs) if (step // (i + 1)) % 3 != 0]
        rng.shuffle(chosen)
        _step(dec, chosen)
    for seq in seqs:
        _assert_matches_reference(model, seq)


def test_exact_when_the_thread_count_does_not_divide_the_batch() -> None:
    # GELU splits a large input evenly over the threads: 19 rows of 1024 over 3
    # threads would put row boundaries mid-piece without the padding rows.
    model = _tiny(WIDE)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        dec = _exact(model, 19)
        _require_batched(dec)
        seqs = [_add(dec, s) for s in _mixed(19, random.Random(7))]
        for _ in range(12):
            _step(dec, seqs)
        for seq in seqs:
            _assert_matches_reference(model, seq)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "batched"])
def test_row_by_row_fallback_is_exact(monkeypatch: pytest.MonkeyPatch, exact: bool) -> None:
    # What a decoder does where its mode's promise fails its check: the model once
    # per sequence, each exactly as alone.
    monkeypatch.setattr(BatchedDecoding, "_probe_batched_step", lambda self: math.inf)
    model = _tiny(seed=4)
    dec = BatchedDecoding(model, 4, exact=exact)
    assert not dec.batched
    seqs = [_add(dec, s) for s in _mixed(4, random.Random(5))]
    for _ in range(30):
        _step(dec, seqs)
    for seq in seqs:
        _assert_matches_reference(model, seq)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "batched"])
def test_an_overridden_forward_is_detected_and_followed(exact: bool) -> None:
    torch.manual_seed(5)
    model = NoEotByteLM(TINY).eval()
    dec = BatchedDecoding(model, 3, exact=exact)
    # The check sees that the batched step would differ, by far more than rounding.
    assert not dec.batched and dec.probe_difference == math.inf
    seqs = [_add(dec, s) for s in _mixed(3, random.Random(6))]
    for _ in range(20):
        _step(dec, seqs)
    for seq in seqs:
        assert not seq.ended and len(seq.tokens) == 21
        _assert_matches_reference(model, seq)


def test_shipped_weights_across_the_slide() -> None:
    model = load_pretrained()
    ctx = model.config.context_length
    dec = _exact(model, 3)
    code = encode("import os\nimport sys\n\n\ndef main(argv):\n    ") * 12
    seqs = [
        # Long prompts: the first slide comes after a few tokens, the next one
        # ctx // 2 tokens later.
        _add(dec, _Seq(code[-(ctx - 4) :], GREEDY, seed=0)),
        _add(dec, _Seq(code, SAMPLED[1], seed=11)),
        _add(dec, _Seq(encode("class Parser:\n    "), SAMPLED[2], seed=12)),
    ]
    for _ in range(ctx // 2 + 20):
        _step(dec, seqs)
    for seq in seqs:
        _assert_matches_reference(model, seq)
    # Greedy over code never ends here: 1 + 4 tokens, a slide, ctx // 2 more, another slide.
    assert not seqs[0].ended and len(seqs[0].tokens) == ctx // 2 + 21


# --------------------------------------------------------------------------- batched mode


class _LoneCheck:
    """Wraps a decoder's batched step: after each one, every row's logits against the
    model's own forward pass on that row alone (same token, same cache, same position)."""

    def __init__(self, dec: BatchedDecoding) -> None:
        self.dec, self.forward = dec, dec._forward
        self.worst, self.rows, self.widest = 0.0, 0, 0
        dec._forward = self  # type: ignore[method-assign]

    def __call__(self, tokens: list[int], caches: list[Any]) -> Tensor:
        batched = self.forward(tokens, caches)
        for row, (token, cache) in enumerate(zip(tokens, caches, strict=True)):
            cache.length -= 1  # the batched step advanced it; run the same step alone
            idx = torch.tensor([[token]], dtype=torch.long)
            alone, _ = self.dec.model(idx, cache=cache)
            self.worst = max(self.worst, rounding_difference(alone[0, -1], batched[row]))
        self.rows += len(tokens)
        self.widest = max(self.widest, len(tokens))
        return batched


@pytest.mark.parametrize("config", [TINY, ODD, WIDE], ids=["ctx16", "ctx9", "wide"])
def test_batched_steps_are_lone_steps_to_rounding(config: ByteLMConfig) -> None:
    # Every step of a run with joins, leaves, subsets and slides, row by row.
    model = _tiny(config, seed=9)
    dec = BatchedDecoding(model, 8)
    assert dec.batched and dec.probe_difference <= ROUNDING_TOLERANCE
    check = _LoneCheck(dec)
    rng = random.Random(10)
    pool = _mixed(16, rng)
    live: list[_Seq] = []
    for step in range(60):
        if step % 3 == 0 and pool and dec.size < dec.max_sequences:
            live.append(_add(dec, pool.pop()))
        for seq in [s for s in live if s.ended or (step % 11 == 7 and s is live[0])]:
            dec.remove(seq.handle)
            live.remove(seq)
        _step(dec, [s for s in live if rng.random() < 0.8])
    assert check.rows > 100 and check.widest >= 4
    assert check.worst <= ROUNDING_TOLERANCE


def test_shipped_weights_batched_are_lone_steps_to_rounding() -> None:
    model = load_pretrained()
    dec = BatchedDecoding(model, 32)
    assert dec.batched and dec.probe_difference <= ROUNDING_TOLERANCE
    check = _LoneCheck(dec)
    code = encode(Path(random.__file__).read_text(encoding="utf-8"))
    rng = random.Random(11)
    seqs = []
    for i in range(32):
        start = rng.randrange(len(code) - 300)
        prompt = code[start : start + rng.randint(1, 300)]  # some past the context
        seqs.append(_add(dec, _Seq(prompt, [GREEDY, *SAMPLED][i % 5], seed=i)))
    for _ in range(40):
        _step(dec, seqs)
    assert check.widest >= 24
    assert check.worst <= ROUNDING_TOLERANCE


def test_the_tolerance_tells_rows_apart() -> None:
    # Rounding is far below what separates one sequence's logits from another's:
    # a step that mixed up rows could not pass for rounding.
    model = load_pretrained()
    with torch.inference_mode():
        logits, _ = model(torch.tensor([encode("import os\n"), encode("class A:\n ")]))
    assert rounding_difference(logits[0, -1], logits[1, -1]) > 100 * ROUNDING_TOLERANCE


# --------------------------------------------------------------------------- bookkeeping


def test_capacity_and_slot_reuse() -> None:
    model = _tiny(seed=6)
    dec = _exact(model, 2)
    a = _add(dec, _Seq(encode("ab"), GREEDY, seed=0))
    b = _add(dec, _Seq(encode("cd"), SAMPLED[0], seed=1))
    assert dec.size == 2
    with pytest.raises(RuntimeError, match="full: all 2 sequences are live"):
        dec.add(encode("ef"), temperature=0.0, top_k=0, top_p=1.0, seed=2)
    assert dec.size == 2
    _step(dec, [a, b])
    dec.remove(a.handle)
    assert dec.size == 1
    # The freed slot (the only one) takes a new sequence, which starts clean:
    # nothing of the old one's keys and values shows in its tokens.
    c = _add(dec, _Seq(encode("gh"), SAMPLED[1], seed=3))
    assert c.handle not in (a.handle, b.handle)
    for _ in range(25):
        _step(dec, [b, c])
    for seq in (a, b, c):
        _assert_matches_reference(model, seq)
    with pytest.raises(ValueError, match="max_sequences"):
        BatchedDecoding(model, 0)


def test_bad_requests_add_nothing() -> None:
    dec = BatchedDecoding(_tiny(), 1)
    with pytest.raises(ValueError, match="prompt id"):
        dec.add([65, 257], temperature=1.0, top_k=0, top_p=1.0, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        dec.add([65], temperature=-1.0, top_k=0, top_p=1.0, seed=0)
    with pytest.raises(ValueError, match="top_p"):
        dec.add([65], temperature=1.0, top_k=0, top_p=1.5, seed=0)
    assert dec.size == 0
    handle, _ = dec.add([65], temperature=1.0, top_k=0, top_p=1.0, seed=0)  # the slot is free
    with pytest.raises(ValueError, match="more than once"):
        dec.step([handle, handle])
    dec.remove(handle)
    for call in (lambda: dec.step([handle]), lambda: dec.remove(handle)):
        with pytest.raises(KeyError, match="unknown sequence handle"):
            call()
    assert dec.step([]) == []


def test_a_sequence_that_ended_keeps_giving_none() -> None:
    # Final hidden state fixed to e_0 and a huge EOT weight there: EOT always wins.
    model = _tiny(seed=7)
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.zero_()
        model.ln_f.bias[0] = 1.0
        model.wte.weight[model.config.eot_id, 0] = 100.0
    dec = BatchedDecoding(model, 2)
    handle, first = dec.add(encode("x"), temperature=1.0, top_k=0, top_p=1.0, seed=0)
    assert first is None
    assert _reference(model, encode("x"), SAMPLED[0], 0, 5) == []
    assert dec.step([handle]) == [None]
    assert dec.size == 1
    dec.remove(handle)


def test_leaves_global_state_alone() -> None:
    model = _tiny()
    rng_state = torch.get_rng_state()
    dec = BatchedDecoding(model, 2)
    handle, _ = dec.add(encode("ab"), temperature=1.0, top_k=0, top_p=1.0, seed=0)
    dec.step([handle])
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert not torch.is_inference_mode_enabled()


# --------------------------------------------------------------------------- model adapter


def _decode_all(
    decoder: BatchDecoder, texts: list[str], params: list[GenerationParams]
) -> list[list[Token]]:
    """Every text decoded together, up to 40 tokens each."""
    got: list[list[Token]] = []
    states = []
    for text, p in zip(texts, params, strict=True):
        state, token = decoder.prefill(text, p)
        states.append(state)
        got.append([token] if token is not None else [])
    live = [i for i, tokens in enumerate(got) if tokens]
    while live:
        tokens = decoder.step([states[i] for i in live])
        for i, token in zip(live, tokens, strict=True):
            if token is not None:
                got[i].append(token)
        live = [i for i, t in zip(live, tokens, strict=True) if t is not None and len(got[i]) < 40]
    for state in states:
        decoder.release(state)
    return got


def test_bytelm_model_batch_decoder(tmp_path: Path) -> None:
    save_pretrained(_tiny(seed=8), tmp_path)
    model = ByteLMModel(str(tmp_path))
    model.load()
    model.batch_invariant = True  # what the server sets for --batch-invariant
    decoder = model.batch_decoder(3)
    assert isinstance(decoder, BatchDecoder)
    assert decoder.max_sequences == 3
    # Batched and exact where this CPU's kernels allow; else row by row, saying why.
    if decoder.decoding is Decoding.SEQUENTIAL:
        assert "not bit-exact on this machine's kernels" in decoder.decoding_note
    else:
        assert decoder.decoding is Decoding.BATCHED_EXACT

    texts = ["déjà vu", "", "import os\n" * 3]
    params = [
        GenerationParams(max_new_tokens=40, temperature=t, top_k=0, top_p=1.0, seed=i)
        for i, t in enumerate((0.0, 1.0, 0.9))
    ]
    got = _decode_all(decoder, texts, params)
    for text, p, tokens in zip(texts, params, got, strict=True):
        assert tokens == list(model.generate(text, p))
        assert all(t.data == bytes((t.id,)) for t in tokens)
    assert any(len(tokens) == 40 for tokens in got)


def test_bytelm_model_decodes_batched_by_default() -> None:
    model = ByteLMModel()
    model.load()
    decoder = model.batch_decoder(4)
    assert decoder.decoding is Decoding.BATCHED and decoder.decoding_note == ""
    params = [
        GenerationParams(max_new_tokens=40, temperature=0.8, top_k=0, top_p=1.0, seed=i)
        for i in range(4)
    ]
    got = _decode_all(decoder, ["def ", "class A:", "import ", "# "], params)
    assert all(len(tokens) == 40 for tokens in got)  # shipped weights: code, no end of text


def test_embedding_many_texts_equals_embedding_each_alone_in_order() -> None:
    model = ByteLMModel()
    model.load()
    rng = random.Random(3)
    # Lengths on both sides of the per-pass budget, empty and longer than the context.
    texts = ["".join(rng.choice("ab c\né") for _ in range(rng.randint(0, 400))) for _ in range(40)]
    texts += ["", "x" * 2000]
    together = model.embed(texts)
    alone = torch.cat([model.embed([t]) for t in texts])
    assert together.shape == (len(texts), model.model.config.d_model)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
