"""A draining server decides a call's fate when it arrives (ADR 4's amendment).

``Runtime.admit`` is asked by the transport as each call arrives, in the call's own
context: a call admitted before the drain is served to its end, and the drain waits for
it (its request may still be on its way); one that arrives during the drain is refused
with ``Draining`` (UNAVAILABLE, which the transport answers without headers). Asked in
an event loop, as the server does, with the contexts of separate tasks.
"""

from __future__ import annotations

import asyncio
import contextvars
import struct
import time

import grpc
import pytest

from protoserve.server.runtime.errors import Draining
from protoserve.server.runtime.tensors import RawTensor
from tests.server._runtime import run, started
from tests.server.models_for_tests import Doubler

X = [RawTensor("x", "float32", (1,), struct.pack("<f", 1.0))]


def test_an_admitted_call_is_served_across_the_drain_and_the_drain_waits_for_it() -> None:
    async def main() -> None:
        async with started(Doubler()) as runtime:
            admitted, other = contextvars.copy_context(), contextvars.copy_context()
            assert admitted.run(runtime.admit)  # the call arrives; its request is read...
            assert other.run(runtime.admit)  # (and another one)
            runtime.begin_drain()  # ... while the drain begins
            assert not await runtime.wait_idle(0.05), "the drain did not wait for the call"

            async def served() -> bytes:
                try:
                    (y,) = await runtime.predict("doubler", X, {})
                    return y.data
                finally:
                    runtime.release()

            loop = asyncio.get_running_loop()
            # The other call is served and ends: the first is still arriving.
            assert await loop.create_task(served(), context=other) == struct.pack("<f", 2.0)
            assert not await runtime.wait_idle(0.05), "the drain forgot the arriving call"
            assert await loop.create_task(served(), context=admitted) == struct.pack("<f", 2.0)
            assert await runtime.wait_idle(1)

            late = contextvars.copy_context()
            assert not late.run(runtime.admit)
            refused = asyncio.get_running_loop().create_task(
                runtime.predict("doubler", X, {}), context=late
            )
            with pytest.raises(Draining) as error:
                await refused
            assert error.value.code is grpc.StatusCode.UNAVAILABLE
            # Work that never came through the transport is refused too.
            with pytest.raises(Draining):
                await runtime.predict("doubler", X, {})

    run(main())


def test_the_quiet_wait_ends_after_the_last_late_call_or_at_its_bound() -> None:
    async def main() -> None:
        async with started(Doubler()) as runtime:
            runtime.begin_drain()
            start = time.monotonic()
            assert await runtime.wait_unasked(0.2, within=5)
            assert 0.15 <= time.monotonic() - start < 5
            # A caller that keeps arriving (one that does not watch health) is waited
            # for only as long as the bound.
            stop = asyncio.Event()

            async def keep_calling() -> None:
                while not stop.is_set():
                    contextvars.copy_context().run(runtime.admit)
                    await asyncio.sleep(0.02)

            caller = asyncio.get_running_loop().create_task(keep_calling())
            await asyncio.sleep(0.05)  # its first call has come
            start = time.monotonic()
            assert not await runtime.wait_unasked(0.2, within=0.5)
            assert time.monotonic() - start >= 0.45
            stop.set()
            await caller

    run(main())
