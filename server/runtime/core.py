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
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from protoserve.server.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from protoserve.server.metrics import Metrics
from protoserve.server.runtime.generation import Chunk, FinishReason, Usage, run_generation
from protoserve.server.runtime.model import BatchDecoder, GenerationParams, Model, Task
from protoserve.server.runtime.params import validate_generation
from protoserve.server.runtime.scheduler import Scheduler
from protoserve.server.runtime.tensors import RawTensor, from_raw, to_raw

__all__ = ["GenerateResult", "IndexEntry", "ModelEntry", "ModelState", "Runtime"]

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
    #: The version served; "1" for a model given without versions.
    version: str = "1"


@dataclass(frozen=True)
class IndexEntry:
    """One model version of the model repository, loaded or not (RepositoryIndex).

    ``state`` is one of READY, LOADING, UNLOADING or UNAVAILABLE (the Open Inference
    Protocol's words); ``reason`` says why when it is not READY.
    """

    name: str
    version: str
    state: str
    reason: str = ""


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
        max_active: int = 32,
        batching: bool = True,
        max_batch_size: int | None = None,
        max_batch_delay: float | None = None,
        max_streams: int = 256,
        on_change: Callable[[], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._entries: dict[str, ModelEntry] = {}
        self.metrics = metrics
        self.batching = batching
        self.max_streams = max_streams
        self._streams = 0
        for name, model in models:
            if name in self._entries:
                raise ValueError(f"two models are named {name!r}")
            batch_size = max_batch_size if max_batch_size is not None else model.max_batch_size
            delay = max_batch_delay if max_batch_delay is not None else model.max_batch_delay
            scheduler = Scheduler(
                name,
                max_queue=max_queue,
                max_active=max_active,
                max_batch_size=batch_size if batching else 1,
                max_batch_delay=delay,
                metrics=metrics,
            )
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

        scheduler = entry.scheduler
        batching = self.batching

        def load() -> None:
            entry.model.load()
            entry.model.warmup()
            decoder = entry.model.batch_decoder(scheduler.max_active) if batching else None
            if decoder is not None:
                _warm_up_decoder(decoder)
                scheduler.decoder = decoder

        try:
            await entry.scheduler.run(load, request=False)
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

    def model_ready(self, name: str, version: str = "") -> bool:
        """True when the model (that version; "" for the latest) is READY (loaded and run
        once) and the server is not draining."""
        entry = self._entries.get(name)
        if entry is None or (version and version != entry.version):
            return False
        return not self._draining and entry.state is ModelState.READY

    def versions(self, name: str) -> list[str]:
        """The versions of a model the server holds, oldest first. Raises NotFound."""
        return [self.get_model(name).version]

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

    def get_model(self, name: str, version: str = "") -> ModelEntry:
        """The named model (that version; "" for the latest). Raises NotFound naming the
        models, or the versions, there are."""
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self._entries)) or "none"
            raise NotFound(
                f"model {name!r} not found; models on this server: {known}",
                resource_type="model",
                resource_name=name,
            )
        if version and version != entry.version:
            raise NotFound(
                f"model {name!r} has no version {version!r}; versions: {entry.version}",
                resource_type="model version",
                resource_name=f"{name}/{version}",
            )
        return entry

    # The model repository (the Open Inference Protocol's repository extension).
    def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model version of the repository, loaded or not; only READY ones with
        ``ready_only``. Raises FailedPrecondition when the server has no repository."""
        raise FailedPrecondition("the server has no model repository (--model-repository)")

    async def load_model(self, name: str) -> None:
        """Load (or reload) a model from the repository; returns once it is READY.

        Raises:
            FailedPrecondition: no repository, or model control is off.
            NotFound: the repository has no such model.
            InvalidArgument: its folder is malformed (the message says how).
            Unavailable: it failed to load (the message says why).
        """
        raise FailedPrecondition("the server has no model repository (--model-repository)")

    async def unload_model(self, name: str) -> None:
        """Stop serving a model: new requests are refused, those in flight finish, then
        its worker thread stops. Raises NotFound, or FailedPrecondition as load_model."""
        raise FailedPrecondition("the server has no model repository (--model-repository)")

    def _serving(self, name: str, task: Task, version: str = "") -> ModelEntry:
        if self._draining:
            raise Unavailable("the server is shutting down; retry on another instance")
        if not name:
            raise InvalidArgument.field("model", "must name a model")
        entry = self.get_model(name, version)
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
        self, model: str, text: str, parameters: Mapping[str, Any], *, version: str = ""
    ) -> AsyncGenerator[Chunk, None]:
        """Chunks of a generation as they are produced; the last has finish reason and usage.

        Counts toward ``max_streams``. Leaving the iteration early cancels the
        generation before its next step.
        """
        if self._streams >= self.max_streams:
            if self.metrics is not None and model in self._entries:
                self.metrics.rejections.labels(model).inc()
            raise ResourceExhausted(
                f"the server has {self._streams} streams in flight, its limit; retry later",
                retry_after=1.0,
            )
        self._streams += 1
        try:
            generation = self._generation(model, text, parameters, version)
            async with contextlib.aclosing(generation) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self._streams -= 1

    async def _generation(
        self, model: str, text: str, parameters: Mapping[str, Any], version: str = ""
    ) -> AsyncGenerator[Chunk, None]:
        with self._request():
            entry = self._serving(model, Task.TEXT_GENERATION, version)
            params = validate_generation(entry.model, parameters)
            prompt_tokens = self._prompt_tokens(entry, text, "inputs")
            scheduler = entry.scheduler
            job: Any
            if scheduler.decoder is not None:
                job = self._submit(
                    entry, lambda: scheduler.submit_sequence(text, params, prompt_tokens)
                )
            else:

                def factory() -> Iterator[Chunk]:
                    return run_generation(
                        entry.model, text, params, prompt_tokens=prompt_tokens, stop=job.stop
                    )

                job = self._submit(entry, lambda: scheduler.submit(factory))
            chunks = scheduler.stream(job)
            if self.metrics is not None:
                chunks = self._measured(model, job.submitted, chunks)
            # aclosing: leaving early reaches the job (and cancels it) at once, not at GC.
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
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

    @contextlib.contextmanager
    def _counting_rejections(self, entry: ModelEntry) -> Iterator[None]:
        """Count a RESOURCE_EXHAUSTED (the model is full) raised inside, and let it go on."""
        try:
            yield
        except ResourceExhausted:
            if self.metrics is not None:
                self.metrics.rejections.labels(entry.name).inc()
            raise

    def _submit(self, entry: ModelEntry, submit: Callable[[], T]) -> T:
        """``submit()``, a rejection counted."""
        with self._counting_rejections(entry):
            return submit()

    async def _run(self, entry: ModelEntry, fn: Callable[[], T]) -> T:
        """``fn`` as one step in the model's thread; a rejection counted."""
        with self._counting_rejections(entry):
            return await entry.scheduler.run(fn)

    async def _run_batched(
        self,
        entry: ModelEntry,
        kind: str,
        key: Hashable,
        payload: Any,
        weight: int,
        run_batch: Callable[[list[Any]], list[T]],
    ) -> T:
        """``payload`` in a dynamic batch on the model's thread; a rejection counted."""
        with self._counting_rejections(entry):
            return await entry.scheduler.run_batched(kind, key, payload, weight, run_batch)

    async def generate(
        self, model: str, text: str, parameters: Mapping[str, Any], *, version: str = ""
    ) -> GenerateResult:
        """A whole generation at once."""
        result = GenerateResult("")
        parts: list[str] = []
        async for chunk in self._generation(model, text, parameters, version):
            parts.append(chunk.text)
            result.token_ids.extend(chunk.token_ids)
            if chunk.finish_reason is not None and chunk.usage is not None:
                result.finish_reason, result.usage = chunk.finish_reason, chunk.usage
        result.text = "".join(parts)
        return result

    async def embed(
        self, model: str, texts: Sequence[str], *, normalize: bool = True, version: str = ""
    ) -> tuple[torch.Tensor, Usage]:
        """One float32 vector per text, shape ``[len(texts), dim]``, and the token usage."""
        with self._request():
            entry = self._serving(model, Task.EMBEDDING, version)
            if not texts:
                raise InvalidArgument.field("inputs", "must hold at least one text")
            limit = entry.model.max_batch_texts
            if len(texts) > limit:
                raise InvalidArgument.field(
                    "inputs", f"holds {len(texts)} texts; the model takes at most {limit}"
                )
            tokens = sum(self._prompt_tokens(entry, t, f"inputs[{i}]") for i, t in enumerate(texts))
            model_ = entry.model

            def run_batch(payloads: list[tuple[list[str], bool]]) -> list[torch.Tensor]:
                vectors = _embeddings(model_, [t for texts, _ in payloads for t in texts])
                out, start = [], 0
                for part, normalize_part in payloads:
                    rows = vectors[start : start + len(part)]
                    start += len(part)
                    if normalize_part:
                        rows = torch.nn.functional.normalize(rows, dim=-1)
                    out.append(rows.clone())
                return out

            payload = (list(texts), normalize)
            vectors = await self._run_batched(entry, "embed", (), payload, len(texts), run_batch)
            return vectors, Usage(tokens, 0)

    async def predict(
        self,
        model: str,
        inputs: Sequence[RawTensor],
        parameters: Mapping[str, Any],
        *,
        version: str = "",
    ) -> list[RawTensor]:
        """Run a model on named tensors; outputs come back raw, in the model's order."""
        with self._request():
            entry = self._serving(model, Task.TENSOR_PREDICTION, version)
            tensors = from_raw(inputs)
            _check_declared(entry.model, tensors)
            params = dict(parameters)
            model_ = entry.model
            key = None
            if model_.predict_batches and entry.scheduler.max_batch_size > 1:
                key = _predict_batch_key(tensors, params)
            if key is None:

                def run() -> list[RawTensor]:
                    outputs = model_.predict(tensors, params)
                    return [to_raw(name, value) for name, value in outputs.items()]

                return await self._run(entry, run)
            rows = next(iter(tensors.values())).shape[0]
            return await self._run_batched(
                entry,
                "predict",
                key,
                tensors,
                rows,
                lambda batch: _predict_batch(model_, batch, params),
            )


def _depth_of(scheduler: Scheduler) -> Callable[[], int]:
    return lambda: scheduler.depth


def _warm_up_decoder(decoder: BatchDecoder) -> None:
    """Prefill one sequence and step it once, so the first request pays no one-off costs."""
    params = GenerationParams(max_new_tokens=2, temperature=1.0, top_k=0, top_p=1.0, seed=0)
    state, _ = decoder.prefill("warm up", params)
    try:
        decoder.step([state])
    finally:
        decoder.release(state)


def _embeddings(model: Model, texts: list[str]) -> torch.Tensor:
    """``model.embed(texts)`` as float32 rows on the CPU; a wrong shape is the model's error."""
    vectors = model.embed(texts)
    if not isinstance(vectors, torch.Tensor) or vectors.shape[:1] != (len(texts),):
        raise TypeError(
            f"{type(model).__name__}.embed returned "
            f"{getattr(vectors, 'shape', type(vectors))} for {len(texts)} texts"
        )
    return vectors.detach().to("cpu", torch.float32).reshape(len(texts), -1)


def _predict_batch_key(tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> Hashable:
    """What requests must share to be run together: input dtypes and shapes but the
    first dimension, and the parameters. None when this request cannot be batched."""
    if not tensors or any(t.ndim == 0 for t in tensors.values()):
        return None
    if len({t.shape[0] for t in tensors.values()}) != 1:
        return None  # inputs disagree on the rows; the model will say what it thinks
    try:
        params_key = json.dumps(params, sort_keys=True)
    except (TypeError, ValueError):
        return None
    inputs = tuple(sorted((n, str(t.dtype), tuple(t.shape[1:])) for n, t in tensors.items()))
    return inputs, params_key


def _predict_batch(
    model: Model, batch: list[Mapping[str, torch.Tensor]], params: Mapping[str, Any]
) -> list[list[RawTensor]]:
    """One ``predict`` call on requests' inputs joined along dimension 0, split back per request."""
    rows = [next(iter(tensors.values())).shape[0] for tensors in batch]
    if len(batch) == 1:
        joined = batch[0]
    else:
        joined = {name: torch.cat([tensors[name] for tensors in batch]) for name in batch[0]}
    outputs = model.predict(joined, params)
    results: list[list[RawTensor]] = [[] for _ in batch]
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != sum(rows):
            raise RuntimeError(
                f"{type(model).__name__} sets predict_batches, but its output {name!r} has "
                f"shape {list(value.shape)} for {sum(rows)} input rows"
            )
        for result, part in zip(results, torch.split(value, rows), strict=True):
            result.append(to_raw(name, part))
    return results


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
