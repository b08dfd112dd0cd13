"""Named tensors as raw little-endian bytes and back, without per-element copies, and checked
against what a model declares."""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from protoserve.common import dtypes
from protoserve.server.runtime.errors import FieldViolation, InvalidArgument
from protoserve.server.runtime.model import TensorInfo

__all__ = ["DTYPES", "RawTensor", "check_declared", "from_raw", "to_raw"]

#: dtype names of the API (:mod:`protoserve.common.dtypes`), and the torch dtypes
#: they stand for. uint16/32/64 travel only over the Open Inference Protocol; torch
#: stores, reshapes, concatenates and compares them, though few of its ops compute on them.
DTYPES: dict[str, torch.dtype] = {
    d.name: getattr(torch, d.name) for d in dtypes.DTYPES if d.storage is not None
}
_NAMES = {v: k for k, v in DTYPES.items()}

# The wire format is little-endian; every platform torch ships CPU wheels for is too.
assert sys.byteorder == "little", "protoserve assumes a little-endian host"


@dataclass(frozen=True)
class RawTensor:
    """A tensor as it travels: name, dtype name, shape, and row-major little-endian bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes


def from_raw(tensors: Sequence[RawTensor], field: str = "inputs") -> dict[str, torch.Tensor]:
    """Torch tensors from raw tensors, checking names, dtypes and byte counts.

    Raises:
        InvalidArgument: naming the offending ``inputs[i].<field>``.
    """
    out: dict[str, torch.Tensor] = {}
    violations: list[FieldViolation] = []
    for i, raw in enumerate(tensors):
        where = f"{field}[{i}]"
        if not raw.name:
            violations.append((f"{where}.name", "must not be empty"))
            continue
        if raw.name in out:
            violations.append((f"{where}.name", f"tensor {raw.name!r} is given twice"))
            continue
        dtype = DTYPES.get(raw.dtype)
        if dtype is None:
            violations.append((f"{where}.data_type", f"{raw.dtype!r} is not a tensor data type"))
            continue
        if any(d < 0 for d in raw.shape):
            violations.append((f"{where}.shape", "dimensions must not be negative"))
            continue
        # dtype.itemsize, not a new tensor's element_size(): no torch call per request
        # on the event loop (one lets go of the GIL and waits for it).
        itemsize = dtype.itemsize
        expected = math.prod(raw.shape) * itemsize
        if len(raw.data) != expected:
            violations.append(
                (
                    f"{where}.raw_data",
                    f"shape {list(raw.shape)} of {raw.dtype} needs {expected} bytes, "
                    f"got {len(raw.data)}",
                )
            )
            continue
        # bytearray: torch.frombuffer needs a writable buffer; this is the one copy.
        flat = (
            torch.frombuffer(bytearray(raw.data), dtype=dtype)
            if expected
            else torch.empty(0, dtype=dtype)
        )
        out[raw.name] = flat.reshape(raw.shape)
    if violations:
        raise InvalidArgument(
            "invalid tensors: " + "; ".join(f"{f} {d}" for f, d in violations), violations
        )
    return out


def to_raw(name: str, tensor: torch.Tensor) -> RawTensor:
    """A raw tensor from a torch tensor (moved to the CPU, made contiguous).

    Raises:
        TypeError: when the dtype has no name in the API (complex, for one).
    """
    if tensor.dtype not in _NAMES:
        raise TypeError(f"output {name!r} has dtype {tensor.dtype}, which the API cannot carry")
    flat = tensor.detach().to("cpu").contiguous()
    size = flat.numel() * flat.element_size()
    data = ctypes.string_at(flat.data_ptr(), size) if size else b""
    return RawTensor(name, _NAMES[flat.dtype], tuple(flat.shape), data)


def check_declared(inputs: Sequence[TensorInfo], tensors: Mapping[str, torch.Tensor]) -> None:
    """``tensors`` against a model's declared ``inputs``, when it declares any.

    Raises:
        InvalidArgument: naming each unknown, missing or mismatched input.
    """
    if not inputs:
        return
    violations = []
    declared = {spec.name: spec for spec in inputs}
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
