"""The base class a model implements to be served, and the types it speaks.

A model is plain Python: it loads itself, then generates, embeds or predicts
when asked. It never sees gRPC. The runtime calls every method from the
model's own worker thread, one call at a time, so a model needs no locking
and never blocks the event loop.

Example::

    class Doubler(Model):
        name = "doubler"
        inputs = (TensorInfo("x", "float32", (-1,)),)
        outputs = (TensorInfo("y", "float32", (-1,)),)

        def predict(self, inputs, parameters):
            return {"y": inputs["x"] * 2}
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = [
    "GenerationParams",
    "Model",
    "Parameter",
    "Task",
    "TensorInfo",
    "Token",
]


class Task(enum.Enum):
    """A kind of work a model can do; a model serves those whose method it overrides."""

    TEXT_GENERATION = "text_generation"
    EMBEDDING = "embedding"
    TENSOR_PREDICTION = "tensor_prediction"


@dataclass(frozen=True)
class TensorInfo:
    """One input or output: a name, a dtype name (``"float32"``, ``"string"`` ...) and a shape.

    ``-1`` in the shape marks a dimension of any size.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    description: str = ""


@dataclass(frozen=True)
class Parameter:
    """A request parameter a model accepts: its type, default and bounds.

    ``type`` is one of ``int``, ``float``, ``bool``, ``str`` or ``list`` (of
    strings). For numbers ``minimum``/``maximum`` bound the value (inclusive);
    for lists ``maximum`` bounds the number of items.
    """

    name: str
    task: Task
    type: type
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""


@dataclass(frozen=True)
class GenerationParams:
    """Validated generation parameters; every field is set."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_sequences: tuple[str, ...] = ()


@dataclass(frozen=True)
class Token:
    """One generated token: its id and the bytes it stands for (UTF-8 text, possibly partial)."""

    id: int
    data: bytes


class Model:
    """Base class of a servable model. Override the methods of the tasks it serves.

    Class attributes describe the model; override them in a subclass or set
    them on an instance. Methods run in the model's worker thread.
    """

    name: ClassVar[str] = "model"
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    #: Inputs and outputs of ``predict``; empty means any named tensors.
    inputs: ClassVar[Sequence[TensorInfo]] = ()
    outputs: ClassVar[Sequence[TensorInfo]] = ()
    #: Generation limits and defaults, used by :meth:`parameters`.
    default_max_new_tokens: ClassVar[int] = 64
    max_new_tokens_limit: ClassVar[int] = 1024
    max_input_tokens: ClassVar[int] = 4096
    max_stop_sequences: ClassVar[int] = 8
    #: Most texts in one ``embed`` call.
    max_batch_texts: ClassVar[int] = 256

    served_name: str = ""

    def load(self) -> None:
        """Load weights and get ready. Called once, before anything else."""

    def warmup(self) -> None:
        """Run every task once on a tiny input, so the first request pays no one-off costs.

        The model is not READY until this has returned.
        """
        if Task.TEXT_GENERATION in self.tasks():
            params = GenerationParams(max_new_tokens=2, temperature=1.0, top_k=0, top_p=1.0, seed=0)
            tokens = iter(self.generate("warm up", params))
            try:
                # Two steps: the prefill and one decode step; never the whole text.
                for _ in itertools.islice(tokens, params.max_new_tokens):
                    pass
            finally:
                close = getattr(tokens, "close", None)
                if close is not None:
                    close()
        if Task.EMBEDDING in self.tasks():
            self.embed(["warm up"])

    def tasks(self) -> set[Task]:
        """The tasks this model serves: those whose method the subclass overrides."""
        kind = type(self)
        found = set()
        if kind.generate is not Model.generate:
            found.add(Task.TEXT_GENERATION)
        if kind.embed is not Model.embed:
            found.add(Task.EMBEDDING)
        if kind.predict is not Model.predict:
            found.add(Task.TENSOR_PREDICTION)
        return found

    def parameters(self) -> list[Parameter]:
        """The parameters requests may set. The default covers text generation."""
        if Task.TEXT_GENERATION not in self.tasks():
            return []
        gen = Task.TEXT_GENERATION
        return [
            Parameter(
                "max_new_tokens",
                gen,
                int,
                self.default_max_new_tokens,
                1,
                self.max_new_tokens_limit,
                "Most tokens to generate.",
            ),
            Parameter(
                "temperature",
                gen,
                float,
                1.0,
                0.0,
                10.0,
                "Scales the logits before sampling; 0 is greedy decoding.",
            ),
            Parameter(
                "top_k",
                gen,
                int,
                0,
                0,
                None,
                "Sample among the k most likely tokens; 0 means no limit.",
            ),
            Parameter(
                "top_p",
                gen,
                float,
                1.0,
                0.0,
                1.0,
                "Nucleus sampling: the smallest set of tokens whose probabilities "
                "add up to p; 1 means no limit.",
            ),
            Parameter(
                "seed",
                gen,
                int,
                None,
                0,
                2**63 - 1,
                "Makes sampling reproducible; unset means a random seed.",
            ),
            Parameter(
                "stop_sequences",
                gen,
                list,
                [],
                None,
                self.max_stop_sequences,
                "End the generation when one of these texts is generated.",
            ),
        ]

    def count_tokens(self, text: str) -> int:
        """The number of tokens ``text`` encodes to; the default counts UTF-8 bytes."""
        return len(text.encode("utf-8"))

    def generate(self, text: str, params: GenerationParams) -> Iterator[Token]:
        """Continue ``text``: yield one token per step, as soon as it is chosen.

        Stop (return) at the end of text. The runtime stops iterating at
        ``max_new_tokens`` or a stop sequence, and closes the iterator when
        the request is cancelled, so each ``next()`` should be one step.
        """
        raise NotImplementedError

    def embed(self, texts: list[str]) -> torch.Tensor:
        """One vector per text: a float tensor of shape ``[len(texts), dim]``."""
        raise NotImplementedError

    def predict(
        self, inputs: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        """Run on named tensors, return named tensors."""
        raise NotImplementedError

    def describe_inputs(self) -> list[TensorInfo]:
        """The inputs of every task this model serves."""
        found = list(self.inputs)
        tasks = self.tasks()
        if Task.TEXT_GENERATION in tasks:
            found.append(TensorInfo("inputs", "string", (1,), "Text to continue (generate)."))
        if Task.EMBEDDING in tasks:
            found.append(TensorInfo("inputs", "string", (-1,), "Texts to embed (embed)."))
        return found

    def describe_outputs(self) -> list[TensorInfo]:
        """The outputs of every task this model serves."""
        found = list(self.outputs)
        tasks = self.tasks()
        if Task.TEXT_GENERATION in tasks:
            found.append(TensorInfo("generated_text", "string", (1,), "The continuation."))
        if Task.EMBEDDING in tasks:
            found.append(TensorInfo("embeddings", "float32", (-1, -1), "One vector per text."))
        return found
