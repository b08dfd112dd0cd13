"""What a streamed generation has said so far: the part every stream class shares."""

from __future__ import annotations

from collections.abc import Sequence

from protoserve.inference.v1 import inference_service_pb2 as pb

from . import _convert
from ._types import FinishReason, Usage

__all__ = ["StreamRecord"]


class StreamRecord:
    """Text, token ids, finish reason and usage, gathered as the parts arrive.

    ``finish_reason`` and ``usage`` are set by the last part of a stream.
    """

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._parts: list[str] = []
        self.finish_reason: FinishReason | None = None
        self.usage: Usage | None = None

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The ids of the tokens received so far."""
        return tuple(self._ids)

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._parts)

    def _add(
        self, text: str, ids: Sequence[int], finish_reason: FinishReason | None, usage: Usage | None
    ) -> str:
        """Record one part; returns its text ("" when it carried none)."""
        self._ids.extend(ids)
        if finish_reason is not None:
            self.finish_reason = finish_reason
        if usage is not None:
            self.usage = usage
        if text:
            self._parts.append(text)
        return text

    def _record(self, message: pb.GenerateStreamResponse) -> str:
        """Record one stream message; returns its text."""
        return self._add(*_convert.stream_part(message))
