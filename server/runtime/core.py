"""The transport-independent core: every servicer converts messages and calls this.

The runtime holds the models, their states and their schedulers; it validates
requests, runs them in the models' worker threads, counts requests in flight
and drains them at shutdown. It raises only :mod:`protoserve.server.errors`
for request problems.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from protoserve.server.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from protoserve.server.metrics import Metrics
from protoserve.server.runtime.generation import Chunk, FinishReason, Usage, run_generation
from protoserve.server.runtime.model import Model, Task
from protoserve.server.runtime.params import validate_generation
from protoserve.server.runtime.scheduler import Scheduler
from protoserve.server.runtime.tensors import RawTensor, from_raw, to_raw

__all__ = ["GenerateResult", "ModelEntry", "ModelState", "Runtime"]

log = logging.getLogger("protoserve.server")

T = TypeVar("T")

_TASK_NAMES = {
    Task.TEXT_GENERATION: "text generation (Generate, GenerateStream)",
    Task.EMBEDDING: "embedding (Embed)",
    Task.TENSOR_PREDICTION: "tensor prediction (Predict)",
}


class ModelState(enum.Enum):
    """Where a model is in its life on the server."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class ModelEntry:
    """A model as the runtime holds it."""

    name: str
    model: Model
    scheduler: Scheduler
    state: ModelState = ModelState.LOADING
    state_message: str = "loading"


@dataclass
class GenerateResult:
    """A whole generation."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.LENGTH
    usage: Usage = field(default_factory=lambda: Usage(0, 0))


class Runtime:
    """Holds the models and serves requests on them.

    Args:
        models: ``(served name, model)`` pairs, in the order ListModels reports them.
        max_queue: per model, most requests waiting; more get RESOURCE_EXHAUSTED.
        max_active: per model, most requests stepped in turn at once.
        on_change: called (on the event loop) whenever a model's state or the
            server's readiness changes; the health service listens here.
        metrics: where to count queueing, tokens, cancellations and rejections;
            None for no metrics.
    """

    def __init__(
        self,
        models: Sequence[tuple[str, Model]],
        *,
        max_queue: int = 64,
        max_active: int = 8,
        on_change: Callable[[], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._entries: dict[str, ModelEntry] = {}
        self.metrics = metrics
        for name, model in models:
            if name in self._entries:
                raise ValueError(f"two models are named {name!r}")
            scheduler = Scheduler(name, max_queue=max_queue, max_active=max_active)
            self._entries[name] = ModelEntry(name, model, scheduler)
            if metrics is not None:
                metrics.add_model(name, _depth_of(scheduler))
        self._on_change = on_change or (lambda: None)
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # Life cycle.
    async def start(self) -> None:
        """Load and warm up every model, each in its own worker thread, all at once.

        A model that fails to load is FAILED (its message says why); the others serve.
        """
        await asyncio.gather(*(self._load(entry) for entry in self._entries.values()))

    async def _load(self, entry: ModelEntry) -> None:
        started = time.perf_counter()

        def load() -> None:
            entry.model.load()
            entry.model.warmup()

        try:
            await entry.scheduler.run(load)
        except Exception as exc:
            log.exception("model %s failed to load", entry.name)
            entry.state, entry.state_message = ModelState.FAILED, f"failed to load: {exc}"
        else:
            entry.state, entry.state_message = ModelState.READY, "ready"
            log.info("model %s ready in %.2fs", entry.name, time.perf_counter() - started)
        self._on_change()

    @property
    def ready(self) -> bool:
        """True when every model is READY and the server is not shutting down."""
        return not self._draining and all(
            e.state is ModelState.READY for e in self._entries.values()
        )

    @property
    def in_flight(self) -> int:
        """Requests being served now."""
        return self._in_flight

    def begin_drain(self) -> None:
        """Refuse new requests with UNAVAILABLE; those in flight go on."""
        self._draining = True
        self._on_change()

    async def wait_idle(self, within: float) -> bool:
        """Wait until no request is in flight; False when ``within`` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), within)
        except TimeoutError:
            return False
        return True

    def stop_generations(self) -> None:
        """End every generation in flight at its next step, with FinishReason.CANCELLED."""
        for entry in self._entries.values():
            entry.scheduler.request_stop()

    def close(self) -> None:
        """Stop every model's worker thread."""
        for entry in self._entries.values():
            entry.scheduler.close()

    # Requests.
    def list_models(self) -> list[ModelEntry]:
        """Every model, ready or not, in configuration order."""
        return list(self._entries.values())

    def get_model(self, name: str) -> ModelEntry:
        """The named model. Raises NotFound naming the models there are."""
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self._entries)) or "none"
            raise NotFound(
                f"model {name!r} not found; models on this server: {known}",
                resource_type="model",
                resource_name=name,
            )
        return entry

    def _serving(self, name: str, task: Task) -> ModelEntry:
        if self._draining:
            raise Unavailable("the server is shutting down; retry on another instance")
        if not name:
            raise InvalidArgument.field("model", "must name a model")
        entry = self.get_model(name)
        if entry.state is not ModelState.READY:
            raise Unavailable(f"model {name!r} is not ready: {entry.state_message}")
        if task not in entry.model.tasks():
            raise InvalidArgument.field(
                "model", f"model {name!r} does not serve {_TASK_NAMES[task]}"
            )
        return entry

    @contextlib.contextmanager
    def _request(self) -> Iterator[None]:
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def _prompt_tokens(self, entry: ModelEntry, text: str, field: str) -> int:
        count = entry.model.count_tokens(text)
        limit = entry.model.max_input_tokens
        if count > limit:
            raise InvalidArgument.field(
                field, f"is {count} tokens; the model takes at most {limit}"
            )
        return count

    async def generate_stream(
        self, model: str, text: str, parameters: Mapping[str, Any]
    ) -> AsyncGenerator[Chunk, None]:
        """Chunks of a generation as they are produced; the last has finish reason and usage.

        Leaving the iteration early cancels the generation before its next step.
        """
        with self._request():
            entry = self._serving(model, Task.TEXT_GENERATION)
            params = validate_generation(entry.model, parameters)
            prompt_tokens = self._prompt_tokens(entry, text, "inputs")
            job: Any = None
            metrics = self.metrics
            submitted = time.perf_counter()

            def factory() -> Iterator[Chunk]:
                if metrics is not None:
                    metrics.queue_seconds.labels(model).observe(time.perf_counter() - submitted)
                return run_generation(
                    entry.model, text, params, prompt_tokens=prompt_tokens, stop=job.stop
                )

            job = self._submit(entry, factory)
            if metrics is None:
                async for chunk in entry.scheduler.stream(job):
                    yield chunk
                return
            # aclosing: leaving early reaches the job (and cancels it) at once, not at GC.
            measured = self._measured(model, submitted, entry.scheduler.stream(job))
            async with contextlib.aclosing(measured):
                async for chunk in measured:
                    yield chunk

    async def _measured(
        self, model: str, submitted: float, chunks: AsyncGenerator[Chunk, None]
    ) -> AsyncGenerator[Chunk, None]:
        """``chunks``, timed and counted: tokens, time to first token, inter-token latency."""
        assert self.metrics is not None
        m = self.metrics
        in_flight = m.streams_in_flight.labels(model)
        tokens, ttft, gaps = (
            m.tokens.labels(model),
            m.time_to_first_token.labels(model),
            m.inter_token_seconds.labels(model),
        )
        last: float | None = None
        finished = cancelled = False
        in_flight.inc()
        try:
            async for chunk in chunks:
                if chunk.token_ids:
                    now = time.perf_counter()
                    tokens.inc(len(chunk.token_ids))
                    if last is None:
                        ttft.observe(now - submitted)
                    else:
                        gaps.observe(now - last)
                    last = now
                if chunk.finish_reason is not None:
                    finished = True
                    # Shutdown ended it early (stop_generations).
                    cancelled = chunk.finish_reason is FinishReason.CANCELLED
                yield chunk
        except (GeneratorExit, asyncio.CancelledError):
            # The caller left before the end; a model error is not a cancellation.
            cancelled = cancelled or not finished
            raise
        finally:
            await chunks.aclose()
            in_flight.dec()
            if cancelled:
                m.cancellations.labels(model).inc()

    def _submit(self, entry: ModelEntry, factory: Callable[[], Iterator[Any]]) -> Any:
        try:
            return entry.scheduler.submit(factory)
        except ResourceExhausted:
            if self.metrics is not None:
                self.metrics.rejections.labels(entry.name).inc()
            raise

    async def _run(self, entry: ModelEntry, fn: Callable[[], T]) -> T:
        """``fn`` as one step in the model's thread, its queue time and rejection counted."""
        metrics = self.metrics
        if metrics is None:
            return await entry.scheduler.run(fn)
        submitted = time.perf_counter()

        def timed() -> T:
            metrics.queue_seconds.labels(entry.name).observe(time.perf_counter() - submitted)
            return fn()

        try:
            return await entry.scheduler.run(timed)
        except ResourceExhausted:
            metrics.rejections.labels(entry.name).inc()
            raise

    async def generate(
        self, model: str, text: str, parameters: Mapping[str, Any]
    ) -> GenerateResult:
        """A whole generation at once."""
        result = GenerateResult("")
        parts: list[str] = []
        async for chunk in self.generate_stream(model, text, parameters):
            parts.append(chunk.text)
            result.token_ids.extend(chunk.token_ids)
            if chunk.finish_reason is not None and chunk.usage is not None:
                result.finish_reason, result.usage = chunk.finish_reason, chunk.usage
        result.text = "".join(parts)
        return result

    async def embed(
        self, model: str, texts: Sequence[str], *, normalize: bool = True
    ) -> tuple[torch.Tensor, Usage]:
        """One float32 vector per text, shape ``[len(texts), dim]``, and the token usage."""
        with self._request():
            entry = self._serving(model, Task.EMBEDDING)
            if not texts:
                raise InvalidArgument.field("inputs", "must hold at least one text")
            limit = entry.model.max_batch_texts
            if len(texts) > limit:
                raise InvalidArgument.field(
                    "inputs", f"holds {len(texts)} texts; the model takes at most {limit}"
                )
            tokens = sum(self._prompt_tokens(entry, t, f"inputs[{i}]") for i, t in enumerate(texts))
            batch = list(texts)

            def run() -> torch.Tensor:
                vectors = entry.model.embed(batch)
                if not isinstance(vectors, torch.Tensor) or vectors.shape[:1] != (len(batch),):
                    raise TypeError(
                        f"{type(entry.model).__name__}.embed returned "
                        f"{getattr(vectors, 'shape', type(vectors))} for {len(batch)} texts"
                    )
                vectors = vectors.detach().to("cpu", torch.float32).reshape(len(batch), -1)
                if normalize:
                    vectors = torch.nn.functional.normalize(vectors, dim=-1)
                return vectors

            return await self._run(entry, run), Usage(tokens, 0)

    async def predict(
        self, model: str, inputs: Sequence[RawTensor], parameters: Mapping[str, Any]
    ) -> list[RawTensor]:
        """Run a model on named tensors; outputs come back raw, in the model's order."""
        with self._request():
            entry = self._serving(model, Task.TENSOR_PREDICTION)
            tensors = from_raw(inputs)
            _check_declared(entry.model, tensors)
            params = dict(parameters)

            def run() -> list[RawTensor]:
                outputs = entry.model.predict(tensors, params)
                return [to_raw(name, value) for name, value in outputs.items()]

            return await self._run(entry, run)


def _depth_of(scheduler: Scheduler) -> Callable[[], int]:
    return lambda: scheduler.depth


def _check_declared(model: Model, tensors: Mapping[str, torch.Tensor]) -> None:
    """Inputs against the model's declared inputs, when it declares any."""
    if not model.inputs:
        return
    from protoserve.server.runtime.tensors import DTYPES

    violations = []
    declared = {spec.name: spec for spec in model.inputs}
    for name in tensors.keys() - declared.keys():
        violations.append(("inputs", f"unknown input {name!r}; the model takes {sorted(declared)}"))
    for name, spec in declared.items():
        tensor = tensors.get(name)
        if tensor is None:
            violations.append(("inputs", f"missing input {name!r}"))
            continue
        if DTYPES.get(spec.dtype) not in (None, tensor.dtype):
            violations.append((f"inputs[{name}].data_type", f"must be {spec.dtype}"))
        shape = tuple(tensor.shape)
        if len(shape) != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
        ):
            violations.append(
                (f"inputs[{name}].shape", f"must match {list(spec.shape)}, got {list(shape)}")
            )
    if violations:
        raise InvalidArgument(
            "invalid inputs: " + "; ".join(f"{f} {d}" for f, d in violations), violations
        )
