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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from protoserve.server.runtime.model import GenerationParams, Model, Token

__all__ = ["Chunk", "FinishReason", "TextAssembly", "Usage", "run_generation"]


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
    """New text and token ids since the previous chunk; the last one has a finish reason.

    Generating makes a chunk per token (the last may hold none); a stream's reader
    that fell behind reads the chunks it missed as one (:meth:`joined`), so a chunk
    it reads may hold several tokens.

    ``logprobs`` holds this chunk's tokens with their log probabilities, in
    ``token_ids`` order, when the request asked for them; otherwise it is empty.
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: list[Token] = field(default_factory=list)

    @classmethod
    def joined(cls, chunks: Sequence[Chunk]) -> Chunk:
        """``chunks``, in order, as one: their text joined, their token ids and log
        probabilities one after another, and the finish reason and usage of the last
        (only a generation's last chunk has them). A stream's reader that fell behind
        gets the chunks it missed so."""
        last = chunks[-1]
        return cls(
            "".join(c.text for c in chunks),
            [i for c in chunks for i in c.token_ids],
            last.finish_reason,
            last.usage,
            [t for c in chunks for t in c.logprobs],
        )


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


class TextAssembly:
    """One generation's text, assembled token by token; the model is driven elsewhere.

    :meth:`push` takes each token as the model chooses it (None at end of text)
    and returns the chunk that is now certain. The chunk is the last one (it
    has a finish reason and usage) when the token ends the generation: end of
    text, a stop sequence, or ``max_new_tokens``. Both ways of generating use
    it: :func:`run_generation` pulling from :meth:`Model.generate`, and the
    scheduler's continuous batching pushing from a batch decoder.

    When the request asked for log probabilities, each chunk's ``logprobs`` holds
    the tokens of its ``token_ids``. A chunk carries a token's id (and its log
    probabilities) as soon as the token is pushed, though its text may be held back
    (a partial character, the start of a stop sequence); so the token that
    completes a stop sequence is reported, and a stop sequence cuts only text.
    """

    def __init__(self, params: GenerationParams, prompt_tokens: int) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in params.stop_sequences if s)
        self._limit = params.max_new_tokens
        self._logprobs = params.logprobs is not None
        self._prompt_tokens = prompt_tokens
        self._pending = ""  # decoded, not yet emitted
        self.generated = 0
        self.done = False

    def push(self, token: Token | None) -> Chunk:
        """The chunk ``token`` completes; None means the model ended the text."""
        assert not self.done, "the generation already ended"
        if token is None:
            return self._finish([], FinishReason.END_OF_TEXT)
        self.generated += 1
        tokens = [token]
        self._pending += self._decoder.decode(token.data)
        hit = _first_stop(self._pending, self._stops)
        if hit is not None:
            self._pending = self._pending[:hit]
            return self._finish(tokens, FinishReason.STOP_SEQUENCE)
        if self.generated >= self._limit:
            return self._finish(tokens, FinishReason.LENGTH)
        keep = _held_back(self._pending, self._stops)
        cut = len(self._pending) - keep
        ready, self._pending = self._pending[:cut], self._pending[cut:]
        return self._chunk(ready, tokens)

    def cancel(self) -> Chunk:
        """The last chunk of a generation ended early (FinishReason.CANCELLED)."""
        return self._finish([], FinishReason.CANCELLED)

    def _finish(self, tokens: list[Token], reason: FinishReason) -> Chunk:
        self.done = True
        if reason is not FinishReason.STOP_SEQUENCE:
            # A token cut off mid-character at the end shows as U+FFFD, never as an error.
            self._pending += self._decoder.decode(b"", final=True)
        chunk = self._chunk(self._pending, tokens)
        chunk.finish_reason, chunk.usage = reason, Usage(self._prompt_tokens, self.generated)
        return chunk

    def _chunk(self, text: str, tokens: list[Token]) -> Chunk:
        return Chunk(text, [t.id for t in tokens], logprobs=tokens if self._logprobs else [])


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
    assembly = TextAssembly(params, prompt_tokens)
    tokens = iter(model.generate(text, params))
    try:
        while not assembly.done:
            if stop.is_set():
                yield assembly.cancel()
                return
            yield assembly.push(next(tokens, None))
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()
