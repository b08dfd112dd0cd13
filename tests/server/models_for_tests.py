"""Small real models for tests, served through the same `module:Class` path users use."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch

from protoserve.server import GenerationParams, Model, TensorInfo, Token


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
