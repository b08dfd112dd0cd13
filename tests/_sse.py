"""Server-Sent Events as a browser's EventSource reads them, for the tests.

The WHATWG "event stream interpretation" rules: the bytes are UTF-8 (one
leading BOM dropped); lines end at CRLF, LF or CR; ``:`` lines are comments
and skipped; fields gather until a blank line dispatches the event; ``data``
lines are joined with newlines; an event with no ``data`` line is not
dispatched. An event that the stream ends before its blank line is dropped,
as a browser drops it, so a test reading through this parser fails when the
gateway forgets the blank line after its last event.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = ["Event", "events", "lines"]

_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Event:
    """One dispatched event, as a MessageEvent shows it."""

    #: the ``event`` field; "message" when there was none.
    event: str
    data: str
    #: the last ``id`` field seen so far in the stream (EventSource's lastEventId).
    id: str


def lines(stream: bytes | Iterable[bytes]) -> Iterator[str]:
    """The stream's lines, without their ends; an unterminated last line is not one."""
    chunks = [stream] if isinstance(stream, bytes) else stream
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
    pending = ""
    for chunk in chunks:
        pending += decoder.decode(chunk)
        # A CR at the end of a chunk may be the first half of a CRLF: hold it back.
        complete = pending[:-1] if pending.endswith("\r") else pending
        *found, rest = _LINE_END.split(complete)
        yield from found
        pending = rest + pending[len(complete) :]
    pending += decoder.decode(b"", final=True)
    *found, _ = _LINE_END.split(pending)
    yield from found


def events(stream: bytes | Iterable[bytes]) -> Iterator[Event]:
    """The events of ``stream`` (a whole body, or its chunks as they arrive)."""
    kind, data, last_id = "", "", ""
    for line in lines(stream):
        if not line:
            if data:
                yield Event(kind or "message", data.removesuffix("\n"), last_id)
            kind, data = "", ""
            continue
        if line.startswith(":"):
            continue
        field, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if field == "event":
            kind = value
        elif field == "data":
            data += value + "\n"
        elif field == "id" and "\0" not in value:
            last_id = value
