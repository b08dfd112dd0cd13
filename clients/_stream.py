"""A streamed generation, chunk by chunk: one class per I/O flavour, for every transport.

:class:`TextStream` (blocking) and :class:`AsyncTextStream` (asyncio) are what
``generate_stream`` returns, whatever carries the call. A transport gives them a
*source*: the call's steps as :data:`~protoserve.clients._convert.StreamPart`
tuples, its failure already a typed error, and a way to cancel it
(:class:`Source`, :class:`AsyncSource`). The stream records what the steps say
(:class:`StreamRecord`) and ties the call's life to the loop that reads it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import Protocol

from ._closing import AsyncClosing, Closing
from ._convert import StreamPart
from ._types import FinishReason, Usage

__all__ = ["AsyncSource", "AsyncTextStream", "Source", "StreamRecord", "TextStream"]


class Source(Protocol):
    """A streaming call as a transport hands it to :class:`TextStream`."""

    def __iter__(self) -> Generator[StreamPart, None, None]:
        """The call's steps as they arrive; its failure as a typed error.

        Closing the generator before its end ends the call.
        """
        ...

    def cancel(self) -> None:
        """End the call while its steps are being read; reading then stops quietly."""
        ...


class AsyncSource(Protocol):
    """A streaming call as a transport hands it to :class:`AsyncTextStream`."""

    def __aiter__(self) -> AsyncGenerator[StreamPart, None]:
        """The call's steps as they arrive (see :meth:`Source.__iter__`)."""
        ...

    def cancel(self) -> None:
        """Start ending the call (see :meth:`Source.cancel`); :meth:`aclose` waits for it."""
        ...

    async def aclose(self) -> None:
        """Wait until what :meth:`cancel` started is done."""
        ...


class StreamRecord:
    """Text, token ids, finish reason and usage, gathered as the parts arrive.

    ``finish_reason`` and ``usage`` are set by the last part of a stream.
    """

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._parts: list[str] = []
        self.finish_reason: FinishReason | None = None
        self.usage: Usage | None = None
        self._started = False
        self._cancelled = False
        self._done = False

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The ids of the tokens received so far."""
        return tuple(self._ids)

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._parts)

    def _add(
        self,
        text: str,
        ids: tuple[int, ...],
        finish_reason: FinishReason | None,
        usage: Usage | None,
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

    def _mark_cancelled(self) -> bool:
        """Whether this cancels the stream (it had neither ended nor been cancelled)."""
        if self._done or self._cancelled:
            return False
        self._cancelled = True
        self.finish_reason = self.finish_reason or FinishReason.CANCELLED
        return True


class TextStream(StreamRecord, Closing):
    """The text of a streamed generation, chunk by chunk, as it is produced.

    Iterate it once: ``for chunk in stream`` yields non-empty ``str`` chunks.
    Leaving the loop early (``break``, an exception) cancels the call, and with
    it the generation on the server, at once; so do :meth:`cancel`, leaving a
    ``with`` block and closing the client. After the end, ``finish_reason``,
    ``usage`` and ``token_ids`` describe the whole generation.

    Raises (while iterating):
        ProtoserveError: the typed error the call ended with.
    """

    def __init__(self, source: Source) -> None:
        super().__init__()
        self._source = source
        self._next: Iterator[str] | None = None

    def __iter__(self) -> Iterator[str]:
        # A generator, so that a `for` loop that breaks drops it and its
        # `finally` cancels the call, even while the stream itself is still
        # referenced by the caller.
        if self._started or self._cancelled:
            return
        self._started = True
        parts = iter(self._source)
        try:
            for part in parts:
                if text := self._add(*part):
                    yield text
            self._done = True
        finally:
            self._mark_cancelled()
            parts.close()

    def __next__(self) -> str:
        if self._next is None:
            self._next = iter(self)
        return next(self._next)

    def cancel(self) -> None:
        """Cancel the call; the server stops generating. Harmless after the end.

        Over HTTP this closes the response, and the gateway cancels the call.
        """
        if self._mark_cancelled():
            self._source.cancel()

    close = cancel


class AsyncTextStream(StreamRecord, AsyncClosing):
    """The asyncio twin of :class:`TextStream`: ``async for chunk in stream``.

    The model is resolved and the call started on the first iteration. Leaving
    the loop early cancels it when asyncio finalizes the dropped iterator (a
    loop iteration or so later); :meth:`cancel`, :meth:`aclose`, leaving an
    ``async with`` block and closing the client cancel it at once.
    """

    def __init__(
        self, model: Callable[[], Awaitable[str]], start: Callable[[str], AsyncSource]
    ) -> None:
        super().__init__()
        self._model = model
        self._start = start
        self._source: AsyncSource | None = None
        self._next: AsyncIterator[str] | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        if self._started or self._cancelled:
            return
        self._started = True
        parts: AsyncGenerator[StreamPart, None] | None = None
        try:
            model = await self._model()
            if self._cancelled:
                return
            self._source = self._start(model)
            parts = aiter(self._source)
            async for part in parts:
                if text := self._add(*part):
                    yield text
            self._done = True
        finally:
            self._mark_cancelled()
            if parts is not None:
                await parts.aclose()

    async def __anext__(self) -> str:
        if self._next is None:
            self._next = aiter(self)
        return await anext(self._next)

    def cancel(self) -> None:
        """Cancel the call; the server stops generating. Harmless after the end.

        Over HTTP this starts closing the response; :meth:`aclose` waits until
        it is closed.
        """
        if self._mark_cancelled() and self._source is not None:
            self._source.cancel()

    async def aclose(self) -> None:
        """Cancel the call (see :meth:`cancel`) and wait until it is closed."""
        self.cancel()
        if self._source is not None:
            await self._source.aclose()
