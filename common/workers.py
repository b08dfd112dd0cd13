"""``--workers N``: N processes of one command on one port, and the supervisor that runs them.

Why processes: one Python process runs its event loop, and all the per-call Python
around it, on one core at a time (the GIL); N processes use N cores. Each worker
binds the same port with ``SO_REUSEPORT`` and the kernel spreads *connections*
(not calls) over them (docs/adr/0019-workers-on-one-port.md). Linux only: elsewhere
``SO_REUSEPORT`` does not balance.

The supervisor (:func:`supervise`, for ``serve`` and ``gateway`` alike):

- reserves the port: it binds a ``SO_REUSEPORT`` socket to ``host:port`` and never
  listens on it, so that ``--port 0`` has one number for every worker, and a port
  held by something else fails here, once;
- starts worker ``i`` as the same command with ``--workers 1 --port X --port-file F``
  appended (argparse keeps the last), and ``PROTOSERVE_WORKER_INDEX=i`` (and, for
  the server, the sibling sockets below) in its environment; each worker is in a
  process group of its own, so a Ctrl-C reaches it once, through the supervisor, and
  gets SIGTERM if the supervisor dies;
- writes ``--port-file`` once every worker has written its own (each does once serving);
- forwards each SIGTERM/SIGINT to every worker (a second one too: it skips their wait)
  and exits 0 once all have exited 0;
- restarts a worker that exits by itself, after a backoff; more than
  :data:`MAX_RESTARTS` in :data:`RESTART_WINDOW` seconds, or a worker that exits before
  it ever served (a bad flag, a broken model), stops them all and exits non-zero.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

__all__ = [
    "MAX_RESTARTS",
    "RESTART_WINDOW",
    "SIBLING_SECRET",
    "SIBLING_SOCKETS",
    "WORKER_INDEX",
    "WORKER_SOCKET",
    "Plan",
    "die_with_parent",
    "prepare_die_with_parent",
    "reserve_port",
    "supervise",
    "worker_count",
    "worker_index",
]

log = logging.getLogger("protoserve.workers")

#: This worker's number, 0 to N-1; unset in a process that is not a worker.
WORKER_INDEX = "PROTOSERVE_WORKER_INDEX"
#: The server's workers only: this worker's private unix socket, in a folder only
#: this user may enter (for what the workers tell each other, such as model loads).
WORKER_SOCKET = "PROTOSERVE_WORKER_SOCKET"
#: The other workers' sockets, comma-separated.
SIBLING_SOCKETS = "PROTOSERVE_SIBLING_SOCKETS"
#: A random secret, one per supervisor, that the workers prove to each other.
SIBLING_SECRET = "PROTOSERVE_SIBLING_SECRET"

#: Restarts allowed within RESTART_WINDOW seconds (all workers together); one more
#: and the supervisor gives up: a worker that keeps dying will not be fixed by a restart.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: Seconds before the first restart; doubled for each restart in the window since.
_FIRST_BACKOFF = 0.5
_POLL = 0.05
#: prctl(2)'s PR_SET_PDEATHSIG.
_PR_SET_PDEATHSIG = 1


def worker_count(text: str) -> int:
    """``--workers``' type: a whole number, 1 or more (argparse turns the error into usage)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


def worker_index(env: Mapping[str, str] | None = None) -> int | None:
    """This process's worker number when a supervisor started it, else None."""
    raw = (os.environ if env is None else env).get(WORKER_INDEX, "").strip()
    return int(raw) if raw.isdigit() else None


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with ``SO_REUSEPORT``, never listening. Raises OSError.

    Bound, it holds the number (port 0 gets one) and lets only sockets that set
    ``SO_REUSEPORT`` too, as the workers do, bind it beside it. Not listening, it
    is no member of the group the kernel spreads connections over.
    """
    if not sys.platform.startswith("linux"):
        raise OSError("--workers needs Linux, where SO_REUSEPORT spreads connections")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


@dataclass(frozen=True)
class Plan:
    """What :func:`supervise` runs."""

    #: The ``protoserve`` subcommand: ``serve`` or ``gateway``.
    command: str
    #: The subcommand's arguments as given; each worker gets them, then its own.
    argv: Sequence[str]
    host: str
    port: int
    workers: int
    #: Where to write the port once every worker serves; None: nowhere.
    port_file: str | None = None
    #: More arguments for worker ``i`` (the server's ``--metrics-port P+i``).
    worker_args: Callable[[int], Sequence[str]] = lambda index: ()
    #: Give each worker a private socket path, its siblings' and a shared secret.
    siblings: bool = False


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    #: Has written its port file since it last started.
    serving: bool = False
    starts: int = 0
    #: When to start it again (monotonic), after an exit of its own.
    restart_at: float | None = None


@dataclass
class _Supervisor:
    plan: Plan
    folder: Path
    port: int
    secret: str = field(default_factory=lambda: secrets.token_hex(32))
    workers: list[_Worker] = field(default_factory=list)
    restarts: collections.deque[float] = field(default_factory=collections.deque)
    stopping: bool = False
    #: The exit status decided by a failure (None: by how the workers exit).
    status: int | None = None
    #: Exit statuses of workers that exited while stopping.
    codes: list[int] = field(default_factory=list)
    announced: bool = False
    #: Signals received, for the loop to log.
    signals: list[int] = field(default_factory=list)

    def port_file(self, worker: _Worker) -> Path:
        return self.folder / f"worker-{worker.index}.port"

    def socket_path(self, index: int) -> str:
        return str(self.folder / f"worker-{index}.sock")

    def environment(self, index: int) -> dict[str, str]:
        # Not PROTOSERVE_WORKERS: that is --workers' own variable, which would make any
        # serve started from within a worker a supervisor.
        env = {**os.environ, WORKER_INDEX: str(index)}
        if self.plan.siblings:
            others = (self.socket_path(i) for i in range(self.plan.workers) if i != index)
            env[WORKER_SOCKET] = self.socket_path(index)
            env[SIBLING_SOCKETS] = ",".join(others)
            env[SIBLING_SECRET] = self.secret
        return env

    def start(self, worker: _Worker) -> None:
        if self.stopping:
            return
        self.port_file(worker).unlink(missing_ok=True)
        argv = [
            sys.executable,
            *("-m", "protoserve.clients.cli", self.plan.command),
            *self.plan.argv,
            *self.plan.worker_args(worker.index),
            *("--workers", "1", "--port", str(self.port)),
            *("--port-file", str(self.port_file(worker))),
        ]
        prepare_die_with_parent()
        worker.process = subprocess.Popen(
            argv,
            env=self.environment(worker.index),
            process_group=0,  # a terminal's Ctrl-C goes to the supervisor alone
            preexec_fn=die_with_parent,
        )
        worker.serving, worker.restart_at = False, None
        worker.starts += 1
        log.info("worker %d started (pid %d)", worker.index, worker.process.pid)
        if self.stopping:  # a signal came while it started: it gets one too
            worker.process.send_signal(signal.SIGTERM)

    def forward(self, signum: int, frame: FrameType | None = None) -> None:
        """Every signal, to every worker still running: the first drains, a second hurries.

        Also the signal handler, so it logs nothing: a handler that logged while the
        interrupted code held the log queue's lock would wait for ever. The loop says it.
        """
        self.signals.append(signum)
        self.send(signum)

    def send(self, signum: int) -> None:
        self.stopping = True
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signum)

    def __len__(self) -> int:
        return sum(w.process is not None for w in self.workers)

    def check(self, worker: _Worker, now: float) -> None:
        """One look at one worker: serving yet, exited, or due to start again."""
        if worker.process is None:
            if worker.restart_at is not None and now >= worker.restart_at:
                self.start(worker)
            return
        code = worker.process.poll()
        if code is None:
            if not worker.serving and _written(self.port_file(worker)):
                worker.serving = True
                log.info("worker %d (pid %d) serving", worker.index, worker.process.pid)
            return
        pid, worker.process, worker.serving = worker.process.pid, None, False
        if self.stopping:
            self.codes.append(code)
        elif worker.starts == 1 and not self.announced:
            log.error("worker %d (pid %d) %s before serving", worker.index, pid, _how(code))
            self.fail(code if code > 0 else 1)
        else:
            self.restart_later(worker, pid, code, now)

    def restart_later(self, worker: _Worker, pid: int, code: int, now: float) -> None:
        while self.restarts and self.restarts[0] < now - RESTART_WINDOW:
            self.restarts.popleft()
        if len(self.restarts) >= MAX_RESTARTS:
            log.error(
                "worker %d (pid %d) %s, after %d restarts in the last %gs: stopping every worker",
                *(worker.index, pid, _how(code), len(self.restarts), RESTART_WINDOW),
            )
            self.fail(1)
            return
        delay = _FIRST_BACKOFF * 2 ** len(self.restarts)
        self.restarts.append(now)
        worker.restart_at = now + delay
        log.error(
            "worker %d (pid %d) %s; restarting it in %gs", worker.index, pid, _how(code), delay
        )

    def fail(self, status: int) -> None:
        """Stop every worker; the supervisor then exits with ``status``."""
        self.status = status
        self.send(signal.SIGTERM)

    def announce(self) -> None:
        """Once every worker serves: the port file, and one line."""
        if self.announced or self.stopping or not all(w.serving for w in self.workers):
            return
        self.announced = True
        if self.plan.port_file:
            Path(self.plan.port_file).write_text(f"{self.port}\n")
        log.info("%d workers serving on %s:%d", self.plan.workers, self.plan.host, self.port)

    def run(self) -> int:
        self.workers = [_Worker(i) for i in range(self.plan.workers)]
        for worker in self.workers:
            self.start(worker)
        while not (self.stopping and len(self) == 0):
            now = time.monotonic()
            for worker in self.workers:
                self.check(worker, now)
            self.announce()
            while self.signals:
                name = signal.Signals(self.signals.pop(0)).name
                log.info("%s: passed on to %d workers", name, len(self))
            time.sleep(_POLL)
        if self.status is not None:
            return self.status
        return 0 if all(code == 0 for code in self.codes) else 1


def supervise(plan: Plan) -> int:
    """Run ``plan.workers`` workers until a signal (or a failure); the exit status.

    Raises OSError, before starting any, when the port cannot be had.
    """
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    # mkdtemp's folder is the user's alone (0700): the sockets and the secret's users.
    with tempfile.TemporaryDirectory(prefix="protoserve-workers-") as folder:
        with reserve_port(plan.host, plan.port) as reserved:
            port = reserved.getsockname()[1]
            supervisor = _Supervisor(plan, Path(folder), port)
            for signum in previous:
                signal.signal(signum, supervisor.forward)
            try:
                return supervisor.run()
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)


def _written(path: Path) -> bool:
    try:
        return bool(path.read_text().strip())
    except FileNotFoundError:
        return False


def _how(code: int) -> str:
    """A worker's end in words: ``exited with status 3``, ``was killed by SIGKILL``."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def die_with_parent() -> None:
    """A ``preexec_fn``: the child gets SIGTERM when its parent dies, even by SIGKILL
    (Linux; elsewhere nothing). Call :func:`prepare_die_with_parent` before the fork.

    Otherwise an orphaned worker would go on serving on the shared port, beside the
    workers of the next supervisor, since they all set SO_REUSEPORT as the same user;
    and a child in a process group of its own is out of reach of a ``kill -- -PGID``.
    """
    if _LIBC:
        _LIBC[0].prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


_LIBC: list[ctypes.CDLL] = []


def prepare_die_with_parent() -> None:
    """Load libc's ``prctl`` in the parent: between fork and exec, the child should only
    call it, not load it (the parent has threads: a lock held there stays held)."""
    if not _LIBC and sys.platform.startswith("linux"):
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
