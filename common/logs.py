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

:func:`configure` writes lines off the event loop: the handler it installs
(``_Handler``, a :class:`logging.handlers.QueueHandler`) runs the filter and merges
the message's arguments on the thread that logs, so the record holds everything a
line needs (its request id, its ``extra=`` fields, its message), and queues it; a
:class:`logging.handlers.QueueListener` thread formats and writes the lines. The
queue is bounded: when the stream does not keep up, lines are dropped and counted,
never waited for (a blocked stderr must not stall the loop), and a line says how
many were dropped as soon as there is room again. The queue is drained when the
process exits (:mod:`atexit`, and :func:`logging.shutdown` after it), so the last
lines of a drain still come out.

:func:`request_id` is the one rule both processes apply to an id a caller sends
(``x-request-id``): taken as given when it is short and plain, else replaced.
"""

from __future__ import annotations

import atexit
import collections
import contextvars
import logging
import logging.handlers
import os
import queue
import re
import sys
import threading
import time
import uuid
import weakref
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


#: Lines the queue holds before new ones are dropped. Dropped rather than waited for:
#: the queue is full only when the stream (stderr, a pipe to a log collector) has
#: stopped keeping up, and waiting would stall the event loop, every call, on that
#: stream, which is what the queue is there to prevent; unbounded, a stream that
#: never drains would take memory without limit. Each drop is counted
#: (``_Handler.dropped``) and reported in a line of its own once there is room.
#: A record is about 1 KiB: the full queue is about 10 MiB, seconds of a busy
#: server's access lines.
QUEUE_LINES = 10_000

#: Seconds the exit waits for the writer to drain the queue: long enough for any
#: stream that is being read, short enough that a stream nobody reads does not hang
#: the exit for ever.
_DRAIN_SECONDS = 10.0

#: Lines written in one write, at most, when the writer has a backlog.
_BATCH = 256

#: Seconds the writer, woken by a line, waits for more before it formats them.
_GATHER = 0.002

# A line written under its own logger: how many lines the full queue dropped.
_DROPS = "protoserve.logs"


class _Flush:
    """Put on the queue to learn when everything before it has been written."""

    def __init__(self) -> None:
        self.done = threading.Event()


class _Writer(logging.StreamHandler[TextIO]):
    """The listener's one handler: formats each record and writes the lines in batches
    (one write for whatever the queue held, not one per line)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._last: logging.LogRecord | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record) + self.terminator)
            self._last = record
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # createLock has made it
            lines, self._lines = self._lines, []
            last, self._last = self._last, None
            try:
                if lines:
                    self.stream.write("".join(lines))
                super().flush()
            except RecursionError:
                raise
            except Exception:
                if last is not None:
                    self.handleError(last)


class _Lines:
    """The bounded queue between the handler and the writer thread (queue-like, as
    QueueHandler and QueueListener take it): a deque that wakes the writer once per
    batch, not once per line as :class:`queue.Queue` would. The writer, woken from
    empty, lets a batch gather for ``_GATHER`` seconds before it formats: fewer
    switches of the GIL between it and the event loop. Puts come one at a time (the
    handler's lock); the one getter is the writer thread."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: collections.deque[Any] = collections.deque()
        self._ready = threading.Event()

    def put_nowait(self, item: Any) -> None:
        if len(self._items) >= self.maxsize:
            raise queue.Full
        self._items.append(item)
        if not self._ready.is_set():  # a plain read: the writer cleared it, asleep
            self._ready.set()

    def put(self, item: Any, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for room (only the exit and :meth:`drain` do)."""
        deadline = time.monotonic() + timeout
        while len(self._items) >= self.maxsize:
            if time.monotonic() >= deadline:
                raise queue.Full
            time.sleep(0.001)
        self._items.append(item)
        self._ready.set()

    def get(self, block: bool = True) -> Any:
        if not self._items:
            self._ready.clear()
            # Checked after the clear: a put after it sets it again.
            while not self._items:
                self._ready.wait()
            time.sleep(_GATHER)
        return self._items.popleft()

    def empty(self) -> bool:
        return not self._items


class _Listener(logging.handlers.QueueListener):
    """The writer thread: hands each record to the writer, which writes when the queue
    is empty (or its batch is full); answers a :class:`_Flush` once all before it is
    written."""

    def __init__(self, lines: _Lines, writer: _Writer) -> None:
        super().__init__(lines, writer)  # queue-like: any with put_nowait and get
        self.lines = lines
        self.writer = writer
        self._pending = 0

    def handle(self, record: Any) -> None:
        if isinstance(record, _Flush):
            self.writer.flush()
            self._pending = 0
            record.done.set()
            return
        super().handle(record)
        self._pending += 1
        if self._pending >= _BATCH or self.lines.empty():
            self.writer.flush()
            self._pending = 0

    def stop(self, timeout: float = _DRAIN_SECONDS) -> bool:  # type: ignore[override]
        """Write what is queued and end the thread, waiting ``timeout`` seconds at most
        (the stdlib's would fail on a full queue, and wait for ever on a stuck stream);
        whether it ended."""
        thread: threading.Thread | None = self._thread
        if thread is None:
            return True
        deadline = time.monotonic() + timeout
        try:
            self.lines.put(self._sentinel, timeout=timeout)  # type: ignore[attr-defined]
        except queue.Full:
            return False
        thread.join(max(deadline - time.monotonic(), 0.0))
        if thread.is_alive():
            return False
        self._thread = None
        return True


class _Handler(logging.handlers.QueueHandler):
    """The handler :func:`configure` installs (a class of its own, to find and replace it).

    On the thread that logs: the filters (the request id), the message merged with its
    arguments, a copy of the record queued, or counted as dropped when the queue is
    full. On the writer thread: the formatter and the write. Once closed, lines are
    written at once, on the thread that logs (nothing is left to write them).
    """

    def __init__(
        self, stream: TextIO, formatter: logging.Formatter, maxsize: int | None = None
    ) -> None:
        self.lines = _Lines(QUEUE_LINES if maxsize is None else maxsize)
        super().__init__(self.lines)  # queue-like: any with put_nowait and get
        self.writer = _Writer(stream)
        self.setFormatter(formatter)
        self.addFilter(RequestIdFilter())
        #: Lines dropped because the queue was full, since the handler was made.
        self.dropped = 0
        self._unreported = 0  # of those, the ones no line has reported yet
        self._closed = False
        self._listener = _Listener(self.lines, self.writer)
        self._listener.start()
        #: In a forked child, until its first line: no writer thread yet (:meth:`_restart`).
        self._unstarted = False
        _HANDLERS.add(self)

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        super().setFormatter(fmt)
        self.writer.setFormatter(fmt)

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # Not the stdlib's, which formats the line here (on the loop) and drops exc_info.
        # The message is merged now: its arguments may change, or belong to this thread.
        # A copy, since every other handler of the root (pytest's caplog) shares the record.
        prepared = logging.LogRecord.__new__(logging.LogRecord)
        prepared.__dict__.update(record.__dict__)
        prepared.msg = record.getMessage()
        prepared.args = None
        return prepared

    def enqueue(self, record: logging.LogRecord) -> None:
        # Called by emit, under the handler's lock (Handler.handle): one thread at a time.
        if self._unstarted:
            self._start()
        if self._unreported:
            self._report_drops()
        try:
            self.lines.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            self._unreported += 1

    def emit(self, record: logging.LogRecord) -> None:
        if self._closed:
            self.writer.handle(record)
            self.writer.flush()
        else:
            super().emit(record)

    def _report_drops(self, timeout: float | None = None) -> None:
        count = self._unreported
        line = logging.LogRecord(
            _DROPS,
            logging.WARNING,
            __file__,
            0,
            f"{count} log lines dropped: the log stream was not keeping up "
            f"(a queue of {self.lines.maxsize} lines was full)",
            None,
            None,
        )
        line.request_id = None
        line.dropped = count
        try:
            if timeout is None:
                self.lines.put_nowait(line)
            else:
                self.lines.put(line, timeout=timeout)
        except queue.Full:
            return
        self._unreported = 0

    def flush(self) -> None:
        """Wait until every line queued so far is written (:meth:`drain`)."""
        self.drain()

    def drain(self, timeout: float = _DRAIN_SECONDS) -> bool:
        """Wait until every line queued so far is written (up to ``timeout`` seconds);
        whether it was. Never on the event loop: for tests, and the exit."""
        if self._closed or threading.current_thread() is self._listener._thread:
            return True
        if self._unstarted:
            with self.lock:  # type: ignore[union-attr]  # createLock has made it
                self._start()
        marker = _Flush()
        try:
            self.lines.put(marker, timeout=timeout)
        except queue.Full:
            return False
        return marker.done.wait(timeout)

    def close(self) -> None:
        """Write what is queued (and how many lines were dropped), stop the writer thread."""
        self.acquire()
        try:
            if not self._closed:
                if self._unreported:
                    self._report_drops(timeout=_DRAIN_SECONDS)
                self._closed = True
                # False for a stream nobody reads: the exit goes on without those lines.
                if self._listener.stop():
                    self.writer.flush()
        finally:
            self.release()
        super().close()

    def _restart(self) -> None:
        # In a forked child: the writer thread did not come along, and the queue may hold
        # the parent's lines (the parent writes those). A new queue, and a new thread
        # started by the child's first line, not here: this runs between fork and exec
        # too (a subprocess's preexec_fn), where starting a thread is unsafe.
        self.lines = self.queue = _Lines(self.lines.maxsize)
        self.writer._lines = []
        self._listener = _Listener(self.lines, self.writer)
        self._unstarted = not self._closed

    def _start(self) -> None:
        """Start the writer thread a fork left behind; under the handler's lock."""
        if self._unstarted:
            self._unstarted = False
            self._listener.start()


# Every _Handler not yet collected: closed at exit, restarted in a forked child.
_HANDLERS: weakref.WeakSet[_Handler] = weakref.WeakSet()


def _close_all() -> None:
    for handler in list(_HANDLERS):
        handler.close()


def _restart_all() -> None:
    for handler in list(_HANDLERS):
        handler._restart()


# Registered after logging's own logging.shutdown, so run before it (atexit is LIFO).
atexit.register(_close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_restart_all)


def configure(level: str, log_format: str, stream: TextIO | None = None) -> _Handler:
    """Send every logger's lines (grpc's, uvicorn's, hypercorn's, warnings too) to
    ``stream`` (stderr) in ``log_format``, at ``level`` and above; returns the handler
    installed on the root. A writer thread writes the lines (the module's docstring);
    ``handler.flush()`` waits until those logged so far are written."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(FORMATS)}")
    formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    handler = _Handler(stream if stream is not None else sys.stderr, formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Warnings become log lines too, so that a JSON log has nothing but JSON in it.
    logging.captureWarnings(True)
    return handler
