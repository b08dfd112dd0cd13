"""The tensor element types of the API, and what each is called in every place it appears.

One row per type: its name in the API (``TensorInfo.dtype``, ``model.toml``, the
runtime), its value in v1's ``DataType`` enum, its Open Inference Protocol
datatype and Triton model-configuration type, the little-endian bytes that carry
one element, and its typed ``InferTensorContents`` field. The server maps the
names onto torch dtypes, the clients onto numpy ones, the gateway converts JSON
values with them; none of them keeps a table of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BY_NAME", "BY_OIP", "DTYPES", "OIP_BYTES", "DType", "oip_datatype"]


@dataclass(frozen=True)
class DType:
    """One element type."""

    #: The API's name: ``"float32"``; ``"string"`` for text (a BYTES tensor).
    name: str
    #: ``"bool"``, ``"int"``, ``"float"`` or ``"bytes"``: which JSON values stand for it.
    kind: str
    #: numpy's name for the little-endian bytes of one element (``"<f4"``); None for
    #: text. bfloat16 travels as its 16 bits (numpy has no bfloat16).
    storage: str | None
    #: The Open Inference Protocol's datatype: ``"FP32"``.
    oip: str
    #: Whether v1's ``DataType`` has a value for it (uint16/32/64 travel only over
    #: the OIP).
    in_v1: bool
    #: The OIP ``InferTensorContents`` field that carries it typed, and numpy's name
    #: for that field's elements; None for FP16 and BF16, which travel raw only.
    contents: str | None
    contents_element: str | None

    @property
    def wire(self) -> str | None:
        """v1's ``DataType`` value name (``"DATA_TYPE_FLOAT32"``), None when it has none."""
        return f"DATA_TYPE_{self.name.upper()}" if self.in_v1 else None

    @property
    def config(self) -> str:
        """Triton's model configuration ``DataType`` value name: ``"TYPE_FP32"``."""
        return "TYPE_STRING" if self.oip == OIP_BYTES else f"TYPE_{self.oip}"


#: Every type, in the order the API lists them.
DTYPES: tuple[DType, ...] = (
    DType("bool", "bool", "|b1", "BOOL", True, "bool_contents", "?"),
    DType("uint8", "int", "|u1", "UINT8", True, "uint_contents", "u4"),
    DType("uint16", "int", "<u2", "UINT16", False, "uint_contents", "u4"),
    DType("uint32", "int", "<u4", "UINT32", False, "uint_contents", "u4"),
    DType("uint64", "int", "<u8", "UINT64", False, "uint64_contents", "u8"),
    DType("int8", "int", "|i1", "INT8", True, "int_contents", "i4"),
    DType("int16", "int", "<i2", "INT16", True, "int_contents", "i4"),
    DType("int32", "int", "<i4", "INT32", True, "int_contents", "i4"),
    DType("int64", "int", "<i8", "INT64", True, "int64_contents", "i8"),
    DType("float16", "float", "<f2", "FP16", True, None, None),
    DType("bfloat16", "float", "<u2", "BF16", True, None, None),
    DType("float32", "float", "<f4", "FP32", True, "fp32_contents", "f4"),
    DType("float64", "float", "<f8", "FP64", True, "fp64_contents", "f8"),
    DType("string", "bytes", None, "BYTES", True, "bytes_contents", None),
)  # fmt: skip

#: The OIP datatype of text: length-prefixed elements (:mod:`protoserve.common.framing`).
OIP_BYTES = "BYTES"

BY_NAME: dict[str, DType] = {d.name: d for d in DTYPES}
BY_OIP: dict[str, DType] = {d.oip: d for d in DTYPES}


def oip_datatype(name: str) -> str:
    """The OIP datatype for an API dtype name (``"float32"`` -> ``"FP32"``).

    A name the API does not know is passed on upper-cased: it is a model's own.
    """
    found = BY_NAME.get(name)
    return found.oip if found is not None else name.upper()
