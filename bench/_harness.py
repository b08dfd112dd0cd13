"""What the benchmarks in bench/ share: processes, the workload, statistics, metrics.

The scripts here run as ``python bench/NAME.py``, so this module is imported by
its plain name (``import _harness``). It starts protoserve servers and gateways
(and any other process) on free loopback ports, waits for them, stops them by
PID, and knows the machine and the versions a report should name.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.metadata
import importlib.util
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bytelm"

# ---------------------------------------------------------------------------
# Imports: protoserve's stubs, installed or straight from this checkout.


def import_protoserve(tmp: Path) -> tuple[ModuleType, ModuleType]:
    """The protobuf messages and grpc stubs of protoserve.inference.v1.

    From the installed package when there is one; otherwise from this checkout,
    through a tree of symlinks like the one `nox -s lint` gives mypy (ADR 0001):
    setuptools maps clients/ and gen/ to protoserve.clients and protoserve.inference.
    """
    try:
        pb = importlib.import_module("protoserve.inference.v1.inference_service_pb2")
    except ImportError:
        tree = tmp / "checkout" / "protoserve"
        tree.mkdir(parents=True)
        (tree / "inference").symlink_to(ROOT / "gen" / "protoserve" / "inference")
        (tree / "clients").symlink_to(ROOT / "clients")
        sys.path.insert(0, str(tree.parent))
        for name in [m for m in sys.modules if m == "protoserve" or m.startswith("protoserve.")]:
            del sys.modules[name]
        pb = importlib.import_module("protoserve.inference.v1.inference_service_pb2")
    stubs = importlib.import_module("protoserve.inference.v1.inference_service_pb2_grpc")
    return pb, stubs


def server_python() -> str:
    """A Python that can run ``protoserve serve``: this one, or the checkout's .venv."""
    if importlib.util.find_spec("torch") is not None:
        with contextlib.suppress(ImportError):
            if importlib.util.find_spec("protoserve.server") is not None:
                return sys.executable
    venv = ROOT / ".venv" / "bin" / "python"
    if venv.exists():
        return str(venv)
    raise SystemExit(
        "no Python here can run the server: install protoserve or pass --server-python"
    )


# ---------------------------------------------------------------------------
# Workload: texts and prompts, varied and reproducible.

_WORDS = (
    "def class return import from yield lambda async await self value items key "
    "result buffer offset length header stream socket thread lock queue event "
    "parse format encode decode read write open close flush path name args kwargs "
    "None True False for while if else elif try except finally with as raise"
).split()

_PROMPTS = (
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n",
    "class Queue:\n    def __init__(self",
    "    for key, value in items.items():\n",
    'def read_config(path):\n    """Read the',
    "try:\n    import json\nexcept ImportError:\n",
    "    if not isinstance(name, str):\n        raise",
    "from collections import",
    "def main(argv=None):\n    parser = ",
    "    return self._buffer[",
    "with open(filename, 'rb') as f:\n",
    "class Error(Exception):\n",
    "    def __repr__(self):\n        return",
    "async def fetch(session, url):\n",
    "# Copyright 2001 Python Software Foundation\n",
    "    while True:\n        line = ",
)


def embed_texts(count: int, chars: tuple[int, int] = (60, 100), seed: int = 5) -> list[str]:
    """``count`` distinct texts of ``chars`` (least, most) characters of Python-like words."""
    rng = random.Random(seed)
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < count:
        target = rng.randint(*chars)
        words: list[str] = []
        while len(" ".join(words)) < target:
            words.append(rng.choice(_WORDS))
        text = " ".join(words)[:target]
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


def generation_prompts(count: int) -> list[str]:
    """``count`` distinct prompts: the base prompts, varied by a numbered comment."""
    return [
        (f"# case {i}\n" if i >= len(_PROMPTS) else "") + _PROMPTS[i % len(_PROMPTS)]
        for i in range(count)
    ]


# ---------------------------------------------------------------------------
# Statistics.


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between closest ranks; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.1f}"


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def fmt(x: float, digits: int = 1) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


# ---------------------------------------------------------------------------
# Processes: servers and the gateway.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """A server or gateway this run started."""

    name: str
    cmd: list[str]
    #: Where the process writes the port it bound (``--port-file``); None when the
    #: port was chosen before the start (:func:`spawn`).
    port_file: Path | None
    log: Path
    proc: subprocess.Popen[bytes]
    metrics_port: int | None = None
    port: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str | None:
        return (
            None if self.metrics_port is None else f"http://127.0.0.1:{self.metrics_port}/metrics"
        )

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """SIGTERM by PID (the server drains, then exits); SIGKILL after 30 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def launch(
    python: str,
    tmp: Path,
    name: str,
    command: str,
    flags: Sequence[str],
    metrics: bool,
    threads: int | None = None,
    env: dict[str, str] | None = None,
) -> Proc:
    port_file = tmp / f"{name}.port"
    cmd = [python, "-m", "protoserve.clients.cli", command, "--port", "0"]
    cmd += ["--port-file", str(port_file), "--log-level", "WARNING", *flags]
    metrics_port = None
    if metrics:
        # The server logs a port it picked only at INFO (one line per request
        # too): choose one here instead.
        metrics_port = free_port()
        cmd += ["--metrics-port", str(metrics_port)]
    env = dict(env or {})
    if threads:
        # torch's intra-op threads (its default: one per core) read these at start.
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    p = spawn(tmp, name, cmd, env=env)
    p.port_file, p.metrics_port = port_file, metrics_port
    return p


def spawn(
    tmp: Path,
    name: str,
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    port: int = 0,
    cwd: Path = ROOT,
) -> Proc:
    """Start ``cmd`` with its output in ``tmp/NAME.log``; ``port`` when it was chosen here."""
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env={**os.environ, **(env or {})},
        )
    return Proc(name, list(cmd), None, log, proc, port=port)


async def wait_port(p: Proc, deadline: float) -> None:
    """Until the process wrote its port file (or, without one, accepts connections)."""
    if p.port_file is None:
        while True:
            _check_alive(p, deadline, "did not listen in time")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", p.port)
                writer.close()
                return
            await asyncio.sleep(0.1)
    while not p.port_file.exists() or not p.port_file.read_text().strip():
        _check_alive(p, deadline, "did not write its port in time")
        await asyncio.sleep(0.1)
    p.port = int(p.port_file.read_text().strip())


def _check_alive(p: Proc, deadline: float, late: str) -> None:
    if p.proc.poll() is not None:
        raise SystemExit(
            f"{p.name} exited ({p.proc.returncode}): {' '.join(p.cmd)}\n{p.log_tail()}"
        )
    if time.monotonic() > deadline:
        raise SystemExit(f"{p.name} {late}\n{p.log_tail()}")


async def wait_ready(
    p: Proc, pb: ModuleType, stubs: ModuleType, deadline: float, model: str = MODEL
) -> None:
    """Until ``model`` on server ``p`` is READY (v1 GetModel)."""
    import grpc

    await wait_port(p, deadline)
    async with grpc.aio.insecure_channel(p.target) as channel:
        stub = stubs.InferenceServiceStub(channel)
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.GetModel(pb.GetModelRequest(name=model), timeout=10)
                if reply.model.state == pb.MODEL_STATE_READY:
                    return
                if reply.model.state == pb.MODEL_STATE_FAILED:
                    raise SystemExit(f"{p.name}: {model} failed: {reply.model.state_message}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{p.name}: {model} not ready in time\n{p.log_tail()}")
            await asyncio.sleep(0.2)


async def wait_gateway(p: Proc, deadline: float) -> None:
    import httpx

    await wait_port(p, deadline)
    async with httpx.AsyncClient(base_url=f"http://{p.target}", timeout=10) as http:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/v1/models")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise SystemExit(f"{p.name} not answering in time\n{p.log_tail()}")
            await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------
# Metrics.

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(url: str | None) -> Samples:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    if url is None:
        return {}
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(url)).text
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def dist_versions(*dists: str) -> dict[str, str]:
    """The installed version of each distribution, "-" for one that is not installed."""
    out = {}
    for dist in dists:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "-"
    return out


def _dispatch_module() -> ModuleType:
    """The server's ``protoserve.server.dispatch``, read from this checkout: it needs only
    the standard library to import, so it loads where protoserve is not installed."""
    spec = importlib.util.spec_from_file_location(
        "_protoserve_dispatch", ROOT / "server" / "dispatch.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


#: The CPU's model name, as the server's log lines give it.
cpu_name = _dispatch_module().cpu_name


def versions(python: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    out.update(dist_versions("grpcio", "protobuf", "torch", "numpy", "httpx", "prometheus-client"))
    if python != sys.executable:
        # The servers run another Python: its torch and grpcio are the ones that count.
        probe = (
            "import importlib.metadata as m, platform;"
            "print(platform.python_version(), m.version('torch'), m.version('grpcio'))"
        )
        with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
            got = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True)
            py, torch_v, grpc_v = got.stdout.split()
            out["server python/torch/grpcio"] = f"{py} / {torch_v} / {grpc_v} ({python})"
    out["machine"] = (
        f"{cpu_name()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    )
    out["platform"] = platform.platform()
    return out


def machine() -> dict[str, Any]:
    """What a report says about the machine: CPU, cores, memory, OS, load before the run."""
    memory_gib = math.nan
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = int(line.split()[1]) / 2**20
    return {
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "os": platform.platform(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }


def finite(data: Any) -> Any:
    """``data`` with NaN and infinities as None, for strict JSON."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {str(k): finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [finite(v) for v in data]
    return data


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def stopping(procs: list[Proc]) -> Iterator[None]:
    try:
        yield
    finally:
        for p in reversed(procs):
            p.stop()
