"""Log probabilities in OpenAI's two layouts: chat's per-token list, completions' parallel lists.

A token is bytes, not always whole UTF-8 characters (a byte-level model writes
``é`` as two tokens). Its text is its bytes decoded as UTF-8 with every byte that
is not part of a whole character written as a ``\\xNN`` escape (the proto's
rule), and its ``bytes`` are the bytes themselves, so a client can join them.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from protoserve.openai.v1 import openai_service_pb2 as pb
from protoserve.server.runtime.model import Token

__all__ = ["TextOffsets", "chat_logprobs", "completion_logprobs", "token_text"]


def token_text(data: bytes) -> str:
    """A token's text: its UTF-8, with each byte of no whole character as ``\\xNN``."""
    return data.decode("utf-8", "backslashreplace")


def _logprob(token: Token) -> float:
    if token.logprob is None:
        # The runtime asked for it: a model that claims supports_logprobs must fill it.
        raise RuntimeError(f"the model returned token {token.id} without its log probability")
    return token.logprob


def chat_logprobs(tokens: Sequence[Token]) -> pb.ChoiceLogprobs:
    """Chat's layout: one entry per token, each with its alternatives (as many as the
    request asked the runtime for), most likely first."""
    return pb.ChoiceLogprobs(
        content=[
            pb.TokenLogprob(
                token=token_text(token.data),
                logprob=_logprob(token),
                bytes=token.data,
                top_logprobs=[
                    pb.TopLogprob(token=token_text(c.data), logprob=c.logprob, bytes=c.data)
                    for c in token.top_logprobs
                ],
            )
            for token in tokens
        ]
    )


class TextOffsets:
    """Where each token of one choice starts in the choice's text, in characters.

    The text is decoded as the runtime decodes it (UTF-8, incrementally, a bad byte
    as one U+FFFD), so the offsets count the characters a client receives. A token
    that starts inside a character (its second byte) starts where the character
    does. Fed every token of the choice in order, across a stream's chunks.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0

    def start_of(self, data: bytes) -> int:
        """The offset of the token whose bytes are ``data``, the choice's next token."""
        start = self._chars
        self._chars += len(self._decoder.decode(data))
        return start


def completion_logprobs(tokens: Sequence[Token], offsets: TextOffsets) -> pb.CompletionLogprobs:
    """Completions' layout: parallel lists, one entry per token; each position's
    alternatives as a map from text to log probability (two alternatives with one
    text keep the more likely)."""
    alternatives = []
    for token in tokens:
        found: dict[str, float] = {}
        for choice in token.top_logprobs:
            found.setdefault(token_text(choice.data), choice.logprob)
        alternatives.append(pb.TokenAlternatives(logprobs=found))
    return pb.CompletionLogprobs(
        tokens=[token_text(t.data) for t in tokens],
        token_logprobs=[_logprob(t) for t in tokens],
        top_logprobs=alternatives,
        text_offset=[offsets.start_of(t.data) for t in tokens],
    )
