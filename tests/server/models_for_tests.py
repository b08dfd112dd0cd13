"""Small real models for tests, served through the same `module:Class` path users use."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch

from protoserve.server import BatchDecoder, GenerationParams, Model, TensorInfo, Token
from protoserve.server.models import bytelm
from protoserve.server.models.builtin import ByteLMModel
from protoserve.server.runtime.errors import ResourceExhausted


class Doubler(Model):
    """Predict: y = 2x, for float32 vectors."""

    name = "doubler"
    description = "Doubles a float32 vector."
    inputs = (TensorInfo("x", "float32", (-1,)),)
    outputs = (TensorInfo("y", "float32", (-1,)),)

    def predict(
        self, inputs: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        return {"y": inputs["x"] * float(parameters.get("factor", 2.0))}


class Scripted(Model):
    """Generates the bytes of ``script`` one per step, ``delay`` seconds each, then ends.

    Counts its steps so tests can see when the server stopped asking for more.
    """

    name = "scripted"
    script: ClassVar[bytes] = "héllo wörld. STOP here. 🙂 end".encode()
    delay: ClassVar[float] = 0.0
    steps = 0
    closed = threading.Event()

    def generate(self, text: str, params: GenerationParams) -> Iterator[Token]:
        try:
            for byte in self.script:
                type(self).steps += 1
                time.sleep(self.delay)
                yield Token(byte, bytes((byte,)))
        finally:
            type(self).closed.set()


class Slow(Scripted):
    """A scripted model that takes 20 ms a step and never ends on its own."""

    name = "slow"
    delay = 0.02
    script = b"x" * 100_000


class Held(Model):
    """Says "a", is silent until a test sets ``resume``, then says "b".

    The test decides when the pause ends, from what it has seen (the first event, a
    keep-alive), so no clock decides what arrives in the pause. The wait's 30 s only
    bounds a broken test.
    """

    name = "held"
    resume = threading.Event()

    def warmup(self) -> None:
        pass

    def generate(self, text: str, params: GenerationParams) -> Iterator[Token]:
        yield Token(97, b"a")
        self.resume.wait(30)
        yield Token(98, b"b")


class Exploding(Model):
    """Fails inside model code on every task."""

    name = "exploding"

    def warmup(self) -> None:
        pass  # it would fail, and it should fail per request, not at load

    def generate(self, text: str, params: GenerationParams) -> Iterator[Token]:
        yield Token(65, b"A")
        raise RuntimeError("secret internal detail")

    def embed(self, texts: list[str]) -> torch.Tensor:
        raise RuntimeError("secret internal detail")


class OutOfRoom(Model):
    """Refuses every embedding itself, as a model out of memory would."""

    name = "out-of-room"

    def warmup(self) -> None:
        pass  # it would refuse, and it should refuse per request, not at load

    def embed(self, texts: list[str]) -> torch.Tensor:
        raise ResourceExhausted("no room for this batch; retry later", retry_after=1.0)


class FailsToLoad(Model):
    """Cannot load."""

    name = "broken"

    def load(self) -> None:
        raise OSError("weights missing")

    def embed(self, texts: list[str]) -> torch.Tensor:
        return torch.zeros(len(texts), 2)


class Pausing(Model):
    """Says "a", is silent for 1.2 s (thinking), then says "b"."""

    name = "pausing"

    def warmup(self) -> None:
        pass

    def generate(self, text: str, params: GenerationParams) -> Iterator[Token]:
        yield Token(97, b"a")
        time.sleep(1.2)
        yield Token(98, b"b")


class BatchEmbedder(Model):
    """Embed: a text's vector is [length, byte sum, first byte]; rows never affect each other.

    Records the texts of every call (``calls``) and takes ``delay`` seconds per call,
    so that requests arriving meanwhile queue up and batch.
    """

    name = "batch-embedder"
    max_batch_size = 8
    max_batch_delay = 0.0
    delay: ClassVar[float] = 0.03
    calls: ClassVar[list[list[str]]] = []

    def embed(self, texts: list[str]) -> torch.Tensor:
        type(self).calls.append(list(texts))
        time.sleep(self.delay)
        rows = [[len(t), sum(t.encode()), (t.encode() or b"\0")[0]] for t in texts]
        return torch.tensor(rows, dtype=torch.float32)


class HeldEmbedder(BatchEmbedder):
    """A BatchEmbedder whose every call waits until ``resume`` is set; ``entered`` is set
    as a call begins. A test knows the model is busy, and for how long."""

    name = "held-embedder"
    entered: ClassVar[threading.Event] = threading.Event()
    resume: ClassVar[threading.Event] = threading.Event()

    def warmup(self) -> None:
        pass  # it would wait; the tests start with the model idle

    def embed(self, texts: list[str]) -> torch.Tensor:
        type(self).entered.set()
        type(self).resume.wait(30)
        return super().embed(texts)


class BatchDoubler(Model):
    """Predict on rows: y = x * factor, rowsum = sum of each row; records every call's shape."""

    name = "batch-doubler"
    predict_batches = True
    max_batch_size = 16
    max_batch_delay = 0.0
    calls: ClassVar[list[tuple[int, ...]]] = []

    def predict(
        self, inputs: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        x = inputs["x"]
        type(self).calls.append(tuple(x.shape))
        time.sleep(0.03)
        return {"y": x * float(parameters.get("factor", 2.0)), "rowsum": x.sum(dim=1)}


class WrongRows(BatchDoubler):
    """Claims predict_batches but answers one row whatever the batch."""

    name = "wrong-rows"

    def warmup(self) -> None:
        pass

    def predict(
        self, inputs: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        time.sleep(0.03)
        return {"y": inputs["x"].sum(dim=0, keepdim=True)}


class LetterDecoder(BatchDecoder):
    """Sequences of letters from each sequence's own seeded RNG; steps are recorded.

    A prompt ``end N`` ends the text (None) after N tokens. ``steps`` holds the
    number of sequences of every step; ``released`` the ids let go. With ``hold_at``
    set to N, the step after the first N sets ``held`` and waits until ``resume`` is
    set: a test queues work meanwhile, which then joins at a known step.
    """

    def __init__(self, max_sequences: int, delay: float) -> None:
        self.max_sequences = max_sequences
        self.delay = delay
        self.steps: list[int] = []
        self.hold_at: int | None = None
        self.held = threading.Event()
        self.resume = threading.Event()
        #: "prefill" and "step" in the order they happened.
        self.events: list[str] = []
        self.released: list[int] = []
        self.live: set[int] = set()
        self._next = 0

    def prefill(self, text: str, params: GenerationParams) -> tuple[Any, Token | None]:
        if len(self.live) >= self.max_sequences:
            raise RuntimeError("no free slot")
        ident, self._next = self._next, self._next + 1
        self.live.add(ident)
        self.events.append("prefill")
        limit = int(text.split()[1]) if text.startswith("end ") else None
        state = {"id": ident, "rng": random.Random(f"{params.seed}:{text}"), "n": 0, "limit": limit}
        return state, self._token(state)

    def step(self, states: Sequence[Any]) -> list[Token | None]:
        if len(self.steps) == self.hold_at:
            self.held.set()
            self.resume.wait(30)
        time.sleep(self.delay)
        self.steps.append(len(states))
        self.events.append("step")
        return [self._token(state) for state in states]

    def release(self, state: Any) -> None:
        self.live.discard(state["id"])
        self.released.append(state["id"])

    @staticmethod
    def _token(state: dict[str, Any]) -> Token | None:
        if state["limit"] is not None and state["n"] >= state["limit"]:
            return None
        state["n"] += 1
        letter = state["rng"].choice(b"abcdefghij ")
        return Token(letter, bytes((letter,)))


class Batched(Model):
    """Generation by continuous batching only (no ``generate`` of its own); 5 ms a step."""

    name = "batched"
    delay: ClassVar[float] = 0.005
    decoders: ClassVar[list[LetterDecoder]] = []

    def batch_decoder(self, max_sequences: int) -> BatchDecoder:
        decoder = LetterDecoder(max_sequences, self.delay)
        type(self).decoders.append(decoder)
        return decoder


class Gated(Model):
    """Warming up waits until ``release`` is set: readiness can be watched meanwhile."""

    name = "gated"
    release = threading.Event()

    def warmup(self) -> None:
        self.release.wait(30)
        super().warmup()

    def embed(self, texts: list[str]) -> torch.Tensor:
        return torch.ones(len(texts), 2)


class EchoTensors(Model):
    """Predict: every input comes back unchanged under its own name (any dtype, any shape)."""

    name = "echo-tensors"

    def predict(
        self, inputs: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        return dict(inputs)


class EchoText(Model):
    """Generates its prompt back, one byte per step: text survives the trip byte for byte."""

    name = "echo-text"

    def generate(self, text: str, params: GenerationParams) -> Iterator[Token]:
        for byte in text.encode():
            yield Token(byte, bytes((byte,)))


class Rows(Model):
    """Predict on rows of 4 floats, y = x + 1, declared with the batch as dimension 0."""

    name = "rows"
    inputs = (TensorInfo("x", "float32", (-1, 4)),)
    outputs = (TensorInfo("y", "float32", (-1, 4)),)
    predict_batches = True
    max_batch_size = 8
    max_batch_delay = 0.001

    def predict(
        self, inputs: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        return {"y": inputs["x"] + 1}


class NoEndOfText(ByteLMModel):
    """bytelm whose forward never ends the text: not what its batched step computes.

    Its batch decoder's check sees that (the end-of-text logit is -inf alone and a
    number batched), so it decodes one sequence at a time, and the server says so.
    """

    name = "no-eot"

    def load(self) -> None:
        super().load()
        masked = NoEotByteLM(self.model.config).eval()
        masked.load_state_dict(self.model.state_dict())
        self._model = masked


class NoEotByteLM(bytelm.ByteLM):
    """A ByteLM whose forward never samples end of text: lengths are deterministic,
    and its forward is not what a batched decode step computes."""

    def forward(
        self,
        idx: torch.Tensor,
        cache: bytelm.KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, hidden = super().forward(idx, cache=cache, attention_mask=attention_mask)
        logits = logits.clone()
        logits[..., self.config.eot_id] = float("-inf")
        return logits, hidden


class Counted(Model):
    """Predict: y = x + 1; generate: ``ok``. Counts the calls that reach it (``calls``),
    so a test can tell that a refused request never got to the model."""

    name = "counted"
    inputs = (TensorInfo("x", "float32", (-1,)),)
    outputs = (TensorInfo("y", "float32", (-1,)),)
    calls: ClassVar[int] = 0

    def predict(
        self, inputs: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        type(self).calls += 1
        return {"y": inputs["x"] + 1}

    def generate(self, text: str, params: GenerationParams) -> Iterator[Token]:
        type(self).calls += 1
        yield from (Token(byte, bytes((byte,))) for byte in b"ok")


class PlacedDoubler(Doubler):
    """A Doubler that asks for its own dtype and records what it was given at load."""

    name = "placed"
    dtype = "bfloat16"
    seen: ClassVar[list[tuple[object, object]]] = []

    def load(self) -> None:
        type(self).seen.append((self.device, self.dtype))

    def predict(
        self, inputs: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        assert all(t.device == self.device for t in inputs.values())
        return {"y": (inputs["x"].to(self.dtype) * 2).float()}


class OnCuda(Doubler):
    """A Doubler whose class asks for the GPU."""

    name = "oncuda"
    device = "cuda"
