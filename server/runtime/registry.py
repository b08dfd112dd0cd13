"""The models a server holds, by name and version, and their life from the model repository.

:class:`ModelRegistry` answers which version of which model a request gets, and
loads, reloads and unloads models of the repository while the server runs. The
:class:`~protoserve.server.runtime.core.Runtime` owns one and serves requests
on what it hands out; it also tells it how to make a version (its scheduler and
batching settings) and how to load one (in the version's worker thread).

The rules, for the runtime's docstrings to point at:

- ``""`` as a version means the latest version served (the highest number).
- A repository model's versions load together, each in its own worker thread,
  beside the versions serving now, and take over only once every one is READY.
  A failed load or reload leaves the versions serving before.
- A replaced or unloaded version leaves service at once (new requests do not get
  it); its requests in flight get ``unload_grace`` seconds, then its generations
  are ended and its worker thread stops.
- Loads and unloads of one model run one after the other; a caller that goes
  away does not stop one half way.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from protoserve.server.runtime.devices import device_name, dtype_name
from protoserve.server.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    bounded,
)
from protoserve.server.runtime.model import Decoding, Model
from protoserve.server.runtime.repository import (
    Batching,
    ModelConfig,
    ModelRepository,
    RepositoryError,
    Warmup,
)
from protoserve.server.runtime.scheduler import Scheduler

__all__ = [
    "LOADING",
    "NOT_LOADED",
    "READY",
    "UNAVAILABLE",
    "UNLOADED",
    "UNLOADING",
    "IndexEntry",
    "Instance",
    "ModelEntry",
    "ModelRegistry",
    "ModelState",
]

log = logging.getLogger("protoserve.server")

T = TypeVar("T")

#: Repository states, in the Open Inference Protocol's words.
READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
#: Why a version is UNAVAILABLE when nobody asked for it since the start (a folder
#: added later), and when a caller unloaded it: sibling workers tell these from a
#: failure (server/siblings.py).
NOT_LOADED, UNLOADED = "not loaded", "unloaded"


class ModelState(enum.Enum):
    """Where a model is in its life on the server."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(eq=False)
class Instance:
    """One copy of a version's model with its own worker thread (``instances = N``)."""

    model: Model
    scheduler: Scheduler
    #: Its place among the version's instances, 0 first: the ``instance`` label.
    index: int


@dataclass(eq=False)
class ModelEntry:
    """A model version as the runtime holds it: its first instance's model and
    scheduler, and its other instances (:attr:`others`) when it has several."""

    name: str
    model: Model
    scheduler: Scheduler
    state: ModelState = ModelState.LOADING
    state_message: str = "loading"
    #: The version served: the version folder's number for a model of the repository,
    #: the model's own ``version`` ("1" unless it says otherwise) for one given with --model.
    version: str = "1"
    #: Batch requests and decode generations together: the server's flag, or the
    #: model's own setting in the repository.
    batching: bool = True
    #: Generations decoded together must get bit for bit their lone tokens: the
    #: server's ``--batch-invariant``, or the model's own setting in the repository.
    batch_invariant: bool = False
    #: How its generations decode, once loaded (None: it does not generate text).
    decoding: Decoding | None = None
    #: Where it runs and the dtype it computes in, once placed before its load
    #: (:func:`~protoserve.server.runtime.devices.place`); None before.
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    #: Its instances past the first (``instances = N``): copies of :attr:`model`, each
    #: with a scheduler of its own; a request goes to the least busy (:meth:`pick`).
    others: list[Instance] = field(default_factory=list)
    #: When it became READY, in Unix seconds (None before); OpenAI's model ``created``.
    ready_at: int | None = field(default=None, init=False)
    #: Requests using this version now; it is unloaded once none is left.
    in_flight: int = field(default=0, init=False)
    idle: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    #: Requests :meth:`pick` placed: it takes turns among equally busy instances.
    _turn: int = field(default=0, init=False, repr=False, compare=False)
    #: What :meth:`described` built, by kind: (the key it was built for, the value).
    _described: dict[str, tuple[Any, Any]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def instances(self) -> list[Instance]:
        """Every instance, the first (:attr:`model`, :attr:`scheduler`) first."""
        return [Instance(self.model, self.scheduler, 0), *self.others]

    @property
    def schedulers(self) -> list[Scheduler]:
        return [self.scheduler, *(i.scheduler for i in self.others)]

    def pick(self) -> Instance:
        """The instance a new request goes to: the one with the fewest requests queued
        and running, in turn among equals (a generation stays on it to its end)."""
        if not self.others:
            return Instance(self.model, self.scheduler, 0)
        instances = self.instances
        loads = [i.scheduler.depth + i.scheduler.active for i in instances]
        least = [i for i, load in zip(instances, loads, strict=True) if load == min(loads)]
        self._turn += 1
        return least[self._turn % len(least)]

    def described(self, kind: str, build: Callable[[ModelEntry], T], extra: Any = None) -> T:
        """``build(self)``, built once and kept (a face's description of the version: its
        GetModel or ModelMetadata response), rebuilt when the version's state, its
        message, its decoding or its placement changes, or ``extra`` (what else the value shows,
        hashable) does. A change of the model's configuration makes new entries.
        The value is shared: whoever takes it must not change it."""
        key = (self.state, self.state_message, self.decoding, self.device, self.dtype, extra)
        held = self._described.get(kind)
        if held is not None and held[0] == key:
            value: T = held[1]
            return value
        value = build(self)
        self._described[kind] = (key, value)
        return value

    @property
    def device_name(self) -> str:
        """Where it runs, as reported: ``cpu``, ``cuda:0``; "" before it is placed."""
        return device_name(self.device)

    @property
    def dtype_name(self) -> str:
        """The dtype it computes in, as reported: ``float32``; "" before it is placed."""
        return dtype_name(self.dtype)

    def mark_ready(self) -> None:
        """The version loaded and warmed: READY from now on."""
        self.state, self.state_message = ModelState.READY, "ready"
        self.ready_at = int(time.time())


@dataclass(frozen=True)
class IndexEntry:
    """One model version of the model repository, loaded or not (RepositoryIndex).

    ``state`` is one of READY, LOADING, UNLOADING or UNAVAILABLE (the Open Inference
    Protocol's words); ``reason`` says why when it is not READY. ``version`` is ""
    for a folder too malformed to tell its versions.
    """

    name: str
    version: str
    state: str
    reason: str = ""


#: Makes a version, its scheduler started: (name, model, version, the model's batching).
EntryFactory = Callable[[str, Model, str, Batching | None], ModelEntry]
#: Loads and warms up a version in its worker thread; raises what the model raised.
Warm = Callable[[ModelEntry, Warmup | None], Awaitable[None]]


class ModelRegistry:
    """Served versions by name, and the repository operations on them.

    Args:
        given: the versions of the models given with --model, already made;
            they are never loaded or unloaded here.
        new_entry: makes a version of a repository model.
        warm: loads a version.
        on_change: called when a model's state changes (health listens).
        repository: the repository folder, or None.
        model_control: allow :meth:`load` and :meth:`unload`.
        unload_grace: seconds a version leaving service waits for its requests.
    """

    def __init__(
        self,
        given: Sequence[ModelEntry],
        *,
        new_entry: EntryFactory,
        warm: Warm,
        on_change: Callable[[], None],
        repository: str | Path | None = None,
        model_control: bool = True,
        unload_grace: float = 30.0,
    ) -> None:
        #: Served models by name, each with its versions in ascending order.
        self._entries: dict[str, list[ModelEntry]] = {}
        for entry in given:
            if entry.name in self._entries:
                raise ValueError(f"two models are named {entry.name!r}")
            self._entries[entry.name] = [entry]
        self._given = frozenset(self._entries)
        self.repository = (
            None if repository is None else ModelRepository(repository, reserved=self._given)
        )
        #: The repository's absolute paths, longest first (see _no_paths).
        self._roots = (
            ()
            if self.repository is None
            else sorted(
                {str(self.repository.root.absolute()), str(self.repository.root.resolve())},
                key=len,
                reverse=True,
            )
        )
        self.model_control = model_control
        self.unload_grace = unload_grace
        self._new_entry, self._warm, self._on_change = new_entry, warm, on_change
        #: Repository versions not served (failed, unloaded) or not yet: name -> version -> row.
        self._status: dict[str, dict[str, IndexEntry]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._loading: list[ModelEntry] = []  # versions being loaded aside, not yet served
        self._retiring: list[ModelEntry] = []  # versions out of service, finishing requests
        self._tasks: set[asyncio.Task[None]] = set()

    # What is served.
    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def served(self) -> Iterator[ModelEntry]:
        """Every version served (or loading at the start)."""
        return (e for entries in self._entries.values() for e in entries)

    def given(self) -> list[ModelEntry]:
        """The versions of the models given with --model."""
        return [e for name in self._given for e in self._entries[name]]

    def everything(self) -> list[ModelEntry]:
        """Every version with a worker thread: served, loading aside, leaving service."""
        return [*self.served(), *self._loading, *self._retiring]

    def latest(self) -> list[ModelEntry]:
        """One version per model, the latest: models given with --model in their order,
        then those of the repository by name (whatever order they loaded in)."""
        given = [entries[-1] for name, entries in self._entries.items() if name in self._given]
        loaded = sorted(set(self._entries) - self._given)
        return given + [self._entries[name][-1] for name in loaded]

    def versions_of(self, name: str) -> list[ModelEntry]:
        """The versions of a model served now, ascending; empty when there is none."""
        return self._entries.get(name, [])

    def known(self) -> list[str]:
        """Every name served now, or reported by the repository since the start."""
        return list(dict.fromkeys([*self._entries, *self._status]))

    def get(self, name: str, version: str = "") -> ModelEntry:
        """The version of a model ("" for the latest). Raises NotFound naming the models,
        or the versions, there are, or why a repository model is not loaded."""
        entries = self._entries.get(name)
        if not entries:
            status = self._status.get(name)
            if status:
                reason = next(iter(status.values())).reason
                message = f"model {name!r} is not loaded: {reason}"
            else:
                known = ", ".join(sorted(self._entries)) or "none"
                message = f"model {bounded(name)!r} not found; models on this server: {known}"
            raise NotFound(message, resource_type="model", resource_name=name)
        if not version:
            return entries[-1]
        for entry in entries:
            if entry.version == version:
                return entry
        raise NotFound(
            f"model {name!r} has no version {bounded(version)!r}; versions: "
            + ", ".join(e.version for e in entries),
            resource_type="model version",
            resource_name=f"{name}/{version}",
        )

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """See :meth:`Runtime.repository_index`."""
        repository = self._require_repository()
        rows: dict[tuple[str, str], IndexEntry] = {}
        try:
            folders = repository.scan()
        except RepositoryError:
            folders = []
        for folder in folders:
            if folder.config is not None:
                for number in folder.config.versions:
                    row = IndexEntry(folder.name, str(number), UNAVAILABLE, NOT_LOADED)
                    rows[(row.name, row.version)] = row
        for status in self._status.values():
            # A folder-level error ("" version) is shown as the folder is now, below.
            rows.update(((r.name, r.version), r) for r in status.values() if r.version)
        for folder in folders:
            if folder.config is None:
                rows[(folder.name, "")] = IndexEntry(folder.name, "", UNAVAILABLE, folder.error)
        for name, entries in self._entries.items():
            if name not in self._given:
                for e in entries:
                    ok = e.state is ModelState.READY
                    state, reason = (READY, "") if ok else (LOADING, "loading")
                    rows[(name, e.version)] = IndexEntry(name, e.version, state, reason)
        index = sorted(rows.values(), key=lambda r: (r.name, _version_key(r.version)))
        return [r for r in index if r.state == READY] if ready_only else index

    # Loading and unloading.
    def check_control(self, name: str) -> None:
        """Raises FailedPrecondition unless ``name`` may be loaded or unloaded here."""
        self._require_repository()
        if not self.model_control:
            raise FailedPrecondition(
                "model control is off on this server (the default without "
                "--admin-token-file, or --no-model-control): models load at the start only; "
                "to load and unload while serving, start it with --admin-token-file (callers "
                "then need an admin token), or --model-control for local use without tokens"
            )
        if name in self._given:
            raise FailedPrecondition(
                f"model {name!r} was given with --model; only models of the repository "
                "are loaded and unloaded"
            )

    async def load_all(self, leave_out: Collection[str] = frozenset()) -> None:
        """Load every model of the repository (at the start) but those named in
        ``leave_out`` (which are then "not loaded"); failures are logged and indexed,
        and the others load on."""
        repository = self._require_repository()
        try:
            folders = await asyncio.to_thread(repository.scan)
        except RepositoryError as exc:
            log.error("model repository: %s; serving no model from it", exc)
            return
        configs = []
        for folder in folders:
            if folder.config is None:
                self._malformed(folder.name, folder.path, folder.error)
            elif folder.config.name in leave_out:
                log.debug("model repository: model %s left out", folder.config.name)
            else:
                configs.append(folder.config)
        log.info("model repository %s: loading %d models", repository.root, len(configs))
        loads = (self._load(c.name, c, initial=True) for c in configs)
        await asyncio.gather(*loads, return_exceptions=True)

    async def load(self, name: str) -> None:
        """See :meth:`Runtime.load_model`."""
        await asyncio.shield(self._spawn(self._load(name)))

    async def unload(self, name: str) -> None:
        """See :meth:`Runtime.unload_model`."""
        await asyncio.shield(self._spawn(self._unload(name)))

    def cancel(self) -> None:
        """Cancel the loads and unloads under way (the server is stopping)."""
        for task in self._tasks:
            task.cancel()

    def _no_paths(self, text: str) -> str:
        """``text`` as clients may see it: the repository's place on disk left out (a
        model file's path, in a load's error), which only the server's log shows."""
        for root in self._roots:
            text = text.replace(root, "<model repository>")
        return text

    def _require_repository(self) -> ModelRepository:
        if self.repository is None:
            raise FailedPrecondition("the server has no model repository (--model-repository)")
        return self.repository

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # held until done: the loop keeps weak references
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # the caller who awaited it has it; asyncio must not log it

    def _lock(self, name: str, operation: str) -> asyncio.Lock:
        """The lock that runs a model's loads and unloads one after the other; an
        ``operation`` that has to wait for another says so (an unload can wait long)."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        if lock.locked():
            log.info("model %s: the %s waits for the load or unload under way", name, operation)
        return lock

    async def _load(
        self, name: str, config: ModelConfig | None = None, *, initial: bool = False
    ) -> None:
        async with self._lock(name, "load"):
            if config is None:
                config = await self._read_folder(name)
            await self._load_versions(config, initial=initial)

    async def _read_folder(self, name: str) -> ModelConfig:
        repository = self._require_repository()
        try:
            folder = await asyncio.to_thread(repository.find, name)
        except RepositoryError as exc:
            raise _unreadable(exc) from exc
        if folder is None:
            raise NotFound(
                f"model {bounded(name)!r} is not in the model repository",
                resource_type="model",
                resource_name=name,
            )
        if folder.config is None:
            self._malformed(name, folder.path, folder.error)
            error = self._no_paths(folder.error)
            raise InvalidArgument(f"model {name!r}: folder {folder.path.name!r}: {error}")
        return folder.config

    def _malformed(self, name: str, path: Path, reason: str) -> None:
        log.error("model repository: folder %r skipped: %s", path.name, reason)
        if name not in self._entries:
            self._status[name] = {"": IndexEntry(name, "", UNAVAILABLE, self._no_paths(reason))}
        self._on_change()

    async def _load_versions(self, config: ModelConfig, *, initial: bool) -> None:
        """Build, load and warm up every version, then swap them in (module docstring)."""
        name, started = config.name, time.perf_counter()
        numbers = [str(v) for v in config.versions]
        self._status[name] = {v: IndexEntry(name, v, LOADING, "loading") for v in numbers}
        try:
            models = await asyncio.to_thread(lambda: [config.build(v) for v in config.versions])
        except RepositoryError as exc:
            self._failed(config, numbers, str(exc), None)
            shown = self._no_paths(str(exc))
            raise InvalidArgument(
                f"model {name!r}: folder {config.folder.name!r}: {shown}"
            ) from exc
        entries = [
            self._new_entry(name, model, v, config.batching)
            for v, model in zip(numbers, models, strict=True)
        ]
        # At the start a new model is listed while it loads (LOADING), as --model ones
        # are; later, it appears only once ready, so the server stays ready meanwhile.
        visible = initial and name not in self._entries
        if visible:
            self._entries[name] = entries
            self._on_change()
        else:
            self._loading.extend(entries)
        try:
            results = await asyncio.gather(
                *(self._warm(e, config.warmup) for e in entries), return_exceptions=True
            )
        finally:
            self._loading = [e for e in self._loading if e not in entries]
        failures = [(e, r) for e, r in zip(entries, results, strict=True) if r is not None]
        if failures:
            if visible:
                del self._entries[name]
            entry, error = failures[0]
            reason = f"version {entry.version} failed to load: {type(error).__name__}: {error}"
            self._failed(config, numbers, reason, failures)
            await asyncio.to_thread(_close_all, entries)
            raise Unavailable(f"model {name!r}: {self._no_paths(reason)}")
        for entry in entries:
            entry.mark_ready()
        replaced = [] if visible else self._entries.get(name, [])
        self._entries[name] = entries
        self._status.pop(name, None)
        took = time.perf_counter() - started
        log.info("model %s ready (version %s) in %.2fs", name, ", ".join(numbers), took)
        self._on_change()
        if replaced:
            self._spawn(self._retire(replaced))

    def _failed(
        self,
        config: ModelConfig,
        numbers: list[str],
        reason: str,
        failures: list[tuple[ModelEntry, BaseException]] | None,
    ) -> None:
        """Log a load that failed, one line per failure, and index each version's reason."""
        name, folder = config.name, config.folder.name
        reasons = dict.fromkeys(numbers, reason)
        if failures is None:
            log.error("model repository: folder %r skipped: %s", folder, reason)
        else:
            if len(numbers) > 1:
                reasons = dict.fromkeys(numbers, f"not served: {reason} (versions load together)")
            for entry, error in failures:
                reasons[entry.version] = f"failed to load: {type(error).__name__}: {error}"
                log.error(
                    "model repository: folder %r: version %s failed to load: %s: %s",
                    folder,
                    entry.version,
                    type(error).__name__,
                    error,
                    exc_info=error,
                )
        if name not in self._entries:
            self._status[name] = {
                v: IndexEntry(name, v, UNAVAILABLE, self._no_paths(r)) for v, r in reasons.items()
            }
        else:
            self._status.pop(name, None)  # the versions serving before serve on
        self._on_change()

    async def _unload(self, name: str) -> None:
        async with self._lock(name, "unload"):
            entries = self._entries.pop(name, None)
            if entries is None:
                repository = self._require_repository()
                known = name in self._status
                try:
                    found = known or await asyncio.to_thread(repository.find, name) is not None
                except RepositoryError as exc:
                    raise _unreadable(exc) from exc
                if found:
                    return  # not loaded: nothing to do
                raise NotFound(
                    f"model {bounded(name)!r} is not in the model repository",
                    resource_type="model",
                    resource_name=name,
                )
            self._status[name] = {
                e.version: IndexEntry(name, e.version, UNLOADING, "finishing its requests")
                for e in entries
            }
            self._on_change()
            await self._retire(entries)
            self._status[name] = {
                e.version: IndexEntry(name, e.version, UNAVAILABLE, UNLOADED) for e in entries
            }
            log.info("model %s unloaded", name)
            self._on_change()

    async def _retire(self, entries: list[ModelEntry]) -> None:
        """Let the versions' requests in flight finish (bounded), then stop their threads."""
        self._retiring.extend(entries)
        try:
            if not await _all_idle(entries, self.unload_grace):
                log.warning(
                    "model %s: %d requests still in flight after %.1fs; ending them",
                    entries[0].name,
                    sum(e.in_flight for e in entries),
                    self.unload_grace,
                )
                for entry in entries:
                    for scheduler in entry.schedulers:
                        scheduler.request_stop()
                await _all_idle(entries, 1.0)
            await asyncio.to_thread(_close_all, entries)
        finally:
            self._retiring = [e for e in self._retiring if e not in entries]


def _unreadable(error: RepositoryError) -> Unavailable:
    """The repository cannot be read (gone, or not a folder): logged with its path, said
    to the client without it (clients never see server paths)."""
    log.error("model repository: %s", error)
    return Unavailable("cannot read the model repository; the server's log says why")


def _version_key(version: str) -> tuple[int, int, str]:
    """Versions in numeric order ("2" before "10"); "" (a malformed folder) first."""
    if not version:
        return (0, 0, "")
    return (1, int(version), "") if version.isdigit() else (2, 0, version)


async def _all_idle(entries: Sequence[ModelEntry], within: float) -> bool:
    """Wait until none of ``entries`` has a request in flight; False after ``within`` seconds."""
    try:
        await asyncio.wait_for(asyncio.gather(*(e.idle.wait() for e in entries)), within)
    except TimeoutError:
        return False
    return True


def _close_all(entries: Sequence[ModelEntry]) -> None:
    """Stop the versions' worker threads (this joins them: call it from a worker thread)."""
    for entry in entries:
        for scheduler in entry.schedulers:
            scheduler.close()
