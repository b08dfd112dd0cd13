"""Tensors of the Open Inference Protocol: JSON ``data``, raw bytes and typed contents.

Every input the gateway sends upstream travels as ``raw_input_contents``: the
elements row-major in little-endian bytes, BYTES elements each a 4-byte
little-endian length and the bytes. This module converts JSON ``data`` (flat or
nested) to those bytes, checks binary data a client sent, and turns an output's
raw bytes (or typed ``contents``, which other OIP servers answer with) into JSON
``data`` or the bytes a binary response carries.

Functions raise :class:`TensorError` with a message that says what is wrong but
not which tensor: the caller knows that, and whether the request or the
upstream is to blame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from protoserve.common import dtypes, framing

__all__ = [
    "DATATYPES",
    "NotUtf8Error",
    "TensorError",
    "check_raw",
    "contents_to_raw",
    "element_count",
    "json_to_raw",
    "raw_to_json",
]


class TensorError(ValueError):
    """A tensor's elements do not match its datatype or shape."""


class NotUtf8Error(TensorError):
    """BYTES elements that are not UTF-8 text, so JSON cannot carry them."""


@dataclass(frozen=True)
class _Type:
    """One OIP datatype: its bytes, its JSON values and its ``InferTensorContents`` field."""

    kind: str  # "bool", "int", "float" or "bytes"
    dtype: np.dtype[Any] | None  # little-endian storage; None for BYTES
    contents: str | None  # InferTensorContents field; None for FP16 and BF16


#: The protocol's datatypes (:mod:`protoserve.common.dtypes`). BF16 is stored as the
#: top 16 bits of an FP32.
DATATYPES: dict[str, _Type] = {
    d.oip: _Type(d.kind, np.dtype(d.storage) if d.storage else None, d.contents)
    for d in dtypes.DTYPES
}
_KIND_WORDS = {
    "bool": "true or false",
    "int": "integers",
    "float": "numbers",
    "bytes": "strings",
}


def datatype(name: str) -> _Type:
    """The datatype called ``name``.

    Raises:
        TensorError: not one of the protocol's datatypes.
    """
    found = DATATYPES.get(name)
    if found is None:
        raise TensorError(f"datatype {name!r} is not one of {', '.join(DATATYPES)}")
    return found


def element_count(shape: list[int]) -> int:
    """How many elements a tensor of ``shape`` holds."""
    return math.prod(shape)


def json_to_raw(datatype_name: str, shape: list[int], data: Any) -> bytes:
    """JSON ``data`` (row-major, flat or nested) as the raw bytes of ``datatype_name``.

    BOOL takes true/false, integer types integers in their range, FP16, FP32, FP64
    and BF16 numbers (BF16 rounds to nearest even), BYTES strings (UTF-8).

    Raises:
        TensorError: the element count is not the shape's, or a value is not of the
            datatype or does not fit it.
    """
    kind = datatype(datatype_name)
    if not isinstance(data, list):
        raise TensorError("data must be a JSON array")
    flat = _flatten(data)
    count = element_count(shape)
    if len(flat) != count:
        raise TensorError(f"data has {len(flat)} elements but shape {shape} holds {count}")
    if kind.kind == "bytes":
        return framing.frame(_utf8(flat))
    _check_json_types(kind, flat, datatype_name)
    assert kind.dtype is not None
    if kind.kind == "bool":
        return np.array(flat, dtype=kind.dtype).tobytes()
    if kind.kind == "int":
        info = np.iinfo(kind.dtype)
        if flat and (min(flat) < info.min or max(flat) > info.max):
            bad = next(v for v in flat if not info.min <= v <= info.max)
            raise TensorError(f"{bad} does not fit {datatype_name}")
        return np.array(flat, dtype=kind.dtype).tobytes()
    try:
        wide = np.array(flat, dtype=np.float64)
    except OverflowError:
        raise TensorError(f"a value is too large for {datatype_name}") from None
    return _floats(wide, datatype_name)


def _flatten(data: list[Any]) -> list[Any]:
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    # A loop, not recursion: nesting can be as deep as the JSON parser allows.
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _check_json_types(kind: _Type, flat: list[Any], name: str) -> None:
    allowed: tuple[type, ...] = {
        "bool": (bool,),
        "int": (int,),
        "float": (int, float),
    }[kind.kind]
    # type(), not isinstance(): true is an int to Python, not to the protocol.
    if not set(map(type, flat)) <= set(allowed):
        bad = next(v for v in flat if type(v) not in allowed)
        raise TensorError(f"{name} data must be {_KIND_WORDS[kind.kind]}, not {_shown(bad)}")


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "an array"
    return repr(value)


def _floats(wide: np.ndarray[Any, Any], name: str) -> bytes:
    if name == "FP64":
        return wide.astype("<f8").tobytes()
    with np.errstate(over="ignore"):
        narrow = wide.astype("<f2" if name == "FP16" else "<f4")
    stored = _to_bf16(narrow) if name == "BF16" else narrow
    back = _from_bf16(stored) if name == "BF16" else narrow
    # A finite number that became infinite does not fit; NaN and infinities do.
    overflowed = np.isinf(back) & np.isfinite(wide)
    if np.any(overflowed):
        raise TensorError(f"{float(wide[overflowed][0])!r} does not fit {name}")
    return stored.tobytes()


def _to_bf16(fp32: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """FP32 values as BF16 bit patterns (uint16), rounded to nearest even, as torch does."""
    bits = fp32.view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    # NaN stays NaN (rounding could carry it into infinity): keep its top bits, quieted.
    nan = np.isnan(fp32)
    rounded[nan] = (bits[nan] >> 16) | 0x40
    return rounded.astype("<u2")


def _from_bf16(bits: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return (bits.astype("<u4") << 16).view("<f4")


def _utf8(flat: list[Any]) -> list[bytes]:
    if not set(map(type, flat)) <= {str}:
        bad = next(v for v in flat if type(v) is not str)
        raise TensorError(f"BYTES data must be strings, not {_shown(bad)}")
    try:
        return [item.encode("utf-8") for item in flat]
    except UnicodeEncodeError:
        raise TensorError("a BYTES string holds a lone UTF-16 surrogate") from None


def _unframe(raw: bytes, count: int) -> list[bytes]:
    """The elements of raw BYTES data, which must hold exactly ``count`` of them."""
    try:
        items = framing.unframe(raw)
    except framing.FramingError as cut:
        if cut.needs is None:
            raise TensorError(
                f"BYTES data ends inside an element's length (byte {cut.offset})"
            ) from None
        raise TensorError(
            f"BYTES element {cut.element} says {cut.needs} bytes but only {cut.left} are left"
        ) from None
    if len(items) != count:
        raise TensorError(f"BYTES data holds {len(items)} elements, not {count}")
    return items


def check_raw(datatype_name: str, shape: list[int], raw: bytes) -> None:
    """Check that ``raw`` holds exactly the elements of a ``datatype_name`` tensor of ``shape``.

    Raises:
        TensorError: a fixed-size type's byte count is not count x element size, or
            BYTES data is not ``count`` length-prefixed elements.
    """
    kind = datatype(datatype_name)
    count = element_count(shape)
    if kind.dtype is None:
        _unframe(raw, count)
        return
    expected = count * kind.dtype.itemsize
    if len(raw) != expected:
        raise TensorError(
            f"{len(raw)} bytes of {datatype_name} data, but shape {shape} needs {expected}"
        )


def raw_to_json(datatype_name: str, shape: list[int], raw: bytes) -> list[Any]:
    """The elements of raw data as a flat JSON list (BYTES as UTF-8 strings).

    Raises:
        TensorError: the bytes do not match the datatype and shape, or BYTES
            elements are not UTF-8 (such an output can only go as binary data).
    """
    check_raw(datatype_name, shape, raw)
    kind = datatype(datatype_name)
    if kind.dtype is None:
        try:
            return [item.decode("utf-8") for item in _unframe(raw, element_count(shape))]
        except UnicodeDecodeError:
            raise NotUtf8Error(
                "holds bytes that are not UTF-8, which JSON cannot carry; ask for it with "
                '"parameters": {"binary_data": true}'
            ) from None
    values = np.frombuffer(raw, dtype=kind.dtype)
    if datatype_name == "BF16":
        values = _from_bf16(values)
    result: list[Any] = values.tolist()
    return result


def contents_to_raw(datatype_name: str, shape: list[int], contents: Any) -> bytes:
    """Typed ``InferTensorContents`` as raw bytes (FP16 and BF16 have no typed field).

    Raises:
        TensorError: no typed field for the datatype, the element count is not the
            shape's, or a value does not fit the datatype.
    """
    kind = datatype(datatype_name)
    if kind.contents is None:
        raise TensorError(f"{datatype_name} has no typed contents; it must come as raw bytes")
    values = list(getattr(contents, kind.contents))
    count = element_count(shape)
    if len(values) != count:
        raise TensorError(f"{len(values)} elements in contents, but shape {shape} holds {count}")
    if kind.dtype is None:
        return framing.frame([bytes(v) for v in values])
    try:
        return np.array(values, dtype=kind.dtype).tobytes()
    except OverflowError:
        raise TensorError(f"contents hold a value that does not fit {datatype_name}") from None
