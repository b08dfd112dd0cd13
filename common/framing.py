"""The Open Inference Protocol's BYTES framing: each element a 4-byte little-endian
length, then its bytes, elements back to back (raw contents and binary data alike)."""

from __future__ import annotations

import struct
from collections.abc import Sequence

__all__ = ["FramingError", "frame", "unframe"]

_LENGTH = struct.Struct("<I")


class FramingError(ValueError):
    """Framed data that ends early: inside element ``element``'s length (``needs`` is
    None) or inside its bytes (it says ``needs`` bytes, ``left`` are left). ``offset``
    is where the length (or the bytes) began. Each protocol words it for its callers."""

    def __init__(self, element: int, offset: int, needs: int | None, left: int) -> None:
        super().__init__(f"element {element} is cut short at byte {offset}")
        self.element, self.offset, self.needs, self.left = element, offset, needs, left


def frame(elements: Sequence[bytes]) -> bytes:
    """``elements`` framed as BYTES contents."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def unframe(data: bytes) -> list[bytes]:
    """The elements of framed ``data`` (the caller checks their count against a shape).

    Raises:
        FramingError: the data ends inside an element's length or its bytes.
    """
    elements: list[bytes] = []
    view = memoryview(data)
    pos, end = 0, len(data)
    while pos < end:
        if pos + 4 > end:
            raise FramingError(len(elements), pos, None, end - pos)
        (length,) = _LENGTH.unpack_from(view, pos)
        pos += 4
        if pos + length > end:
            raise FramingError(len(elements), pos, length, end - pos)
        elements.append(bytes(view[pos : pos + length]))
        pos += length
    return elements
