"""Token streams to text: stop sequences, UTF-8 assembly, finish reasons, early stop."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from protoserve.server import GenerationParams, Model, Token
from protoserve.server.runtime.generation import FinishReason, run_generation


class Bytes(Model):
    """Yields the given bytes one token each; records whether it was closed."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.closed = False

    def generate(self, text: str, params: GenerationParams) -> Iterator[Token]:
        try:
            for b in self.data:
                yield Token(b, bytes((b,)))
        finally:
            self.closed = True


def run(data: bytes, *, stops: tuple[str, ...] = (), limit: int = 100, stop=None):
    params = GenerationParams(
        max_new_tokens=limit, temperature=0, top_k=0, top_p=1, seed=0, stop_sequences=stops
    )
    model = Bytes(data)
    chunks = list(
        run_generation(model, "", params, prompt_tokens=3, stop=stop or threading.Event())
    )
    return model, chunks


def test_every_step_is_a_chunk_and_the_last_has_finish_and_usage() -> None:
    model, chunks = run(b"abc")
    assert [c.text for c in chunks] == ["a", "b", "c", ""]
    assert [c.token_ids for c in chunks] == [[97], [98], [99], []]
    assert chunks[-1].finish_reason is FinishReason.END_OF_TEXT
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 3)
    assert all(c.finish_reason is None for c in chunks[:-1]) and model.closed


def test_multibyte_characters_arrive_whole() -> None:
    _, chunks = run("aé🙂".encode())
    texts = [c.text for c in chunks]
    assert texts == ["a", "", "é", "", "", "", "🙂", ""]
    assert sum(len(c.token_ids) for c in chunks) == len("aé🙂".encode())


def test_stop_sequence_spanning_tokens_is_held_back_then_cut() -> None:
    model, chunks = run(b"one END two", stops=("END",))
    assert "".join(c.text for c in chunks) == "one "
    assert all("E" not in c.text for c in chunks)
    assert chunks[-1].finish_reason is FinishReason.STOP_SEQUENCE
    assert chunks[-1].usage.completion_tokens == len("one END")
    assert model.closed, "the model's iterator must be closed when a stop sequence ends it"


def test_false_start_of_a_stop_sequence_is_released() -> None:
    _, chunks = run(b"ENtire", stops=("END",))
    assert "".join(c.text for c in chunks) == "ENtire"
    assert chunks[-1].finish_reason is FinishReason.END_OF_TEXT


def test_earliest_of_several_stop_sequences_wins() -> None:
    _, chunks = run(b"xx ab cd", stops=("cd", "b c"))
    assert "".join(c.text for c in chunks) == "xx a"


def test_length_limit() -> None:
    model, chunks = run(b"abcdef", limit=2)
    assert "".join(c.text for c in chunks) == "ab"
    assert chunks[-1].finish_reason is FinishReason.LENGTH and model.closed


# A stop sequence against the length limit: the token that completes it may be the last
# one allowed. The stop is checked first: the text ends before it, as everywhere else.
def test_a_stop_completed_by_the_last_allowed_token_ends_the_text_before_it() -> None:
    _, chunks = run(b"one END two", stops=("END",), limit=len("one END"))
    assert "".join(c.text for c in chunks) == "one "
    assert chunks[-1].finish_reason is FinishReason.STOP_SEQUENCE
    assert chunks[-1].usage.completion_tokens == len("one END")


def test_a_multibyte_stop_completed_by_the_last_allowed_byte() -> None:
    data = "ab🙂c".encode()
    _, chunks = run(data, stops=("b🙂",), limit=len("ab🙂".encode()))
    assert "".join(c.text for c in chunks) == "a"
    assert chunks[-1].finish_reason is FinishReason.STOP_SEQUENCE


def test_a_limit_inside_the_last_character_of_a_stop_releases_what_was_held() -> None:
    """Three of 🙂's four bytes: the stop never completed, so the held-back "b" is text
    after all, and the cut character shows as U+FFFD."""
    data = "ab🙂c".encode()
    _, chunks = run(data, stops=("b🙂",), limit=len("ab🙂".encode()) - 1)
    assert "".join(c.text for c in chunks) == "ab\ufffd"
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert chunks[-1].usage.completion_tokens == len("ab🙂".encode()) - 1


def test_stop_event_ends_with_cancelled() -> None:
    stop = threading.Event()
    params = GenerationParams(max_new_tokens=100, temperature=0, top_k=0, top_p=1, seed=0)
    model = Bytes(b"abcdef")
    steps = run_generation(model, "", params, prompt_tokens=0, stop=stop)
    assert next(steps).text == "a"
    stop.set()
    last = next(steps)
    assert last.finish_reason is FinishReason.CANCELLED and last.usage.completion_tokens == 1
    with pytest.raises(StopIteration):
        next(steps)
    assert model.closed


def test_invalid_utf8_from_a_model_becomes_replacement_characters() -> None:
    _, chunks = run(b"a\xffb")
    assert "".join(c.text for c in chunks) == "a\ufffdb"
