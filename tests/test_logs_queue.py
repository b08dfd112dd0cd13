"""The log handler of ``configure`` (common/logs.py): a writer thread writes the lines, in
order and all of them by the time the process exits; when the stream stops keeping up,
the bounded queue drops lines, counts them, and says how many once there is room.

The server's side (a stuck stderr does not stop it answering) is in
``tests/server/test_logs.py``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from protoserve.common.logs import TextFormatter, _Handler
from tests._observe import WITHIN

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = """
import logging, sys
from protoserve.common.logs import configure
configure("info", sys.argv[1])
log = logging.getLogger("tests.exit")
for i in range(int(sys.argv[2])):
    log.info("line %d", i, extra={"i": i})
"""


def run_python(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``script`` run by this Python in a process of its own; it must exit 0."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=WITHIN,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_every_line_comes_out_in_order_before_the_process_exits(log_format: str) -> None:
    count = 5000  # fewer than the queue holds: none may be dropped, however slow the writer
    done = run_python(_SCRIPT, log_format, str(count))
    lines = done.stderr.splitlines()
    if log_format == "json":
        assert [json.loads(line)["i"] for line in lines] == list(range(count))
    else:
        assert [line.split("tests.exit: ", 1)[1] for line in lines] == [
            f"line {i}" for i in range(count)
        ]


class _Gate:
    """A stream whose writes wait until it is opened: a reader that stopped reading."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.written: list[str] = []

    def write(self, text: str) -> int:
        assert self.open.wait(WITHIN), "the gate was never opened"
        self.written.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_a_full_queue_drops_lines_counts_them_and_says_how_many() -> None:
    gate = _Gate()
    handler = _Handler(gate, TextFormatter(), maxsize=10)  # type: ignore[arg-type]
    seen: list[logging.LogRecord] = []
    other = logging.Handler()
    other.emit = seen.append  # type: ignore[method-assign]  # as pytest's caplog
    log = logging.getLogger("tests.test_logs_queue")
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(handler)
    log.addHandler(other)
    try:
        # The writer takes a line or a batch and waits in write(); ten more fill the queue.
        for i in range(100):
            log.info("line %d", i)
        assert handler.dropped > 0
        gate.open.set()
        # Closing it (as the exit does) writes what was queued, then how many were dropped.
        handler.close()
    finally:
        log.removeHandler(handler)
        log.removeHandler(other)
        log.setLevel(logging.NOTSET)
        log.propagate = True
    lines = "".join(gate.written).splitlines()
    *kept, notice = lines
    numbers = [int(line.rsplit(" ", 1)[1]) for line in kept]
    assert numbers == sorted(numbers)
    # Nothing lost silently: each line was written or counted.
    assert len(numbers) + handler.dropped == 100
    assert f"WARNING protoserve.logs: {handler.dropped} log lines dropped" in notice
    # The other handlers of the logger saw every record as it was logged, unchanged.
    assert [(r.msg, r.args) for r in seen] == [("line %d", (i,)) for i in range(100)]
    # Closed, it writes at once, on the thread that logs.
    log.addHandler(handler)
    try:
        log.warning("after close")
    finally:
        log.removeHandler(handler)
    assert gate.written[-1].endswith("tests.test_logs_queue: after close\n")


def test_a_drop_is_reported_in_its_place_once_there_is_room() -> None:
    gate = _Gate()
    handler = _Handler(gate, TextFormatter(), maxsize=10)  # type: ignore[arg-type]
    log = logging.getLogger("tests.test_logs_queue.place")
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(handler)
    try:
        for i in range(50):
            log.info("line %d", i)
        dropped = handler.dropped
        assert dropped > 0
        gate.open.set()
        assert handler.drain()
        log.info("recovered")
        assert handler.drain()
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(logging.NOTSET)
        log.propagate = True
    lines = "".join(gate.written).splitlines()
    assert lines[-1].endswith("tests.test_logs_queue.place: recovered")
    assert f"protoserve.logs: {dropped} log lines dropped" in lines[-2]
    assert handler.dropped == dropped


_FORK = """
import logging, os
from protoserve.common.logs import configure
handler = configure("info", "text")
log = logging.getLogger("tests.fork")
log.info("parent before")
pid = os.fork()
if pid == 0:
    log.info("child")
    handler.drain()
    os._exit(0)
os.waitpid(pid, 0)
log.info("parent after")
"""


def test_a_forked_child_writes_its_own_lines_and_not_its_parents() -> None:
    # The child's writer thread starts with its first line: the fork hook itself starts
    # none, since it also runs between fork and exec (a subprocess's preexec_fn).
    done = run_python(_FORK)
    messages = [line.rsplit(": ", 1)[-1] for line in done.stderr.splitlines()]
    assert sorted(messages) == ["child", "parent after", "parent before"], done.stderr
