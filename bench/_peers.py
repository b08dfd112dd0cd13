"""protoserve's peers in the comparison: MLServer and KServe's model server.

Both serve the benchmark's TorchScript MLP (bench/_model.py) over the Open
Inference Protocol (KServe V2), REST and gRPC, as protoserve does, so one
external load generator drives all three the same way. Each peer pins
protobuf<7, so each lives in a virtualenv of its own (``.nox/bench-NAME``),
made here on first use and reused after; its server code (bench/peers/) runs
under that virtualenv's Python and never imports protoserve.

This module runs in protoserve's Python and imports neither peer. It makes the
virtualenvs, writes each peer's settings and command line, waits for a peer to
be ready, checks its answers against the model run in this process, stops it
with its process tree, and measures the tree's memory.

perf_analyzer cannot drive MLServer 1.7.1 or KServe 0.21.0: before its first
request it asks for the model's configuration (Triton's ModelConfig extension),
which neither serves, and stops. Over gRPC it prints ``error: failed to get model
config: Method not found!`` (``/inference.GRPCInferenceService/ModelConfig`` is
UNIMPLEMENTED); over REST ``error: failed to get model config: attempt to access
non-existing object member 'error'`` (``GET /v2/models/NAME/config`` answers 404).
h2load and wrk need nothing but the infer call, so the suite drives all three
servers with them, with the same request bytes (:func:`write_load_bodies`).
h2load does not read grpc-status, so a call counts as good by the bytes of a
good reply (:func:`grpc_reply_frame_size`, :func:`check_reply_bytes`): an error
reply is trailers only, with no DATA.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _harness import free_port

GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"
REQUEST_ID = "bench"  # fixed, so every server's reply has the same size
HERE = Path(__file__).resolve().parent
PEER_CODE = HERE / "peers"

#: protoserve's dynamic batching, which the peers' adaptive batching is set to match.
MAX_BATCH_SIZE = 32
MAX_BATCH_DELAY_S = 0.002


@dataclass(frozen=True)
class Peer:
    """One peer server: what its virtualenv holds and what it is."""

    name: str
    #: Exact pins of what its virtualenv installs (torch as protoserve's).
    requirements: tuple[str, ...]
    title: str


PEERS: dict[str, Peer] = {
    "mlserver": Peer(
        "mlserver",
        # uvloop 0.22+ raises in asyncio.get_event_loop() without a running loop,
        # which MLServer 1.7.1's inference worker calls at start: every worker
        # dies ("There is no current event loop in thread 'MainThread'") and the
        # model never loads. 0.21.0 is the last release that works with it.
        ("torch==2.13.0", "mlserver==1.7.1", "uvloop==0.21.0"),
        "MLServer 1.7.1 (custom runtime bench/peers/mlserver_runtime.py)",
    ),
    "kserve": Peer(
        "kserve",
        ("torch==2.13.0", "kserve==0.21.0"),
        "KServe 0.21.0 model server (custom model bench/peers/kserve_server.py)",
    ),
}

MARKER = "bench-requirements.txt"


# ---------------------------------------------------------------------------
# Virtualenvs


def venv_dir(name: str, root: Path) -> Path:
    """Where peer ``name``'s virtualenv lives under the repository root ``root``."""
    return root / ".nox" / f"bench-{name}"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(name: str, root: Path, *, python: str = "python3") -> Path:
    """Make peer ``name``'s virtualenv when missing or stale; return its Python.

    The virtualenv records the requirements it was installed with in a marker
    file: when they equal :data:`PEERS`' pins, nothing runs (a second run costs
    nothing); otherwise the pins are pip-installed (into a new virtualenv when
    there is none). Raises ``subprocess.CalledProcessError`` when pip fails.
    """
    peer = PEERS[name]
    venv = venv_dir(name, root.resolve())
    marker = venv / MARKER
    wanted = "\n".join(peer.requirements) + "\n"
    exe = venv_python(venv)
    if exe.exists() and marker.exists() and marker.read_text() == wanted:
        return exe
    if not exe.exists():
        print(f"[peers] creating {venv} ({python} -m venv)", flush=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    marker.unlink(missing_ok=True)
    print(f"[peers] installing into {venv}: {' '.join(peer.requirements)}", flush=True)
    subprocess.run([str(exe), "-m", "pip", "install", *peer.requirements], check=True)
    marker.write_text(wanted)
    return exe


# ---------------------------------------------------------------------------
# Settings and command lines


def default_settings(name: str) -> dict[str, Any]:
    """Peer ``name``'s settings in the comparison: its documented defaults plus batching.

    Adaptive batching is on where the peer has it, equal to protoserve's (at most
    32 requests, waiting at most 2 ms). Keys are the peer's own setting names,
    plus ``torch_threads`` (``OMP_NUM_THREADS`` when set; torch's default, one
    intra-op thread per core, when None).
    """
    if name == "mlserver":
        return {
            # Documented defaults (mlserver.settings.Settings), stated so the report shows them.
            "parallel_workers": 1,  # one inference worker process beside the main one
            "debug": True,  # access log line per request, REST and gRPC
            "gzip_enabled": True,
            "metrics_endpoint": "/metrics",  # on; its own port (chosen free here)
            "metrics_port": None,
            # Adaptive batching (off by default), set to protoserve's.
            "max_batch_size": MAX_BATCH_SIZE,
            "max_batch_time": MAX_BATCH_DELAY_S,
            "torch_threads": None,
        }
    if name == "kserve":
        return {
            # Documented defaults (kserve.model_server's flags).
            "workers": 1,  # uvicorn processes for REST
            "max_threads": 4,  # gRPC server's thread pool
            "max_asyncio_workers": None,  # default executor: min(32, cores + 4)
            "enable_latency_logging": True,  # a log line per request
            "metrics": "/metrics on the REST port (always on)",
            # The model server has no adaptive batching: in a cluster that is the
            # batcher in KServe's agent sidecar, which this comparison does not run.
            "adaptive_batching": None,
            "torch_threads": None,
        }
    raise KeyError(name)


def effective_settings(name: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`default_settings` with ``settings`` over them (unknown keys refused)."""
    merged = default_settings(name)
    unknown = set(settings or {}) - set(merged)
    if unknown:
        raise ValueError(f"unknown {name} settings: {sorted(unknown)}")
    merged.update(settings or {})
    return merged


def peer_command(
    name: str,
    venv_python: Path | str,
    model_file: Path,
    workdir: Path,
    model_name: str,
    http_port: int,
    grpc_port: int,
    settings: dict[str, Any] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Write peer ``name``'s settings files into ``workdir``; return its argv and env.

    ``env`` holds only the variables to add to the caller's environment. Every
    setting used is written to ``workdir/peer-settings.json`` as well (ports
    included), for the report. The command binds 127.0.0.1 only.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    chosen = effective_settings(name, settings)
    env: dict[str, str] = {"PYTHONUNBUFFERED": "1"}
    if chosen["torch_threads"]:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(chosen["torch_threads"])
    if name == "mlserver":
        argv = _mlserver(chosen, venv_python, model_file, workdir, model_name, http_port, grpc_port)
        # The runtime's module, for the main process and the worker processes alike.
        env["PYTHONPATH"] = str(PEER_CODE)
    else:
        argv = [
            str(venv_python),
            str(PEER_CODE / "kserve_server.py"),
            f"--model_path={model_file}",
            f"--model_name={model_name}",
            f"--http_port={http_port}",
            f"--grpc_port={grpc_port}",
            f"--workers={chosen['workers']}",
            f"--max_threads={chosen['max_threads']}",
            f"--enable_latency_logging={chosen['enable_latency_logging']}",
        ]
        if chosen["max_asyncio_workers"] is not None:
            argv.append(f"--max_asyncio_workers={chosen['max_asyncio_workers']}")
    record = {**chosen, "http_port": http_port, "grpc_port": grpc_port, "argv": argv, "env": env}
    (workdir / "peer-settings.json").write_text(json.dumps(record, indent=2) + "\n")
    return argv, env


def _mlserver(
    chosen: dict[str, Any],
    python: Path | str,
    model_file: Path,
    workdir: Path,
    model_name: str,
    http_port: int,
    grpc_port: int,
) -> list[str]:
    """Write MLServer's settings.json and NAME/model-settings.json; its argv."""
    if chosen["metrics_endpoint"] and not chosen["metrics_port"]:
        chosen["metrics_port"] = free_port()
    server = {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "parallel_workers": chosen["parallel_workers"],
        "debug": chosen["debug"],
        "gzip_enabled": chosen["gzip_enabled"],
        "metrics_endpoint": chosen["metrics_endpoint"],
        # MLServer's defaults put these under the current directory.
        "metrics_dir": str(workdir / ".metrics"),
        "environments_dir": str(workdir / ".envs"),
    }
    if chosen["metrics_port"]:
        server["metrics_port"] = chosen["metrics_port"]
    tensor = {"datatype": "FP32", "shape": [-1, 64]}
    model = {
        "name": model_name,
        "implementation": "mlserver_runtime.TorchScriptMLP",
        "parameters": {"uri": str(model_file)},
        "max_batch_size": chosen["max_batch_size"],
        "max_batch_time": chosen["max_batch_time"],
        "inputs": [{"name": "INPUT0", **tensor}],
        "outputs": [{"name": "OUTPUT0", **tensor}],
    }
    (workdir / "settings.json").write_text(json.dumps(server, indent=2) + "\n")
    (workdir / model_name).mkdir(exist_ok=True)
    (workdir / model_name / "model-settings.json").write_text(json.dumps(model, indent=2) + "\n")
    # The console script beside the virtualenv's Python: `mlserver start DIR`.
    return [str(Path(python).parent / "mlserver"), "start", str(workdir)]


# ---------------------------------------------------------------------------
# Load: the same request bytes for every server


def write_load_bodies(workdir: Path, model_name: str, *, rows: int = 1) -> tuple[Path, Path]:
    """The request bodies of the load: gRPC-framed ModelInferRequest and V2 REST JSON.

    Both carry ``rows`` rows of :func:`_model.sample_rows` as INPUT0 and the
    id ``bench``; the gRPC one sends them as ``raw_input_contents`` (what gRPC
    clients such as Triton's send), the REST one as JSON numbers (MLServer has
    no binary tensor extension). Returns ``(grpc_body, rest_body)``.
    """
    import _model

    from protoserve.oip.v2 import grpc_service_pb2 as pb

    data = _model.sample_rows(rows)
    flat = [v for row in data for v in row]
    request = pb.ModelInferRequest(model_name=model_name, id=REQUEST_ID)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = _model.INPUT, "FP32"
    tensor.shape.extend([rows, _model.FEATURES])
    request.raw_input_contents.append(struct.pack(f"<{len(flat)}f", *flat))
    message = request.SerializeToString()
    workdir.mkdir(parents=True, exist_ok=True)
    grpc_body = workdir / f"{model_name}-infer.grpc"
    # gRPC's length-prefixed message: uncompressed flag, 4-byte big-endian length.
    grpc_body.write_bytes(b"\0" + struct.pack(">I", len(message)) + message)
    shape = [rows, _model.FEATURES]
    tensor_json = {"name": _model.INPUT, "shape": shape, "datatype": "FP32", "data": flat}
    rest_body = workdir / f"{model_name}-infer.json"
    rest_body.write_text(json.dumps({"id": REQUEST_ID, "inputs": [tensor_json]}))
    return grpc_body, rest_body


def grpc_reply_frame_size(grpc_port: int, grpc_body: Path, *, calls: int = 3) -> int:
    """Bytes of DATA one successful ModelInfer reply to ``grpc_body`` takes on the wire.

    Sends the body's message ``calls`` times through grpcio; every reply must
    have the same size (h2load's success check below relies on it). Raises
    ``grpc.RpcError`` when a call fails, ``AssertionError`` when sizes differ.
    """
    import grpc

    message = grpc_body.read_bytes()[5:]
    sizes: set[int] = set()
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        # No (de)serialisers: bytes in, bytes out.
        call = channel.unary_unary(GRPC_PATH, request_serializer=None, response_deserializer=None)
        for _ in range(calls):
            sizes.add(len(call(message, timeout=30)))
    assert len(sizes) == 1, f"reply sizes differ: {sorted(sizes)}"
    return 5 + sizes.pop()


def check_reply_bytes(extra: dict[str, Any], frame_size: int) -> str:
    """ "" when h2load's DATA bytes are those of its successful calls' good replies.

    ``extra`` is :func:`_loadgen.h2load_grpc`'s: every call h2load counts as
    succeeded (HTTP 200) must have carried one reply of ``frame_size`` bytes; calls
    reset at the end of a timed run may have carried one too.
    """
    got, ok, late = extra["bytes_data"], extra["succeeded"], extra["in_flight_at_end"]
    if ok * frame_size <= got <= (ok + late) * frame_size:
        return ""
    return (
        f"h2load received {got} bytes of DATA for {ok} calls of {frame_size} bytes each: "
        f"about {ok - got // frame_size} replies were gRPC errors"
    )


# ---------------------------------------------------------------------------
# Readiness and answers


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def wait_peer_ready(
    http_port: int,
    model_name: str,
    deadline: float,
    proc: subprocess.Popen[bytes] | None = None,
) -> float:
    """Until ``/v2/health/ready`` and ``/v2/models/NAME/ready`` answer 200.

    ``deadline`` is a ``time.monotonic()`` instant. Returns the seconds waited.
    Raises ``RuntimeError`` when ``proc`` exits first or the deadline passes.
    """
    start = time.monotonic()
    base = f"http://127.0.0.1:{http_port}/v2"
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"peer exited ({proc.returncode}) before it was ready")
        try:
            if (
                _get(f"{base}/health/ready") == 200
                and _get(f"{base}/models/{model_name}/ready") == 200
            ):
                return time.monotonic() - start
        except OSError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise RuntimeError(f"peer on port {http_port} not ready in time")
        time.sleep(0.1)


def check_peer_output(
    http_port: int, model_name: str, model_file: Path, *, rows: int = 3, tolerance: float = 1e-5
) -> float:
    """One V2 REST JSON infer; its OUTPUT0 must equal the model run here within ``tolerance``.

    Returns the largest absolute difference. Raises ``AssertionError`` when it is
    over ``tolerance`` or the reply is not the expected tensor.
    """
    import _model

    data = _model.sample_rows(rows)
    body = {
        "inputs": [
            {
                "name": _model.INPUT,
                "shape": [rows, _model.FEATURES],
                "datatype": "FP32",
                "data": [v for row in data for v in row],
            }
        ]
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/v2/models/{model_name}/infer",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        answer = json.loads(reply.read())
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert _model.OUTPUT in outputs, f"no {_model.OUTPUT} in {list(outputs)}"
    out = outputs[_model.OUTPUT]
    assert list(out["shape"]) == [rows, _model.FEATURES], out["shape"]
    got = _flatten(out["data"])
    return _compare(got, _model.reference_output(model_file, data), tolerance)


def check_peer_output_grpc(
    grpc_port: int, model_name: str, model_file: Path, *, rows: int = 3, tolerance: float = 1e-5
) -> float:
    """:func:`check_peer_output` over gRPC: ModelInfer with raw input bytes.

    Uses protoserve's own copy of the OIP stubs (``protoserve.oip.v2``), which are
    wire-compatible with the peers' (same package, service and field numbers).
    """
    import _model
    import grpc

    from protoserve.oip.v2 import grpc_service_pb2 as pb
    from protoserve.oip.v2 import grpc_service_pb2_grpc as pb_grpc

    data = _model.sample_rows(rows)
    flat = [v for row in data for v in row]
    request = pb.ModelInferRequest(model_name=model_name)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = _model.INPUT, "FP32"
    tensor.shape.extend([rows, _model.FEATURES])
    request.raw_input_contents.append(struct.pack(f"<{len(flat)}f", *flat))
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    names = [o.name for o in reply.outputs]
    assert _model.OUTPUT in names, f"no {_model.OUTPUT} in {names}"
    index = names.index(_model.OUTPUT)
    out = reply.outputs[index]
    assert list(out.shape) == [rows, _model.FEATURES], list(out.shape)
    if reply.raw_output_contents:
        raw = reply.raw_output_contents[index]
        got = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    else:
        got = list(out.contents.fp32_contents)
    return _compare(got, _model.reference_output(model_file, data), tolerance)


def _flatten(data: Any) -> list[float]:
    if isinstance(data, list) and data and isinstance(data[0], list):
        return [float(v) for part in data for v in _flatten(part)]
    return [float(v) for v in data]


def _compare(got: list[float], want: list[list[float]], tolerance: float) -> float:
    flat = [v for row in want for v in row]
    assert len(got) == len(flat), f"{len(got)} values, expected {len(flat)}"
    worst = max(abs(a - b) for a, b in zip(got, flat, strict=True))
    assert worst <= tolerance, f"max abs diff {worst:.3g} > {tolerance}"
    return worst


def stop_peer(proc: subprocess.Popen[bytes], *, timeout: float = 10.0) -> float:
    """SIGTERM the peer, SIGKILL what is left of its process tree after ``timeout``.

    MLServer's inference workers are children of its main process; the tree is
    noted before the signal, so none outlives it. MLServer sometimes stops in
    2 s and sometimes hangs in uvicorn's "Waiting for background tasks to
    complete" after a load run, hence the deadline. Returns the seconds it took.
    """
    start = time.monotonic()
    # (pid, start time): a PID reused by another process after ours exited is left alone.
    tree = [(pid, _started(pid)) for pid in process_tree(proc.pid)]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid, started in tree[1:]:
        if started is not None and _started(pid) == started:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    return time.monotonic() - start


def _started(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat field 22); None if gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


# ---------------------------------------------------------------------------
# Memory


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (2nd field) may hold spaces: split after its ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop(0)
        tree.append(current)
        todo.extend(sorted(children.get(current, [])))
    return tree


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process (0 when it is gone).

    Shared pages count once across processes, split between those that map them:
    MLServer's main process and its worker both map torch's libraries, so their
    RSS summed counts those twice (about 100 MiB each), their PSS summed does not.
    """
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_pss(pid: int) -> dict[int, int]:
    """PSS of ``pid`` and each descendant; their sum is the server's memory."""
    return {p: pss_bytes(p) for p in process_tree(pid)}


if __name__ == "__main__":  # pragma: no cover - a manual check: make both virtualenvs
    for peer_name in sys.argv[1:] or list(PEERS):
        print(ensure_venv(peer_name, HERE.parent))
    sys.exit(0)
