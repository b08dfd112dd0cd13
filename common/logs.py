"""Logs of the server and the gateway: text or JSON lines on stderr, each carrying
the request id of the call it was written for.

:data:`REQUEST_ID` holds the id of the call being served: the server sets it for
each gRPC call (``protoserve.server.calls``), the gateway for each HTTP request
(``RequestIdMiddleware``). grpc.aio and the ASGI servers run each call in a task
of its own, and a task runs in a copy of the context, so the id is seen by
everything that call runs and by nothing else. :class:`RequestIdFilter`,
installed on the handler, copies it onto every record as ``request_id`` (None
outside a call), so a line logged anywhere while a call is served carries its id
without being told.

:func:`request_id` is the one rule both processes apply to an id a caller sends
(``x-request-id``): taken as given when it is short and plain, else replaced.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import uuid
from datetime import UTC, datetime
from typing import Any, TextIO

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter as _BaseJsonFormatter

__all__ = [
    "FORMATS",
    "REQUEST_ID",
    "JsonFormatter",
    "RequestIdFilter",
    "TextFormatter",
    "configure",
    "escape_controls",
    "request_id",
]

#: The values of ``--log-format``.
FORMATS = ("text", "json")

#: The request id of the call being served, None outside a call.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "protoserve_request_id", default=None
)

# Ids end up in logs and upstream metadata: only short, plain ones are taken as given.
_SANE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id(given: str | None) -> str:
    """``given`` when it is a sane id (1 to 128 of ``A-Za-z0-9._:-``), else a new one."""
    return given if given is not None and _SANE.match(given) else uuid.uuid4().hex


_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RequestIdFilter(logging.Filter):
    """Sets ``record.request_id`` to the current call's id, unless the line gave one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


# Control characters (C0, DEL, C1) and Unicode's line and paragraph separators: what
# could end a text line early, or forge one (a path with %0A in an access line).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x01``,
    ``\\u2028``): one line however it came, and never a forged one."""
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match[0]
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


class TextFormatter(logging.Formatter):
    """The plain format, with ``[request_id=...]`` after the message when there is one.

    The message and the request id have their control characters escaped
    (:func:`escape_controls`): a message is one line, whatever a client put in it;
    only a traceback, after it, spans lines.
    """

    def __init__(self) -> None:
        super().__init__(_TEXT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The record is shared with every other handler: escape a copy of it.
        shown = logging.makeLogRecord(record.__dict__)
        shown.message = escape_controls(record.message)
        shown.name = escape_controls(record.name)
        line = super().formatMessage(shown)
        rid = getattr(record, "request_id", None)
        # Here rather than in format(): before a traceback, not after it.
        return f"{line} [request_id={escape_controls(str(rid))}]" if rid else line


class JsonFormatter(_BaseJsonFormatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, request_id
    (when there is one), then the fields given with ``extra=`` (and ``exc_info``)."""

    def __init__(self) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s %(request_id)s",
            rename_fields={"levelname": "level", "name": "logger"},
            # uvicorn's color_message: its message again, with terminal colours.
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        # Set first so that it comes first in the line.
        log_data["time"] = (
            datetime.fromtimestamp(record.created, tz=UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )
        super().add_fields(log_data, record, message_dict)

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        if log_data.get("request_id") is None:
            log_data.pop("request_id", None)
        return log_data


class _Handler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure` installs (a class of its own, to find and replace it)."""


def configure(level: str, log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """Send every logger's lines (grpc's, uvicorn's, hypercorn's, warnings too) to
    ``stream`` (stderr) in ``log_format``, at ``level`` and above; returns the handler
    installed on the root."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(FORMATS)}")
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Warnings become log lines too, so that a JSON log has nothing but JSON in it.
    logging.captureWarnings(True)
    return handler
