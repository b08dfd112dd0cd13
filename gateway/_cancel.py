"""Cancelling what nobody waits for: the one watcher of a client's leaving, and the one race.

docs/architecture.md, rule 6: a client that goes away cancels the work behind it.
The gateway learns that a client left from ASGI's ``http.disconnect``
(:func:`disconnected`), and stops the work it was doing for it by racing that
work against the leaving (:func:`race`, as Starlette's ``StreamingResponse`` and
vLLM's ``with_cancellation`` do): a unary call, a stream's first message, a
stream's body. A drain (``cli._Drain``) ends a request by making its ``receive``
answer ``http.disconnect``, which the same race then sees.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

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
        await _ended(task, other, count=1)
        won = task.done()
    finally:
        losers = [each for each in (task, other) if not each.done()]
        for loser in losers:
            loser.cancel()
        if losers:
            await _ended(*losers, count=len(losers))
        for each in (other,) if won else (task, other):
            if each.done() and not each.cancelled() and each.exception() is not None:
                log.error("a raced task failed", exc_info=each.exception())
    return task if won else None


async def _ended(*futures: asyncio.Future[Any], count: int) -> None:
    """Returns once ``count`` of ``futures`` have ended, as ``asyncio.wait`` would (a cancel
    of the caller is raised, and leaves them running), without its sets and copies: this
    runs two or three times on every request."""
    waiter = futures[0].get_loop().create_future()
    left = count

    def ended(_: object) -> None:
        nonlocal left
        left -= 1
        if left <= 0 and not waiter.done():
            waiter.set_result(None)

    for future in futures:
        future.add_done_callback(ended)
    try:
        await waiter
    finally:
        for future in futures:
            future.remove_done_callback(ended)
