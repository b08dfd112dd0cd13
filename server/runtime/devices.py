"""Where a model runs: its device and its dtype, chosen once before it loads.

Each model gets a device (``cpu``, ``cuda:N``) and a dtype (``float32``, ``float16``,
``bfloat16``), from the first of these that says one:

1. the model's folder in the repository: ``device`` and ``dtype`` in ``model.toml``,
   which :class:`~protoserve.server.runtime.repository.ModelConfig` sets on the model;
2. the model's class: :attr:`Model.device` and :attr:`Model.dtype`;
3. the server: ``--device`` (``auto`` by default) and ``--dtype`` (``float32``).
   ``auto`` places on the GPU only the models that say they follow ``self.device``
   (:attr:`Model.follows_device`: the built-in bytelm and TorchScript/``torch.export``
   files); a class that does not say so stays on the CPU unless a device is named.

:func:`place` resolves them into a concrete :class:`torch.device` and
:class:`torch.dtype`, set on the model instance before :meth:`Model.load`, which
reads them. ``auto`` is the current CUDA device when ``torch.cuda.is_available()``,
else the CPU; ``cuda`` is the current CUDA device, by its index. A device this
machine does not have is a :class:`DeviceError`.

Tensors cross between the host and the device once per model call
(:func:`to_device`, :func:`to_host`): from pinned host memory without waiting,
when the device is a GPU.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

log = logging.getLogger("protoserve.server")

__all__ = [
    "DEVICE_FORMS",
    "DTYPE_NAMES",
    "DeviceError",
    "MemoryReader",
    "UtilizationReader",
    "check_device",
    "check_dtype",
    "cuda_memory",
    "device_name",
    "dtype_name",
    "gpu_utilization",
    "place",
    "resolve_device",
    "resolve_dtype",
    "to_device",
    "to_host",
]

#: What a device setting may say, for messages.
DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
#: The dtypes a model may be loaded in, by name.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
#: Reads the CUDA memory for /metrics (:func:`cuda_memory`; a test gives another).
MemoryReader = Callable[[], list[tuple[str, int, int]]]
_DEVICE = re.compile(r"^(auto|cpu|cuda(:[0-9]{1,3})?)$")


class DeviceError(ValueError):
    """A device or dtype setting that cannot be used here; the message says why."""


def check_device(name: str) -> str:
    """``name`` if it is one of :data:`DEVICE_FORMS` (whether or not this machine has it).

    Raises:
        DeviceError: it is none of them.
    """
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise DeviceError(f"device {name!r} is not one of {DEVICE_FORMS}")
    return name


def check_dtype(name: str) -> str:
    """``name`` if it is one of :data:`DTYPE_NAMES`. Raises DeviceError otherwise."""
    if not isinstance(name, str) or name not in DTYPE_NAMES:
        raise DeviceError(f"dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return name


def resolve_device(setting: str | torch.device) -> torch.device:
    """The concrete device a setting names on this machine: ``cpu`` or ``cuda:N``.

    Raises:
        DeviceError: the setting is malformed, or names CUDA where torch sees no
            CUDA device, or a CUDA device this machine does not have.
    """
    if isinstance(setting, torch.device):
        setting = str(setting)
    name = check_device(setting)
    if name == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda", _current_cuda()) if available else torch.device("cpu")
    if not available:
        why = (
            "this torch is built without CUDA"
            if torch.version.cuda is None
            else "torch sees no CUDA device"
        )
        raise DeviceError(f"device {name!r}: {why} (torch {torch.__version__}); use cpu or auto")
    count = torch.cuda.device_count()
    index = _current_cuda() if name == "cuda" else int(name.partition(":")[2])
    if index >= count:
        have = ", ".join(f"cuda:{i}" for i in range(count))
        raise DeviceError(
            f"device {name!r} does not exist: this machine has {count} CUDA "
            f"device{'s' if count != 1 else ''} ({have})"
        )
    return torch.device("cuda", index)


def _current_cuda() -> int:
    """The current CUDA device's index, without initialising CUDA to ask (0 before)."""
    initialized: bool = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    return torch.cuda.current_device() if initialized else 0


def resolve_dtype(setting: str | torch.dtype) -> torch.dtype:
    """The :class:`torch.dtype` a setting names. Raises DeviceError for another one."""
    if isinstance(setting, torch.dtype):
        if setting not in DTYPE_NAMES.values():
            raise DeviceError(f"dtype {setting} is not one of {', '.join(DTYPE_NAMES)}")
        return setting
    return DTYPE_NAMES[check_dtype(setting)]


def place(model: Any, default_device: str, default_dtype: str) -> tuple[torch.device, torch.dtype]:
    """Resolve a model's device and dtype and set them on the instance (before ``load``).

    The model's own (``model.device``, ``model.dtype``: its class's, or what its
    ``model.toml`` set on it) win over the server's defaults; None leaves those.

    Raises:
        DeviceError: the device or dtype cannot be used here (the message says why).
    """
    own_device = getattr(model, "device", None)
    own_dtype = getattr(model, "dtype", None)
    if own_device is None and default_device == "auto" and not model.follows_device:
        # A class that never said it places itself may ignore ``self.device``: ``auto``
        # leaves it on the CPU, as before devices existed; ``--device cuda`` moves it.
        own_device = "cpu"
    device = resolve_device(default_device if own_device is None else own_device)
    dtype = resolve_dtype(default_dtype if own_dtype is None else own_dtype)
    if device.type == "cuda" and dtype == torch.bfloat16:
        with torch.cuda.device(device):
            if not torch.cuda.is_bf16_supported(including_emulation=False):
                raise DeviceError(
                    f"dtype bfloat16: {device} ({torch.cuda.get_device_name(device)}) has no "
                    "bfloat16 arithmetic; use float16 or float32"
                )
    model.device, model.dtype = device, dtype
    return device, dtype


def device_name(device: torch.device | None) -> str:
    """How a device is reported: ``cpu``, ``cuda:0``; "" for none (not placed yet)."""
    if device is None:
        return ""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{_current_cuda()}"
    return str(device)


def dtype_name(dtype: torch.dtype | None) -> str:
    """How a dtype is reported: ``float32``; "" for none."""
    return "" if dtype is None else str(dtype).removeprefix("torch.")


def to_device(tensors: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``tensors`` on ``device``: one copy each, none for those already there.

    To a GPU the copy starts from pinned (page-locked) host memory without waiting
    for it (``non_blocking``); the model's work on the same stream follows it.
    """
    if device.type != "cuda":
        return {name: t.to(device) for name, t in tensors.items()}
    moved = {}
    for name, tensor in tensors.items():
        if tensor.device != device and tensor.device.type == "cpu":
            tensor = tensor.pin_memory()
        moved[name] = tensor.to(device, non_blocking=True)
    return moved


def to_host(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """``tensors`` on the CPU (a blocking copy each: the results are read at once); what
    is not a tensor is left for the caller to refuse."""
    return {name: t.cpu() if isinstance(t, torch.Tensor) else t for name, t in tensors.items()}


#: Reads each GPU's utilisation for /metrics (:func:`gpu_utilization`; a test gives another).
UtilizationReader = Callable[[], list[tuple[str, float]]]


def gpu_utilization() -> list[tuple[str, float]]:
    """``(device, busy share 0..1)`` for every CUDA device, from NVIDIA's management
    library through ``nvidia-ml-py`` (the optional extra ``protoserve[gpu]``): the share
    of the last sample period in which a kernel ran. Empty without the package, without
    CUDA, or when NVML will not answer (the reason is logged once)."""
    if not torch.cuda.is_available():
        return []
    try:
        import pynvml  # type: ignore[import-not-found]  # nvidia-ml-py
    except ImportError:
        return []
    global _nvml_failed
    if _nvml_failed:
        return []
    try:
        pynvml.nvmlInit()
        rows = []
        for index in range(torch.cuda.device_count()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            rows.append((f"cuda:{index}", pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100))
        return rows
    except Exception as error:  # pynvml.NVMLError and its kin: NVML is not there to ask
        _nvml_failed = True
        log.warning("GPU utilisation: NVML does not answer (%s); not reported", error)
        return []


#: NVML failed once: not asked again (each scrape would log it).
_nvml_failed = False


def cuda_memory() -> list[tuple[str, int, int]]:
    """``(device, bytes allocated, bytes reserved)`` by torch's caching allocator for
    every CUDA device, read now; empty without CUDA. Never initialises CUDA: before
    anything ran on a GPU, torch reports 0."""
    if not torch.cuda.is_available():
        return []
    return [
        (f"cuda:{i}", torch.cuda.memory_allocated(i), torch.cuda.memory_reserved(i))
        for i in range(torch.cuda.device_count())
    ]
