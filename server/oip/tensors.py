"""Open Inference Protocol tensors: datatypes, typed and raw contents, BYTES framing.

A request's inputs arrive either as typed ``contents`` (one repeated field per
kind of element) or, for every input at once, as ``raw_input_contents``
(little-endian bytes; a BYTES element is a 4-byte little-endian length and its
bytes). :func:`read_inputs` checks either form against each input's datatype
and shape and turns it into :class:`InferInput` values: raw bytes in the
runtime's layout for numbers, a list of byte strings for BYTES. Outputs always
travel raw (:func:`encode_bytes` frames BYTES elements).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from protoserve.oip.v2 import grpc_service_pb2 as pb
from protoserve.server.errors import FieldViolation, InvalidArgument
from protoserve.server.runtime.tensors import RawTensor

__all__ = [
    "BYTES",
    "CONFIG_TYPES",
    "DATATYPES",
    "InferInput",
    "datatype_of",
    "encode_bytes",
    "read_inputs",
]

BYTES = "BYTES"

#: Protocol datatype -> the runtime's dtype name (``TensorInfo.dtype``); BYTES is text.
DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "BF16": "bfloat16",
    "FP32": "float32",
    "FP64": "float64",
    BYTES: "string",
}
_DTYPE_TO_DATATYPE = {v: k for k, v in DATATYPES.items()}

#: Protocol datatype -> Triton's model configuration DataType (ModelConfig).
CONFIG_TYPES: dict[str, pb.DataType] = {
    "BOOL": pb.TYPE_BOOL,
    "UINT8": pb.TYPE_UINT8,
    "UINT16": pb.TYPE_UINT16,
    "UINT32": pb.TYPE_UINT32,
    "UINT64": pb.TYPE_UINT64,
    "INT8": pb.TYPE_INT8,
    "INT16": pb.TYPE_INT16,
    "INT32": pb.TYPE_INT32,
    "INT64": pb.TYPE_INT64,
    "FP16": pb.TYPE_FP16,
    "BF16": pb.TYPE_BF16,
    "FP32": pb.TYPE_FP32,
    "FP64": pb.TYPE_FP64,
    BYTES: pb.TYPE_STRING,
}

#: Bytes per element of the fixed-size datatypes.
_ITEMSIZE = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "BF16": 2,
    "FP32": 4,
    "FP64": 8,
}

#: Datatype -> (its ``contents`` field, the numpy dtype of that field's elements, the
#: little-endian numpy dtype of the datatype). FP16 and BF16 have no field: the
#: protocol carries them raw only.
_CONTENTS: dict[str, tuple[str, str, str]] = {
    "BOOL": ("bool_contents", "?", "?"),
    "INT8": ("int_contents", "i4", "<i1"),
    "INT16": ("int_contents", "i4", "<i2"),
    "INT32": ("int_contents", "i4", "<i4"),
    "INT64": ("int64_contents", "i8", "<i8"),
    "UINT8": ("uint_contents", "u4", "<u1"),
    "UINT16": ("uint_contents", "u4", "<u2"),
    "UINT32": ("uint_contents", "u4", "<u4"),
    "UINT64": ("uint64_contents", "u8", "<u8"),
    "FP32": ("fp32_contents", "f4", "<f4"),
    "FP64": ("fp64_contents", "f8", "<f8"),
    BYTES: ("bytes_contents", "", ""),
}
_LENGTH = struct.Struct("<I")


def datatype_of(dtype: str) -> str:
    """The protocol datatype for a runtime dtype name (``"float32"`` -> ``"FP32"``).

    A name the runtime does not know is passed on upper-cased: it is the model's own.
    """
    return _DTYPE_TO_DATATYPE.get(dtype, dtype.upper())


@dataclass(frozen=True)
class InferInput:
    """One checked input: BYTES as ``elements``, anything else as raw ``data``."""

    index: int
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes = b""
    elements: tuple[bytes, ...] = ()

    @property
    def field(self) -> str:
        """The request field this input came from, for error messages."""
        return f"inputs[{self.index}]"

    def raw(self) -> RawTensor:
        """The input as the runtime takes tensors (not for BYTES)."""
        return RawTensor(self.name, DATATYPES[self.datatype], self.shape, self.data)


def encode_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES elements as raw contents: each a 4-byte little-endian length, then its bytes."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def _decode_bytes(data: bytes, count: int) -> tuple[bytes, ...] | str:
    """The elements of raw BYTES contents, or what is wrong with them."""
    elements: list[bytes] = []
    pos, end = 0, len(data)
    while pos < end:
        if pos + 4 > end:
            return f"ends inside the length of element {len(elements)}"
        (length,) = _LENGTH.unpack_from(data, pos)
        pos += 4
        if pos + length > end:
            return f"element {len(elements)} needs {length} bytes, {end - pos} are left"
        elements.append(data[pos : pos + length])
        pos += length
    if len(elements) != count:
        return f"holds {len(elements)} BYTES elements, the shape needs {count}"
    return tuple(elements)


def read_inputs(request: pb.ModelInferRequest) -> list[InferInput]:
    """Every input of ``request``, checked and decoded.

    Raises:
        InvalidArgument: one field violation per problem (a missing or repeated name,
            an unknown datatype, a negative dimension, contents that do not match the
            datatype or the shape, raw and typed contents mixed).
    """
    raw = request.raw_input_contents
    violations: list[FieldViolation] = []
    if raw and len(raw) != len(request.inputs):
        violations.append(
            (
                "raw_input_contents",
                f"holds {len(raw)} entries for {len(request.inputs)} inputs; "
                "it needs one per input, in order",
            )
        )
    seen: set[str] = set()
    inputs: list[InferInput] = []
    for i, tensor in enumerate(request.inputs):
        where = f"inputs[{i}]"
        problem = _header_problem(tensor, seen)
        if problem is not None:
            violations.append((f"{where}.{problem[0]}", problem[1]))
            continue
        seen.add(tensor.name)
        typed = [field.name for field, _ in tensor.contents.ListFields()]
        if raw and typed:
            violations.append(
                (
                    f"{where}.contents",
                    "must be empty when the request carries raw_input_contents: "
                    "send every input raw, or every input as contents",
                )
            )
            continue
        if raw and i >= len(raw):
            continue  # already reported: too few raw entries
        decoded = _from_raw(i, tensor, raw[i]) if raw else _from_contents(i, tensor, typed)
        if isinstance(decoded, InferInput):
            inputs.append(decoded)
        else:
            violations.append(decoded)
    if violations:
        raise InvalidArgument(
            "invalid inputs: " + "; ".join(f"{f}: {d}" for f, d in violations), violations
        )
    return inputs


def _header_problem(
    tensor: pb.ModelInferRequest.InferInputTensor, seen: set[str]
) -> tuple[str, str] | None:
    """(field, problem) with the input's name, datatype, shape or parameters, if any."""
    if not tensor.name:
        return "name", "must not be empty"
    if tensor.name in seen:
        return "name", f"input {tensor.name!r} is given twice"
    if tensor.datatype not in DATATYPES:
        return "datatype", (
            f"{tensor.datatype!r} is not a datatype of the protocol; one of " + ", ".join(DATATYPES)
        )
    if any(d < 0 for d in tensor.shape):
        return "shape", f"dimensions must not be negative, got {list(tensor.shape)}"
    for name in tensor.parameters:
        # binary_data_size is the REST binary extension's framing, which a gateway may
        # pass on; anything else (shared memory regions) is a feature not served here.
        if name != "binary_data_size":
            return "parameters", f"{name!r} is not supported"
    return None


def _from_raw(
    index: int, tensor: pb.ModelInferRequest.InferInputTensor, data: bytes
) -> InferInput | FieldViolation:
    shape = tuple(tensor.shape)
    count = math.prod(shape)
    where = f"raw_input_contents[{index}]"
    if tensor.datatype == BYTES:
        elements = _decode_bytes(data, count)
        if isinstance(elements, str):
            return where, elements
        return InferInput(index, tensor.name, BYTES, shape, elements=elements)
    expected = count * _ITEMSIZE[tensor.datatype]
    if len(data) != expected:
        return where, (
            f"shape {list(shape)} of {tensor.datatype} needs {expected} bytes, got {len(data)}"
        )
    return InferInput(index, tensor.name, tensor.datatype, shape, data=data)


def _from_contents(
    index: int, tensor: pb.ModelInferRequest.InferInputTensor, typed: list[str]
) -> InferInput | FieldViolation:
    shape = tuple(tensor.shape)
    count = math.prod(shape)
    where = f"inputs[{index}].contents"
    datatype = tensor.datatype
    if datatype not in _CONTENTS:
        if typed or count:
            return where, f"{datatype} elements travel only as raw_input_contents"
        return InferInput(index, tensor.name, datatype, shape)
    field, source, target = _CONTENTS[datatype]
    if len(typed) > 1:
        return where, f"sets {' and '.join(typed)}; {datatype} elements go in {field} alone"
    if typed and typed[0] != field:
        return where, f"{datatype} elements go in {field}, not {typed[0]}"
    values = getattr(tensor.contents, field)
    if len(values) != count:
        return where, f"holds {len(values)} elements, shape {list(shape)} needs {count}"
    if datatype == BYTES:
        return InferInput(index, tensor.name, BYTES, shape, elements=tuple(values))
    array = np.array(values, dtype=source)
    if source != target.lstrip("<") and array.size:
        # int_contents and uint_contents are 32-bit; narrower types must fit.
        info = np.iinfo(np.dtype(target))
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            return where, f"holds {bad}, outside the range of {datatype}"
    data = array.astype(target).tobytes()
    return InferInput(index, tensor.name, datatype, shape, data=data)
