"""What client calls return: plain Python values that feel like a local model's."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["FinishReason", "Generation", "ModelInfo", "ParameterInfo", "Usage"]


class FinishReason(enum.StrEnum):
    """Why a generation ended."""

    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    END_OF_TEXT = "end_of_text"
    CANCELLED = "cancelled"

    @classmethod
    def from_wire(cls, name: str) -> FinishReason | None:
        """From the proto enum name (``FINISH_REASON_LENGTH``); None for UNSPECIFIED."""
        short = name.removeprefix("FINISH_REASON_").lower()
        return None if short in ("", "unspecified") else cls(short)


@dataclass(frozen=True)
class Usage:
    """Token counts of a call."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Generation(str):
    """The generated text: a ``str`` that also carries how it was made.

    ``client.generate("def ")`` can be used wherever a string can, and still
    answers ``.finish_reason``, ``.usage``, ``.token_ids`` and ``.model``.
    """

    finish_reason: FinishReason | None
    usage: Usage
    token_ids: tuple[int, ...]
    model: str

    def __new__(
        cls,
        text: str,
        *,
        finish_reason: FinishReason | None = None,
        usage: Usage | None = None,
        token_ids: Sequence[int] = (),
        model: str = "",
    ) -> Generation:
        self = super().__new__(cls, text)
        self.finish_reason = finish_reason
        self.usage = usage or Usage()
        self.token_ids = tuple(token_ids)
        self.model = model
        return self

    @property
    def text(self) -> str:
        """The text as a plain ``str``."""
        return str.__str__(self)


@dataclass(frozen=True)
class ParameterInfo:
    """A parameter a model accepts."""

    name: str
    task: str
    type: str
    default: Any
    minimum: float | None
    maximum: float | None
    description: str


@dataclass(frozen=True)
class ModelInfo:
    """A model on the server: what it does, whether it is ready, what it takes."""

    name: str
    version: str
    tasks: tuple[str, ...]
    state: str
    description: str
    parameters: tuple[ParameterInfo, ...]
    state_message: str = ""

    @property
    def ready(self) -> bool:
        return self.state == "ready"
