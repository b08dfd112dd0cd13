"""Cancelling what nobody waits for: the one watcher of a client's leaving, and the one race.

docs/architecture.md, rule 6: a client that goes away cancels the work behind it.
The gateway learns that a client left from ASGI's ``http.disconnect``
(:func:`disconnected`), and stops the work it was doing for it by racing that
work against the leaving (:func:`race`, as Starlette's ``StreamingResponse`` and
vLLM's ``with_cancellation`` do): a unary call, a stream's first message, a
stream's body, and a drain's receive (``cli._Drain``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

__all__ = ["CLIENT_CLOSED", "disconnected", "race"]

T = TypeVar("T")
log = logging.getLogger("protoserve.gateway")

#: HTTP status for a client that went away (nginx's convention, as grpc-gateway uses).
CLIENT_CLOSED = 499


async def disconnected(receive: Receive) -> None:
    """Returns when the client has gone away (``http.disconnect``).

    Read it only once the request body has been read: other messages are dropped.
    """
    while (await receive())["type"] != "http.disconnect":
        pass


async def race(work: Awaitable[T], stop: Awaitable[object]) -> asyncio.Future[T] | None:
    """Runs ``work`` until it ends or ``stop`` does, whichever comes first.

    Returns:
        ``work``'s future once it has ended (``result()`` gives its value or raises
        its error), or None when ``stop`` ended first: then ``work`` was cancelled.

    The loser is cancelled and awaited before this returns, so its ``finally``
    blocks have run; when the caller itself is cancelled, both are. An error that
    ``stop``, or the loser while it unwound, raised is logged, never lost.
    """
    task = asyncio.ensure_future(work)
    other = asyncio.ensure_future(stop)
    won = False
    try:
        await asyncio.wait({task, other}, return_when=asyncio.FIRST_COMPLETED)
        won = task.done()
    finally:
        losers = [each for each in (task, other) if not each.done()]
        for loser in losers:
            loser.cancel()
        if losers:
            await asyncio.wait(losers)
        for each in (other,) if won else (task, other):
            if each.done() and not each.cancelled() and each.exception() is not None:
                log.error("a raced task failed", exc_info=each.exception())
    return task if won else None
