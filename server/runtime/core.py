"""The transport-independent core: every servicer converts messages and calls this.

The runtime holds the models, their states and their schedulers; it validates
requests, runs them in the models' worker threads, counts requests in flight
and drains them at shutdown. It raises only :mod:`protoserve.server.errors`
for request problems.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import (
    AsyncGenerator,
    Callable,
    Hashable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from protoserve.server.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from protoserve.server.metrics import Metrics
from protoserve.server.repository import Batching, Warmup
from protoserve.server.runtime.decoding import DecodingChoice, choose_decoder
from protoserve.server.runtime.generation import Chunk, FinishReason, Usage, run_generation
from protoserve.server.runtime.model import (
    BatchDecoder,
    Decoding,
    GenerationParams,
    Model,
    Task,
)
from protoserve.server.runtime.params import validate_generation
from protoserve.server.runtime.registry import IndexEntry, ModelEntry, ModelRegistry, ModelState
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


@dataclass
class GenerateResult:
    """A whole generation."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.LENGTH
    usage: Usage = field(default_factory=lambda: Usage(0, 0))


class Runtime:
    """Holds the models and serves requests on them.

    Models come from the command line (``models``), loaded at :meth:`start`, and from
    a model repository, loaded at :meth:`start` and then loaded, reloaded and unloaded
    while the server runs (:meth:`load_model`, :meth:`unload_model`; the rules are in
    :mod:`~protoserve.server.runtime.registry`). Each model version has its own
    scheduler and worker thread.

    A model of the repository that cannot be read or loaded is not served: it is
    absent from :meth:`list_models`, and UNAVAILABLE with the reason in
    :meth:`repository_index`, so it does not hold :attr:`ready` down. A model given
    on the command line that fails to load stays listed as FAILED, and the server is
    not ready: its operator asked for that model by name.

    Args:
        models: ``(served name, model)`` pairs, in the order ListModels reports them.
        max_queue: per model version, most requests waiting; more get RESOURCE_EXHAUSTED.
        max_active: per model version, most requests stepped in turn at once.
        batching, max_batch_size, max_batch_delay: the server's batching settings
            (None: each model's own); a repository model's ``[batching]`` overrides them.
        batch_invariant: generations decoded together must get bit for bit the tokens
            each gets alone (:mod:`~protoserve.server.runtime.decoding`); a repository
            model's ``[batching] batch_invariant`` overrides it.
        on_change: called (on the event loop) whenever a model's state or the
            server's readiness changes; the health service listens here.
        metrics: where to count queueing, tokens, cancellations and rejections;
            None for no metrics.
        repository: the model repository folder, or None for none.
        model_control: allow :meth:`load_model` and :meth:`unload_model`.
        unload_grace: seconds the requests in flight on an unloaded (or replaced)
            version get before its generations are ended and its thread stopped.
    """

    def __init__(
        self,
        models: Sequence[tuple[str, Model]],
        *,
        max_queue: int = 64,
        max_active: int = 32,
        batching: bool = True,
        batch_invariant: bool = False,
        max_batch_size: int | None = None,
        max_batch_delay: float | None = None,
        max_streams: int = 256,
        on_change: Callable[[], None] | None = None,
        metrics: Metrics | None = None,
        repository: str | Path | None = None,
        model_control: bool = True,
        unload_grace: float = 30.0,
    ) -> None:
        self.metrics = metrics
        self.batching = batching
        self.batch_invariant = batch_invariant
        self.max_streams = max_streams
        self._limits = (max_queue, max_active, max_batch_size, max_batch_delay)
        self._streams = 0
        self._metered: set[str] = set()
        self._on_change = on_change or (lambda: None)
        self._models = ModelRegistry(
            [self._new_entry(name, model, str(model.version)) for name, model in models],
            new_entry=self._new_entry,
            warm=self._warm,
            on_change=lambda: self._on_change(),
            repository=repository,
            model_control=model_control,
            unload_grace=unload_grace,
        )
        self._started = False
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def _new_entry(
        self, name: str, model: Model, version: str, own: Batching | None = None
    ) -> ModelEntry:
        """A version with its scheduler (and worker thread) started, not yet loaded."""
        own = own or Batching()
        max_queue, max_active, max_batch_size, max_batch_delay = self._limits
        batching = self.batching if own.enabled is None else own.enabled
        invariant = self.batch_invariant if own.batch_invariant is None else own.batch_invariant
        size = _first(own.max_batch_size, max_batch_size, model.max_batch_size)
        own_delay = None if own.max_batch_delay_ms is None else own.max_batch_delay_ms / 1000
        scheduler = Scheduler(
            name,
            max_queue=max_queue,
            max_active=max_active,
            max_batch_size=size if batching else 1,
            max_batch_delay=_first(own_delay, max_batch_delay, model.max_batch_delay),
            metrics=self.metrics,
        )
        if self.metrics is not None and name not in self._metered:
            # Once per name: a reload or another version adds no series, and the depth
            # read sums the versions served at the time (0 once unloaded).
            self._metered.add(name)
            decodings = [d.value for d in Decoding]
            self.metrics.add_model(name, self._depth_of(name), self._decoding_of(name), decodings)
        return ModelEntry(
            name, model, scheduler, version=version, batching=batching, batch_invariant=invariant
        )

    def _depth_of(self, name: str) -> Callable[[], int]:
        return lambda: sum(e.scheduler.depth for e in self._models.versions_of(name))

    def _decoding_of(self, name: str) -> Callable[[], str | None]:
        """How the latest version served under ``name`` decodes, read when scraped: a
        version loading, or one that failed, is not served; after an unload, None."""

        def read() -> str | None:
            served = self._models.versions_of(name)
            decoding = served[-1].decoding if served else None
            return None if decoding is None else decoding.value

        return read

    # Life cycle.
    async def start(self) -> None:
        """Load and warm up every model, each version in its own worker thread, all at once.

        A model given on the command line that fails to load is FAILED (its message
        says why); one of the repository is not served (the index says why). The
        others serve.
        """
        loads = [self._load_given(entry) for entry in self._models.given()]
        if self._models.repository is not None:
            loads.append(self._models.load_all())
        await asyncio.gather(*loads)
        self._started = True
        self._on_change()

    async def _load_given(self, entry: ModelEntry) -> None:
        started = time.perf_counter()
        try:
            await self._warm(entry, None)
        except Exception as exc:
            log.exception("model %s failed to load", entry.name)
            entry.state, entry.state_message = ModelState.FAILED, f"failed to load: {exc}"
        else:
            entry.state, entry.state_message = ModelState.READY, "ready"
            log.info("model %s ready in %.2fs", entry.name, time.perf_counter() - started)
        self._on_change()

    async def _warm(self, entry: ModelEntry, warmup: Warmup | None) -> None:
        """Load and warm up one version in its worker thread; raises what the model raised."""
        scheduler, model = entry.scheduler, entry.model

        def load() -> DecodingChoice:
            model.load()
            model.warmup()
            if warmup is not None:
                warmup.run(model)
            choice = choose_decoder(
                model,
                entry.name,
                max_active=scheduler.max_active,
                batching=entry.batching,
                batch_invariant=entry.batch_invariant,
            )
            if choice.decoder is not None:
                _warm_up_decoder(choice.decoder)
                scheduler.decoder = choice.decoder
            return choice

        choice = await scheduler.run(load, request=False)
        entry.decoding = choice.decoding
        if choice.message:
            log.log(choice.level, "%s", choice.message)

    @property
    def ready(self) -> bool:
        """True once started, while every model served is READY and the server is not
        shutting down (repository models that failed are not served: they do not count)."""
        return (
            self._started
            and not self._draining
            and all(e.state is ModelState.READY for e in self._models.served())
        )

    def model_ready(self, name: str, version: str = "") -> bool:
        """True when the model (that version; "" for the latest) is READY (loaded and run
        once) and the server is not draining."""
        try:
            entry = self._models.get(name, version)
        except NotFound:
            return False
        return not self._draining and entry.state is ModelState.READY

    def versions(self, name: str) -> list[str]:
        """The versions of a model the server holds, oldest first. Raises NotFound."""
        self._models.get(name)
        return [e.version for e in self._models.versions_of(name)]

    def known_models(self) -> list[str]:
        """Every model name served now, or reported by the repository since the start
        (failed, unloaded): the names health reports on."""
        return self._models.known()

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
        for entry in self._models.everything():
            entry.scheduler.request_stop()

    def close(self) -> None:
        """Stop loads and unloads under way, and every model version's worker thread."""
        self._models.cancel()
        for entry in self._models.everything():
            entry.scheduler.close()

    # Requests.
    def list_models(self) -> list[ModelEntry]:
        """Every model, ready or not, in configuration order; for a model with several
        versions, the one a request naming no version gets (the latest)."""
        return self._models.latest()

    def get_model(self, name: str, version: str = "") -> ModelEntry:
        """The named model (that version; "" for the latest). Raises NotFound naming the
        models, or the versions, there are."""
        return self._models.get(name, version)

    # The model repository (the Open Inference Protocol's repository extension).
    def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model version of the repository, loaded or not; only READY ones with
        ``ready_only``. Raises FailedPrecondition when the server has no repository.

        The folders are read again, so a folder added since the start is listed
        (UNAVAILABLE, "not loaded"), and a malformed one with what is wrong with it
        now (version "").
        """
        return self._models.index(ready_only)

    async def load_model(self, name: str) -> None:
        """Load (or reload) a model from the repository; returns once it is READY.

        The folder is read again, so a new version folder or a fixed ``model.toml``
        is picked up. The new versions load beside those serving, and take over
        once all are READY; a failed reload leaves the old ones serving.

        Raises:
            FailedPrecondition: no repository, or model control is off, or the model
                was given with --model.
            NotFound: the repository has no such model.
            InvalidArgument: its folder is malformed (the message says how).
            Unavailable: it failed to load (the message says why), or the server is
                shutting down.
        """
        self._models.check_control(name)
        if self._draining:
            raise Unavailable("the server is shutting down; it loads no more models")
        await self._models.load(name)

    async def unload_model(self, name: str) -> None:
        """Stop serving a model: new requests are refused, those in flight finish, then
        its worker thread stops. Raises NotFound, or FailedPrecondition as load_model.

        Requests in flight get ``unload_grace`` seconds; then generations still going
        end (FINISH_REASON_CANCELLED) and requests still waiting fail with UNAVAILABLE.
        Unloading a model of the repository that is not loaded does nothing.
        """
        self._models.check_control(name)
        await self._models.unload(name)

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
    def _request(self, entry: ModelEntry) -> Iterator[None]:
        """Count a request in flight, on the server and on the version it uses.

        Entered right after :meth:`_serving`, with no ``await`` between: a version
        taken out of service is then either counted here or never handed out.
        """
        self._in_flight += 1
        self._idle.clear()
        entry.in_flight += 1
        entry.idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            entry.in_flight -= 1
            if entry.in_flight == 0:
                entry.idle.set()

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
            if self.metrics is not None and model in self._models:
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
        entry = self._serving(model, Task.TEXT_GENERATION, version)
        with self._request(entry):
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
        entry = self._serving(model, Task.EMBEDDING, version)
        with self._request(entry):
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
        entry = self._serving(model, Task.TENSOR_PREDICTION, version)
        with self._request(entry):
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


def _first(*values: T | None) -> T:
    """The first value that is not None (the last is never None)."""
    found = next((v for v in values if v is not None), None)
    assert found is not None
    return found


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
