"""Open Inference Protocol tensors: datatypes, typed and raw contents, BYTES framing.

A request's inputs arrive either as typed ``contents`` (one repeated field per
kind of element) or, for every input at once, as ``raw_input_contents``
(little-endian bytes; a BYTES element is a 4-byte little-endian length and its
bytes). :func:`read_inputs` checks either form against each input's datatype
and shape and turns it into :class:`InferInput` values: raw bytes in the
runtime's layout for numbers, a list of byte strings for BYTES. Outputs always
travel raw (:func:`protoserve.common.framing.frame` frames BYTES elements).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from protoserve.common import framing
from protoserve.common.dtypes import BY_OIP, OIP_BYTES
from protoserve.oip.v2 import grpc_service_pb2 as pb
from protoserve.server.runtime.errors import FieldViolation, InvalidArgument
from protoserve.server.runtime.tensors import RawTensor

__all__ = ["InferInput", "read_inputs"]


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
        return RawTensor(self.name, BY_OIP[self.datatype].name, self.shape, self.data)


def _unframe(data: bytes, count: int) -> tuple[bytes, ...] | str:
    """The elements of raw BYTES contents, or what is wrong with them."""
    try:
        elements = framing.unframe(data)
    except framing.FramingError as cut:
        if cut.needs is None:
            return f"ends inside the length of element {cut.element}"
        return f"element {cut.element} needs {cut.needs} bytes, {cut.left} are left"
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
    if tensor.datatype not in BY_OIP:
        return "datatype", (
            f"{tensor.datatype!r} is not a datatype of the protocol; one of " + ", ".join(BY_OIP)
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
    storage = BY_OIP[tensor.datatype].storage
    if storage is None:
        elements = _unframe(data, count)
        if isinstance(elements, str):
            return where, elements
        return InferInput(index, tensor.name, OIP_BYTES, shape, elements=elements)
    expected = count * np.dtype(storage).itemsize
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
    field = BY_OIP[datatype].contents
    if field is None:
        if typed or count:
            return where, f"{datatype} elements travel only as raw_input_contents"
        return InferInput(index, tensor.name, datatype, shape)
    if len(typed) > 1:
        return where, f"sets {' and '.join(typed)}; {datatype} elements go in {field} alone"
    if typed and typed[0] != field:
        return where, f"{datatype} elements go in {field}, not {typed[0]}"
    values = getattr(tensor.contents, field)
    if len(values) != count:
        return where, f"holds {len(values)} elements, shape {list(shape)} needs {count}"
    if datatype == OIP_BYTES:
        return InferInput(index, tensor.name, OIP_BYTES, shape, elements=tuple(values))
    source, target = BY_OIP[datatype].contents_element, BY_OIP[datatype].storage
    assert source is not None and target is not None  # every typed field but bytes_contents
    array = np.array(values, dtype=source)
    if np.dtype(source) != np.dtype(target) and array.size:
        # int_contents and uint_contents are 32-bit; narrower types must fit.
        info = np.iinfo(np.dtype(target))
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            return where, f"holds {bad}, outside the range of {datatype}"
    data = array.astype(target).tobytes()
    return InferInput(index, tensor.name, datatype, shape, data=data)
