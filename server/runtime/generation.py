"""Turning a model's token stream into text chunks, stop sequences and a finish reason.

This runs in the model's worker thread, one step per ``next()``: each step
asks the model for one token and yields the text that is now certain. Text is
emitted as whole UTF-8 characters only, and text that could still become a
stop sequence is held back until it cannot.
"""

from __future__ import annotations

import codecs
import enum
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from protoserve.server.runtime.model import GenerationParams, Model

__all__ = ["Chunk", "FinishReason", "Usage", "run_generation"]


class FinishReason(enum.Enum):
    """Why a generation ended."""

    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    END_OF_TEXT = "end_of_text"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Usage:
    """Token counts of one generation."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Chunk:
    """New text and token ids since the previous chunk; the last one has a finish reason."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop sequence."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index where the earliest stop sequence in ``text`` begins, if any."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def run_generation(
    model: Model,
    text: str,
    params: GenerationParams,
    *,
    prompt_tokens: int,
    stop: threading.Event,
) -> Iterator[Chunk]:
    """Generate from ``model`` one token per step; the last chunk carries finish reason and usage.

    Setting ``stop`` ends the generation at the next step with
    ``FinishReason.CANCELLED`` (the server does that when it shuts down).
    Closing the iterator closes the model's token iterator too.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = tuple(s for s in params.stop_sequences if s)
    pending = ""  # decoded, not yet emitted
    ids: list[int] = []
    generated = 0
    tokens = iter(model.generate(text, params))
    try:
        while True:
            if stop.is_set():
                finish = FinishReason.CANCELLED
                break
            if generated >= params.max_new_tokens:
                finish = FinishReason.LENGTH
                break
            try:
                token = next(tokens)
            except StopIteration:
                finish = FinishReason.END_OF_TEXT
                break
            generated += 1
            ids.append(token.id)
            pending += decoder.decode(token.data)
            hit = _first_stop(pending, stops)
            if hit is not None:
                pending = pending[:hit]
                finish = FinishReason.STOP_SEQUENCE
                break
            keep = _held_back(pending, stops)
            ready, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
            yield Chunk(ready, ids)
            ids = []
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()
    if finish is not FinishReason.STOP_SEQUENCE:
        # A token cut off mid-character at the end shows as U+FFFD, never as an error.
        pending += decoder.decode(b"", final=True)
    yield Chunk(pending, ids, finish, Usage(prompt_tokens, generated))
