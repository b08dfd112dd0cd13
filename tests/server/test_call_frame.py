"""The call frame's headers (server/calls.py, ``_Headers``): sent without the call
waiting, whatever the coroutine that sends them does."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from protoserve.server import calls


class _Context:
    """What ``_Headers`` uses of a servicer context: ``send_initial_metadata``."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.sent: list[Any] = []
        self.future: asyncio.Future[None] | None = None

    async def send_initial_metadata(self, metadata: Any) -> None:
        if self.how == "future":  # grpc.aio's: a batch's future, set when it ends
            self.future = asyncio.get_running_loop().create_future()
            await self.future
        elif self.how == "yield":  # a bare yield to the loop
            await asyncio.sleep(0)
        elif self.how == "fails":
            raise RuntimeError("stopped")
        self.sent.append(tuple(metadata))


@pytest.mark.parametrize("how", ["future", "yield", "at once"])
def test_headers_are_sent_once_whatever_the_coroutine_awaits(how: str) -> None:
    asyncio.run(_sent_once(how))


async def _sent_once(how: str) -> None:
    context = _Context(how)
    headers = calls._Headers(context, "rid-1")  # type: ignore[arg-type]
    if context.future is not None:
        asyncio.get_running_loop().call_soon(context.future.set_result, None)
    await headers.sent()
    await headers.sent()
    assert context.sent == [(("x-request-id", "rid-1"),)]


def test_a_batch_that_ended_before_the_response_costs_no_wait() -> None:
    asyncio.run(_ended_before())


async def _ended_before() -> None:
    context = _Context("future")
    headers = calls._Headers(context, "rid-2")  # type: ignore[arg-type]
    assert context.future is not None
    context.future.set_result(None)
    await headers.sent()
    assert context.sent == [(("x-request-id", "rid-2"),)]


def test_a_failed_send_is_raised_where_the_call_waits_for_it() -> None:
    async def failed() -> None:
        headers = calls._Headers(_Context("fails"), "rid-3")  # type: ignore[arg-type]
        await headers.sent()

    with pytest.raises(RuntimeError, match="stopped"):
        asyncio.run(failed())


def test_dropped_headers_leave_no_unretrieved_error(caplog: pytest.LogCaptureFixture) -> None:
    async def dropped() -> None:
        context = _Context("future")
        headers = calls._Headers(context, "rid-4")  # type: ignore[arg-type]
        headers.drop()
        assert context.future is not None
        context.future.set_exception(RuntimeError("batch failed"))
        await asyncio.sleep(0)
        del headers, context
        gc.collect()

    asyncio.run(dropped())
    gc.collect()
    assert "never retrieved" not in caplog.text
