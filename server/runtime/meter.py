"""What the runtime counts, told to the :class:`Meter` the server passes in.

The runtime and its schedulers say what happened: a request waited in a queue, a
batch ran, a request was refused for lack of room, a generation produced tokens or
ended early. The server's :class:`~protoserve.server.metrics.Metrics` turns that
into Prometheus series; this base class counts nothing, for a runtime made without
metrics (tests, ``LocalClient``). The runtime so stays free of the server's modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

__all__ = ["GenerationMeter", "Meter"]


class GenerationMeter:
    """One generation's counts, from its submission to its end. This one counts nothing."""

    def tokens(self, count: int) -> None:
        """``count`` tokens arrived now, in one chunk (time to the first, gaps between)."""

    def end(self, cancelled: bool) -> None:
        """The generation ended; ``cancelled``: before it finished (its caller left, or
        the server ended it at shutdown)."""


_NOTHING = GenerationMeter()


class Meter:
    """Where the runtime tells what it counts. Every model is named by its served name,
    never its version. This base counts nothing; override what you count."""

    def add_model(
        self,
        name: str,
        depth: Callable[[], int],
        decoding: Callable[[], str | None],
        decodings: Iterable[str],
    ) -> None:
        """A model is served under ``name`` (called once per name): ``depth`` reads its
        queue depth, ``decoding`` how its served version decodes (one of ``decodings``,
        or None), whenever the series are read."""

    def add_placement(self, name: str, placement: Callable[[], tuple[str, str] | None]) -> None:
        """A model is served under ``name`` (called once per name): ``placement`` reads
        where its served version runs, ``(device, dtype)`` (``("cuda:0", "bfloat16")``),
        or None while none is served, whenever the series are read."""

    def queued(self, model: str, seconds: float) -> None:
        """A request of ``model`` waited ``seconds`` in its queue before its first step."""

    def batched(self, model: str, kind: str, size: int) -> None:
        """One model call served ``size`` items: texts (``embed``), rows (``predict``), or
        sequences of one decode step (``generate``)."""

    def instance_used(self, model: str, instance: int) -> None:
        """A request went to instance ``instance`` of a model that has several."""

    def rejected(self, model: str) -> None:
        """A request of ``model`` was refused with RESOURCE_EXHAUSTED: no room."""

    def generation(self, model: str, submitted: float) -> GenerationMeter:
        """A generation of ``model`` is under way, submitted at ``submitted``
        (``time.perf_counter()``); its meter is ended once."""
        return _NOTHING
