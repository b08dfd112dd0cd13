"""Driving a :class:`Runtime` directly in a test, as the servicers do (rule 7)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from protoserve.server.runtime import Model, Runtime

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], within: float = 120) -> T:
    """``coro`` on a new event loop, failed after ``within`` seconds rather than hung."""
    return asyncio.run(asyncio.wait_for(coro, within))


@contextlib.asynccontextmanager
async def started(*models: Model | tuple[str, Model], **settings: Any) -> AsyncIterator[Runtime]:
    """A started runtime serving ``models`` (a model alone is served under its class's
    ``name``), closed when the block ends."""
    named = [m if isinstance(m, tuple) else (type(m).name, m) for m in models]
    runtime = Runtime(named, **settings)
    await runtime.start()
    try:
        yield runtime
    finally:
        runtime.close()
