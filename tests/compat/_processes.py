"""Real `protoserve serve` and `protoserve gateway` processes, run from a protoserve Python.

Standard library only: this module runs in the compat venv (tritonclient,
protobuf < 5), which cannot import protoserve; the servers run from the Python
that $PROTOSERVE_COMPAT_PYTHON names (`nox -s compat` sets it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON_ENV = "PROTOSERVE_COMPAT_PYTHON"


@dataclass
class Process:
    """A started protoserve command, the port it bound and its log."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def protoserve_python() -> str:
    """The Python with protoserve installed; $PROTOSERVE_COMPAT_PYTHON, which nox sets."""
    python = os.environ.get(PYTHON_ENV, "").strip()
    if not python:
        raise RuntimeError(f"set {PYTHON_ENV} to a Python with protoserve installed (nox does)")
    return python


def start(name: str, folder: Path, *args: str, timeout: float = 90.0) -> Process:
    """Run `protoserve NAME --port 0 --port-file ... ARGS` and wait for its port.

    The process runs from the repository root with it on PYTHONPATH, so that the
    server can import the test models (`tests.compat.models:AddSubFP32`).
    """
    port_file = folder / f"{name}.port"
    log = folder / f"{name}.log"
    command = [protoserve_python(), "-m", "protoserve.clients.cli", name]
    command += ["--port", "0", "--port-file", str(port_file), *args]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not port_file.exists() or not port_file.read_text().strip():
        if process.poll() is not None:
            raise RuntimeError(
                f"`protoserve {name}` exited with {process.returncode}:\n{log.read_text()}"
            )
        if time.monotonic() > deadline:
            stop(Process(process, 0, log))
            raise RuntimeError(
                f"`protoserve {name}` did not start in {timeout}s:\n{log.read_text()}"
            )
        time.sleep(0.05)
    return Process(process, int(port_file.read_text()), log)


def stop(started: Process) -> None:
    """Stop by PID: SIGTERM, then SIGKILL if it will not go."""
    if started.process.poll() is None:
        started.process.send_signal(signal.SIGTERM)
        try:
            started.process.wait(20)
        except subprocess.TimeoutExpired:
            started.process.kill()
            started.process.wait()
