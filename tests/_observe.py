"""What tests watch instead of clocks: conditions another thread brings about, and what a
server counts.

A test never passes or fails on how long something took. It waits for a condition
(the server's counters, a model's events, a queue's depth) and then asserts what
happened. The bound on a wait, ``WITHIN``, only keeps a broken run from hanging: a
condition that comes at all comes long before it, however loaded the machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

#: Seconds a wait may last before the test fails, saying what never happened.
WITHIN = 30.0
_POLL = 0.005


def wait_until(condition: Callable[[], object], what: str, within: float = WITHIN) -> None:
    """Poll ``condition`` until it is true; fail the test, naming ``what``, if it never is."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(_POLL)


async def wait_until_async(
    condition: Callable[[], object], what: str, within: float = WITHIN
) -> None:
    """:func:`wait_until` on an event loop, which runs on between polls."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(_POLL)


def counted(server: Any, name: str, **labels: str) -> float:
    """A sample of an in-process server's metrics (0 before the series has one), as
    ``/metrics`` would show it: ``counted(server, "protoserve_rejections_total", model="m")``.
    """
    value = server.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


class Generations:
    """A model's generations on an in-process server, as its metrics count them."""

    def __init__(self, server: Any, model: str) -> None:
        self.server, self.model = server, model
        self.cancelled_before = self.cancelled()

    def cancelled(self) -> float:
        """Generations counted cancelled so far: their caller left before the end."""
        return counted(self.server, "protoserve_cancellations_total", model=self.model)

    def in_flight(self) -> float:
        """Generations under way."""
        return counted(self.server, "protoserve_streams_in_flight", model=self.model)

    def wait_cancelled(self, count: int = 1) -> None:
        """Wait until ``count`` more generations ended cancelled and none is left on the
        model: none in flight, and its worker holds no job, waiting or running."""
        scheduler = self.server.runtime.get_model(self.model).scheduler
        # At least: a generation an earlier test left behind may be counted meanwhile.
        wait_until(
            lambda: self.cancelled() >= self.cancelled_before + count,
            f"{count} generation(s) of {self.model} counted cancelled",
        )
        wait_until(
            lambda: self.in_flight() == 0 and scheduler.depth + scheduler.active == 0,
            f"no generation of {self.model} left running",
        )


class SlowCancelled:
    """A test's generations of the ``slow`` test model (20 ms a token) that the server is
    to cancel: made before they start, so its counts are the test's own."""

    def __init__(self, server: Any) -> None:
        from tests.server.models_for_tests import Slow

        self.slow = Slow
        Slow.closed.clear()
        self.steps_before = Slow.steps
        self.generations = Generations(server, "slow")

    def wait(self, count: int = 1, *, asked: int = 1000) -> None:
        """Wait until the server counted ``count`` generations cancelled and holds none; the
        model's token iterator was closed, short of the ``asked`` tokens of each."""
        self.generations.wait_cancelled(count)
        assert self.slow.closed.wait(WITHIN), "the model's token iterator was never closed"
        steps = self.slow.steps - self.steps_before
        assert steps < asked * count, steps
