"""The model repository: one folder per model, a ``model.toml`` and numbered versions.

::

    models/                     # --model-repository models
      doubler/
        model.toml              # source = "model.pt2"
        1/model.pt2
        2/model.pt2
      writer/
        model.toml              # source = "bytelm"
        1/

``model.toml`` (read with the standard library's ``tomllib``)::

    name = "doubler"          # optional; the folder's name by default
    source = "model.pt2"      # "bytelm", "package.module:Class", or a file in each version folder
    versions = "latest"       # "latest" (the highest numbered folder), "all", or [1, 3]
    device = "cuda:1"         # optional: auto, cpu, cuda or cuda:N; the server's --device
    dtype = "bfloat16"        # optional: float32, float16 or bfloat16; the server's --dtype
    instances = 2             # optional: copies run at once, a thread each; --instances
    devices = ["cuda:0", "cuda:1"]   # optional: the devices the instances take in turn

    [batching]                # optional; overrides the server's flags for this model
    enabled = true
    max_batch_size = 16
    max_batch_delay_ms = 2.0
    predict_batches = true    # predict's dimension 0 is the batch: requests may be joined
    batch_invariant = true    # generations decoded together get exactly their lone tokens

    [inputs.INPUT0]           # optional: predict's inputs, one table per tensor, in order
    dtype = "float32"         # the runtime's dtype names (runtime.tensors.DTYPES)
    shape = [-1, 8]           # -1: any size
    description = "..."       # optional
    [outputs.OUTPUT0]         # optional: predict's outputs, the same keys
    dtype = "float32"
    shape = [-1, 4]

    [warmup]                  # optional; run after load, before the model is READY
    text = "hello"            # for models that generate or embed
    [warmup.inputs.x]         # for models that predict: one table per input tensor
    dtype = "float32"
    shape = [2, 3]
    data = [1, 2, 3, 4, 5, 6] # optional; zeros when left out

    [chat_template]           # optional; how a conversation becomes this model's prompt
    system = "### System\\n{content}\\n\\n"   # one format per role, each with {content}
    user = "### User\\n{content}\\n\\n"       # ("developer" messages use system's)
    assistant = "### Assistant\\n{content}\\n\\n"
    generation_prompt = "### Assistant\\n"     # where the answer begins
    stop = ["\\n### "]                         # every chat generation stops at these

Every key is checked: an unknown key, a wrong type or a missing file makes the
folder malformed (:class:`RepositoryError`, naming the folder and the key), and
never stops the server; the runtime reports the model UNAVAILABLE with the reason.

Declared tensors, ``predict_batches`` and the chat template are set on each model
built (:meth:`ModelConfig.build`), over its class's own (a ``[chat_template]`` key
left out keeps the model's own value): they give a file model, which
cannot say what it takes, a signature (v1 GetModel, the Open Inference Protocol's
ModelMetadata and ModelConfig) and request validation, and let its requests be
joined into batches. ``predict_batches = true`` needs declared inputs and outputs
whose dimension 0 is -1.
This module only reads folders and builds model objects; loading them and swapping
them in is the runtime's work (``Runtime.load_model``).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from protoserve.server.runtime.batching import predict_on_device
from protoserve.server.runtime.devices import (
    DEVICE_FORMS,
    DTYPE_NAMES,
    DeviceError,
    check_device,
    check_dtype,
)
from protoserve.server.runtime.loader import (
    ModelSpecError,
    check_model_name,
    is_file_source,
    is_named_source,
    model_from_source,
)
from protoserve.server.runtime.model import (
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplate,
    Model,
    Task,
    TensorInfo,
    warm_up_text,
)
from protoserve.server.runtime.tensors import DTYPES

__all__ = [
    "CONFIG_FILE",
    "Batching",
    "Folder",
    "ModelConfig",
    "ModelRepository",
    "RepositoryError",
    "Warmup",
    "WarmupTensor",
]

#: The file that makes a folder a model.
CONFIG_FILE = "model.toml"

_TOP_KEYS = {
    "name",
    "source",
    "versions",
    "batching",
    "warmup",
    "inputs",
    "outputs",
    "chat_template",
    "device",
    "dtype",
    "instances",
    "devices",
}
_BATCHING_KEYS = {
    "enabled",
    "max_batch_size",
    "max_batch_delay_ms",
    "predict_batches",
    "batch_invariant",
}
_WARMUP_KEYS = {"text", "inputs"}
_TENSOR_KEYS = {"dtype", "shape", "data"}
_DECLARED_KEYS = {"dtype", "shape", "description"}
#: Folders a file system or volume puts at the top of a repository (ext4 on a PVC).
_NOT_MODELS = {"lost+found"}
#: Elements of a warm-up tensor at most: warm-up inputs are meant to be tiny.
_MAX_WARMUP_ELEMENTS = 1 << 20


class RepositoryError(ValueError):
    """A model folder that cannot be served as it is; the message says where and why."""


@dataclass(frozen=True)
class Batching:
    """A model's own batching settings; None leaves the server's (or the model's) own."""

    enabled: bool | None = None
    max_batch_size: int | None = None
    max_batch_delay_ms: float | None = None
    #: Sets :attr:`Model.predict_batches` on the model built; None keeps its class's.
    predict_batches: bool | None = None
    #: Generations decoded together get bit for bit their lone tokens (the server's
    #: ``--batch-invariant`` for this model); None keeps the server's setting.
    batch_invariant: bool | None = None


@dataclass(frozen=True)
class WarmupTensor:
    """One input of the warm-up Predict call."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    #: Row-major values; None for zeros.
    data: tuple[float, ...] | None = None

    def tensor(self) -> torch.Tensor:
        dtype = DTYPES[self.dtype]
        if self.data is None:
            return torch.zeros(self.shape, dtype=dtype)
        return torch.tensor(self.data, dtype=dtype).reshape(self.shape)


@dataclass(frozen=True)
class Warmup:
    """What to run once after loading, before the model is READY."""

    text: str | None = None
    inputs: tuple[WarmupTensor, ...] = ()

    def run(self, model: Model) -> None:
        """Run the warm-up on a loaded model, in its worker thread; raises what it raises.

        Raises:
            ValueError: the warm-up asks for a task the model does not serve.
        """
        tasks = model.tasks()
        if self.text is not None:
            if not tasks & {Task.TEXT_GENERATION, Task.EMBEDDING}:
                raise ValueError("warmup.text is set, but the model neither generates nor embeds")
            warm_up_text(model, self.text)
        if self.inputs:
            if Task.TENSOR_PREDICTION not in tasks:
                raise ValueError("warmup.inputs is set, but the model does not predict")
            predict_on_device(model, {t.name: t.tensor() for t in self.inputs}, {})


@dataclass(frozen=True)
class ModelConfig:
    """A model folder's ``model.toml``, checked, with its versions resolved."""

    name: str
    folder: Path
    source: str
    #: The version numbers to serve, ascending; each has a folder.
    versions: tuple[int, ...]
    batching: Batching = Batching()
    warmup: Warmup | None = None
    #: Predict's declared inputs and outputs, in file order; empty keeps the model's own.
    inputs: tuple[TensorInfo, ...] = ()
    outputs: tuple[TensorInfo, ...] = ()
    #: The ``[chat_template]`` keys set, as ``(field, value)`` pairs: they replace
    #: those of the model's own :attr:`Model.chat_template`.
    chat_template: tuple[tuple[str, Any], ...] = ()
    #: Where the model runs and the dtype it computes in (set on each model built, over
    #: its class's :attr:`Model.device` and :attr:`Model.dtype`); None keeps the class's,
    #: or the server's ``--device`` and ``--dtype``. Resolved when the model loads
    #: (:func:`~protoserve.server.runtime.devices.place`): a device this machine does
    #: not have fails the load, not the folder.
    device: str | None = None
    dtype: str | None = None
    #: Copies of the model run at once, and the devices they take in turn (set on the
    #: model built, over its class's :attr:`Model.instances` and :attr:`Model.devices`).
    instances: int | None = None
    devices: tuple[str, ...] | None = None

    def version_folder(self, version: int) -> Path:
        return _version_folders(self.folder)[version]

    def build(self, version: int) -> Model:
        """A new, not yet loaded, model for one version. May import the model's module.

        The declared tensors and ``predict_batches`` are set on the model, over
        its class's.

        Raises:
            RepositoryError: the module or class is missing, is not a Model, or
                failed to import or to build (the user's code raised); or tensors
                are declared for a model that does not predict, or the model then
                batches rows its tensors do not have; or a chat template is set
                for a model that does not generate text.
        """
        try:
            model = model_from_source(self.source, folder=self.version_folder(version))
        except ModelSpecError as exc:
            raise RepositoryError(f"source: {exc}") from exc
        except Exception as exc:  # the user's module or constructor failed
            raise RepositoryError(
                f"source: building {self.source!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        self._declare(model)
        self._chat(model)
        for key in ("device", "dtype", "instances", "devices"):
            value = getattr(self, key)
            if value is not None:
                _set(model, key, value)
        return model

    def _chat(self, model: Model) -> None:
        """Set the ``[chat_template]`` keys over the model's own template."""
        if not self.chat_template:
            return
        if Task.TEXT_GENERATION not in model.tasks():
            raise RepositoryError(f"chat_template: {type(model).__name__} does not generate text")
        template = _chat_template_over(model.chat_template, self.chat_template)
        try:
            model.chat_template = template
        except AttributeError as exc:  # a property or __slots__ in the user's class
            raise RepositoryError(
                f"chat_template: {type(model).__name__} does not let it be set: {exc}"
            ) from exc

    def _declare(self, model: Model) -> None:
        """Set the declared tensors and ``predict_batches`` on ``model`` (instance
        attributes shadow the class's, and every reader goes through the instance)."""
        overrides: dict[str, object] = {}
        if self.inputs:
            overrides["inputs"] = self.inputs
        if self.outputs:
            overrides["outputs"] = self.outputs
        if self.batching.predict_batches is not None:
            overrides["predict_batches"] = self.batching.predict_batches
        if not overrides:
            return
        if Task.TENSOR_PREDICTION not in model.tasks():
            key = next(iter(overrides))
            key = "batching.predict_batches" if key == "predict_batches" else key
            raise RepositoryError(
                f"{key}: {type(model).__name__} does not predict; "
                "tensors are declared only for models that do"
            )
        for key, value in overrides.items():
            _set(model, key, value)
        if model.predict_batches:
            problem = _rows_problem(model.inputs, model.outputs, require=True)
            if problem is not None:
                why = "" if self.batching.predict_batches else " (the model's class sets it)"
                raise RepositoryError(f"batching.predict_batches{why}: {problem}")


@dataclass(frozen=True)
class Folder:
    """One folder of the repository as found: its config, or why it has none."""

    name: str
    path: Path
    config: ModelConfig | None
    error: str = ""


class ModelRepository:
    """A folder of model folders. Reading it never raises for a broken model folder.

    Args:
        root: the repository folder.
        reserved: names taken by models given otherwise (``--model``): a folder
            claiming one is malformed.
    """

    def __init__(self, root: Path | str, *, reserved: frozenset[str] = frozenset()) -> None:
        self.root = Path(root)
        self.reserved = reserved

    def scan(self) -> list[Folder]:
        """Every model folder (a folder holding ``model.toml``), sorted by folder name.

        Two folders claiming one name are both malformed. Reads only small files;
        call it from a worker thread where the repository may be slow storage.

        Raises:
            RepositoryError: the repository itself is missing, not a folder, or
                unreadable. A folder that cannot be read, or whose ``model.toml`` is
                not UTF-8 or not TOML, is one broken model, not an error.
        """
        try:
            paths = sorted(self.root.iterdir())
        except OSError as exc:  # gone (NotADirectoryError too), or not readable
            what = (
                "is not a folder" if not self.root.is_dir() else f"cannot be read: {exc.strerror}"
            )
            raise RepositoryError(f"model repository {str(self.root)!r} {what}") from exc
        found: list[Folder] = []
        for path in paths:
            if not path.is_dir() or path.name.startswith(".") or path.name in _NOT_MODELS:
                continue
            # A folder's name that is not UTF-8 is shown escaped: the index carries it.
            name = _printable(path.name)
            try:
                if not (path / CONFIG_FILE).is_file():
                    found.append(Folder(name, path, None, f"{CONFIG_FILE} is missing"))
                    continue
                config = read_config(path, reserved=self.reserved)
            except RepositoryError as exc:
                found.append(Folder(name, path, None, str(exc)))
            except OSError as exc:  # an unreadable folder is one broken model (no path said)
                found.append(Folder(name, path, None, f"cannot read the folder: {exc.strerror}"))
            else:
                found.append(Folder(config.name, path, config))
        return _flag_duplicates(found)

    def find(self, name: str) -> Folder | None:
        """The folder serving ``name``, or None. Raises RepositoryError as :meth:`scan`."""
        return next((f for f in self.scan() if f.name == name), None)


def read_config(folder: Path, *, reserved: frozenset[str] = frozenset()) -> ModelConfig:
    """A model folder's checked configuration.

    Raises:
        RepositoryError: the TOML does not parse, a key is unknown or has a wrong
            value, no version folder matches ``versions``, or a file is missing.
    """
    try:
        with (folder / CONFIG_FILE).open("rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise RepositoryError(f"{CONFIG_FILE} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:  # TOML is UTF-8; a file saved as Latin-1 is not
        raise RepositoryError(
            f"{CONFIG_FILE} is not UTF-8 text (byte {exc.object[exc.start]:#04x} "
            f"at offset {exc.start})"
        ) from exc
    except OSError as exc:
        raise RepositoryError(f"cannot read {CONFIG_FILE}: {exc.strerror or exc}") from exc
    _known_keys(raw, _TOP_KEYS, "")
    name = _string(raw, "name", folder.name)
    try:
        check_model_name(name)
    except ModelSpecError as exc:
        raise RepositoryError(f"name: {exc}") from exc
    if name in reserved:
        raise RepositoryError(f"name: {name!r} is already served by a --model model")
    if "source" not in raw:
        raise RepositoryError("source: missing; 'bytelm', 'package.module:Class' or a file name")
    source = _string(raw, "source", "")
    if not (is_named_source(source) or is_file_source(source) or ":" in source):
        raise RepositoryError(
            f"source: cannot tell what {source!r} is: expected 'bytelm', "
            "'package.module:Class', or a .pt/.pt2 file in each version folder"
        )
    versions = _versions(folder, raw.get("versions", "latest"))
    if is_file_source(source):
        for version in versions:
            if not (folder / str(version) / source).is_file():
                raise RepositoryError(f"version {version}: {source} is missing")
    inputs = _declared(raw, "inputs")
    outputs = _declared(raw, "outputs")
    batching = _batching(raw.get("batching", {}))
    if batching.predict_batches:
        # A class may declare its tensors itself (checked once built); a file cannot.
        problem = _rows_problem(inputs, outputs, require=is_file_source(source))
        if problem is not None:
            raise RepositoryError(f"batching.predict_batches: {problem}")
    warmup = _warmup(raw["warmup"]) if "warmup" in raw else None
    if warmup is not None and inputs:
        _check_warmup_inputs(warmup, inputs)
    chat_template = _chat_template(raw["chat_template"]) if "chat_template" in raw else ()
    device, dtype = _placement(raw)
    instances, devices = _instances(raw)
    return ModelConfig(
        name=name,
        folder=folder,
        source=source,
        versions=versions,
        batching=batching,
        warmup=warmup,
        inputs=inputs,
        outputs=outputs,
        chat_template=chat_template,
        device=device,
        dtype=dtype,
        instances=instances,
        devices=devices,
    )


def _placement(raw: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``device`` and ``dtype``, checked for their form (not whether this machine has
    the device: that is the load's to find, and a reload may find it)."""
    device, dtype = raw.get("device"), raw.get("dtype")
    if device is not None:
        try:
            check_device(device)
        except DeviceError:
            raise RepositoryError(
                f"device: must be one of {DEVICE_FORMS}, not {device!r}"
            ) from None
    if dtype is not None:
        try:
            check_dtype(dtype)
        except DeviceError:
            names = ", ".join(DTYPE_NAMES)
            raise RepositoryError(f"dtype: must be one of {names}, not {dtype!r}") from None
    return device, dtype


def _set(model: Model, key: str, value: Any) -> None:
    """``model.key = value`` for a key of ``model.toml``, or why it cannot be set."""
    try:
        setattr(model, key, value)
    except AttributeError as exc:  # a property or __slots__ in the user's class
        raise RepositoryError(
            f"{key}: {type(model).__name__} does not let it be set: {exc}"
        ) from exc


#: Instances of one model at most: each is a full copy of it with a thread of its own.
MAX_INSTANCES = 64


def _instances(raw: Mapping[str, Any]) -> tuple[int | None, tuple[str, ...] | None]:
    """``instances`` (1 to MAX_INSTANCES) and ``devices`` (a list of device forms)."""
    instances, devices = raw.get("instances"), raw.get("devices")
    if instances is not None and (
        isinstance(instances, bool)
        or not isinstance(instances, int)
        or not 1 <= instances <= MAX_INSTANCES
    ):
        raise RepositoryError(
            f"instances: must be a whole number from 1 to {MAX_INSTANCES}, not {instances!r}"
        )
    if devices is None:
        return instances, None
    if not isinstance(devices, list) or not devices:
        raise RepositoryError(f"devices: must be a list of devices, not {devices!r}")
    for device in devices:
        try:
            check_device(device)
        except DeviceError:
            raise RepositoryError(
                f"devices: each must be one of {DEVICE_FORMS}, not {device!r}"
            ) from None
    return instances, tuple(devices)


def _version_folders(folder: Path) -> dict[int, Path]:
    """Numbered subfolders (``1``, ``2`` ...) by number; other subfolders are the model's own."""
    found: dict[int, Path] = {}
    for path in folder.iterdir():
        if path.is_dir() and path.name.isdigit() and path.name.isascii() and int(path.name) > 0:
            found[int(path.name)] = path
    return found


def _versions(folder: Path, policy: object) -> tuple[int, ...]:
    available = sorted(_version_folders(folder))
    if not available:
        raise RepositoryError("no version folder: add a numbered folder such as 1/")
    if policy == "latest":
        return (available[-1],)
    if policy == "all":
        return tuple(available)
    if isinstance(policy, list) and policy and all(_is_int(v) and v > 0 for v in policy):
        missing = sorted(set(policy) - set(available))
        if missing:
            listed = ", ".join(map(str, missing))
            raise RepositoryError(f"versions: no folder for version {listed}")
        return tuple(sorted(set(policy)))
    raise RepositoryError(
        f"versions: must be 'latest', 'all' or a list of version numbers, not {policy!r}"
    )


def _batching(raw: object) -> Batching:
    table = _table(raw, "batching")
    _known_keys(table, _BATCHING_KEYS, "batching.")
    enabled = table.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise RepositoryError("batching.enabled: must be true or false")
    size = table.get("max_batch_size")
    if size is not None and not (_is_int(size) and size >= 1):
        raise RepositoryError("batching.max_batch_size: must be a whole number, at least 1")
    delay = table.get("max_batch_delay_ms")
    if delay is not None and not (_is_number(delay) and 0 <= delay < math.inf):
        raise RepositoryError("batching.max_batch_delay_ms: must be a number, at least 0")
    rows = table.get("predict_batches")
    if rows is not None and not isinstance(rows, bool):
        raise RepositoryError("batching.predict_batches: must be true or false")
    invariant = table.get("batch_invariant")
    if invariant is not None and not isinstance(invariant, bool):
        raise RepositoryError("batching.batch_invariant: must be true or false")
    return Batching(enabled, size, None if delay is None else float(delay), rows, invariant)


def _declared(raw: Mapping[str, Any], kind: str) -> tuple[TensorInfo, ...]:
    """``[inputs.NAME]`` or ``[outputs.NAME]`` tables as tensors, in file order."""
    if kind not in raw:
        return ()
    tables = _table(raw[kind], kind)
    if not tables:
        raise RepositoryError(f"{kind}: needs one table per tensor, such as [{kind}.x]")
    return tuple(_declared_tensor(f"{kind}.{name}", name, spec) for name, spec in tables.items())


def _declared_tensor(where: str, name: str, raw: object) -> TensorInfo:
    table = _table(raw, where)
    _known_keys(table, _DECLARED_KEYS, where + ".")
    if not name.strip():
        raise RepositoryError(f"{where}: a tensor needs a name")
    dtype = table.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise RepositoryError(f"{where}.dtype: must be one of {', '.join(DTYPES)}")
    shape = table.get("shape")
    if not (isinstance(shape, list) and all(_is_int(d) and (d == -1 or d >= 1) for d in shape)):
        raise RepositoryError(
            f"{where}.shape: must be a list of sizes, -1 for any size, such as [-1, 8]"
        )
    description = table.get("description", "")
    if not isinstance(description, str):
        raise RepositoryError(f"{where}.description: must be a string")
    return TensorInfo(name, str(dtype), tuple(shape), description)


def _rows_problem(
    inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo], *, require: bool
) -> str | None:
    """Why these tensors cannot be batched by rows (None: they can). ``require``:
    inputs and outputs must both be declared."""
    for kind, tensors in (("inputs", inputs), ("outputs", outputs)):
        if require and not tensors:
            return f"needs declared {kind} ([{kind}.NAME] tables) whose first dimension is -1"
        for t in tensors:
            if not t.shape or t.shape[0] != -1:
                return (
                    f"{kind}.{t.name}.shape is {list(t.shape)}; "
                    "its first dimension must be -1, the batch"
                )
    return None


def _check_warmup_inputs(warmup: Warmup, inputs: Sequence[TensorInfo]) -> None:
    """The warm-up calls ``predict`` directly, so its inputs must be the declared ones."""
    if not warmup.inputs:
        return
    declared = {t.name: t for t in inputs}
    for tensor in warmup.inputs:
        where = f"warmup.inputs.{tensor.name}"
        spec = declared.get(tensor.name)
        if spec is None:
            raise RepositoryError(f"{where}: not a declared input; inputs are {list(declared)}")
        if tensor.dtype != spec.dtype:
            raise RepositoryError(f"{where}.dtype: the input is declared {spec.dtype}")
        if len(tensor.shape) != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, tensor.shape, strict=True)
        ):
            raise RepositoryError(
                f"{where}.shape: {list(tensor.shape)} does not fit the declared {list(spec.shape)}"
            )
    missing = [name for name in declared if name not in {t.name for t in warmup.inputs}]
    if missing:
        raise RepositoryError(f"warmup.inputs: missing the declared input {missing[0]!r}")


def _warmup(raw: object) -> Warmup:
    table = _table(raw, "warmup")
    _known_keys(table, _WARMUP_KEYS, "warmup.")
    text = table.get("text")
    if text is not None and not isinstance(text, str):
        raise RepositoryError("warmup.text: must be a string")
    inputs = _table(table.get("inputs", {}), "warmup.inputs")
    if text is None and not inputs:
        raise RepositoryError("warmup: needs text, or inputs (one table per input tensor)")
    tensors = tuple(_warmup_tensor(name, spec) for name, spec in inputs.items())
    return Warmup(text, tensors)


def _warmup_tensor(name: str, raw: object) -> WarmupTensor:
    where = f"warmup.inputs.{name}"
    table = _table(raw, where)
    _known_keys(table, _TENSOR_KEYS, where + ".")
    dtype = table.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise RepositoryError(f"{where}.dtype: must be one of {', '.join(DTYPES)}")
    shape = table.get("shape")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise RepositoryError(f"{where}.shape: must be a list of sizes, such as [1, 3]")
    count = math.prod(shape)
    if count > _MAX_WARMUP_ELEMENTS:
        raise RepositoryError(f"{where}.shape: {count} elements; at most {_MAX_WARMUP_ELEMENTS}")
    data = table.get("data")
    if data is not None:
        if not (isinstance(data, list) and all(_is_number(v) or isinstance(v, bool) for v in data)):
            raise RepositoryError(f"{where}.data: must be a list of numbers")
        if len(data) != count:
            raise RepositoryError(
                f"{where}.data: holds {len(data)} values; shape {shape} needs {count}"
            )
    return WarmupTensor(
        name, str(dtype), tuple(shape), None if data is None else tuple(float(v) for v in data)
    )


def _chat_template(raw: object) -> tuple[tuple[str, Any], ...]:
    """A ``[chat_template]`` table's keys, checked: strings, and ``stop`` a list of them;
    and the template they make over the default must be valid (the model's own is
    checked again when the model is built)."""
    table = _table(raw, "chat_template")
    _known_keys(table, set(ChatTemplate.field_names()), "chat_template.")
    pairs: list[tuple[str, Any]] = []
    for key, value in table.items():
        if key == "stop":
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise RepositoryError("chat_template.stop: must be a list of strings")
            value = tuple(value)
        elif not isinstance(value, str):
            raise RepositoryError(f"chat_template.{key}: must be a string")
        pairs.append((key, value))
    _chat_template_over(DEFAULT_CHAT_TEMPLATE, tuple(pairs))
    return tuple(pairs)


def _chat_template_over(base: ChatTemplate, pairs: tuple[tuple[str, Any], ...]) -> ChatTemplate:
    """``base`` with the keys of ``pairs`` replaced. Raises RepositoryError naming the key."""
    try:
        return replace(base, **dict(pairs))
    except ValueError as exc:  # ChatTemplate's own check names the field
        raise RepositoryError(f"chat_template.{exc}") from exc


def _printable(name: str) -> str:
    """A file name as text that protobuf and logs can carry: bytes that were not UTF-8
    (``os.fsdecode``'s surrogates) as ``\\xNN`` escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _flag_duplicates(found: list[Folder]) -> list[Folder]:
    by_name: dict[str, list[Folder]] = {}
    for folder in found:
        by_name.setdefault(folder.name, []).append(folder)
    out = []
    for folder in found:
        twins = by_name[folder.name]
        if len(twins) > 1 and folder.config is not None:
            paths = " and ".join(repr(t.path.name) for t in twins)
            error = f"folders {paths} are both named {folder.name!r}"
            folder = Folder(folder.name, folder.path, None, error)
        out.append(folder)
    return out


def _known_keys(table: Mapping[str, Any], known: set[str], prefix: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise RepositoryError(
            f"unknown key {prefix}{unknown[0]}; known keys: "
            + ", ".join(prefix + k for k in sorted(known))
        )


def _table(raw: object, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise RepositoryError(f"{where}: must be a table")
    return raw


def _string(table: Mapping[str, Any], key: str, default: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise RepositoryError(f"{key}: must be a non-empty string")
    return value.strip()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
