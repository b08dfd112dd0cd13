"""The servers under test, started on free loopback ports and stopped by PID: protoserve's,
and its peers MLServer and KServe's model server, which serve the MLP (bench/_model.py)
over the Open Inference Protocol as protoserve does, each from a virtualenv of its own
(``.nox/bench-NAME``: they pin protobuf<7) with its code in bench/peers/. bench/README.md
says why h2load and wrk drive them, and how their answers are checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _model
from _loadgen import _descendants, grpc_frame

ROOT = Path(__file__).resolve().parents[1]
#: A log line of protoserve's text format at DEBUG or INFO.
_QUIET = re.compile(r"^\S+ \S+ (DEBUG|INFO) ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """A process this run started; ``port_file`` where protoserve writes the port it bound
    (None for a process whose ``port`` was chosen before the start)."""

    name: str
    cmd: list[str]
    port_file: Path | None
    log: Path
    proc: subprocess.Popen[bytes]
    metrics_url: str | None = None
    port: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def warnings_tail(self, lines: int = 30) -> str:
        """The last ``lines`` of its log but its DEBUG and INFO lines (access lines among
        them, for a server run at INFO): text lines begin "DATE TIME LEVEL name: "."""
        kept = [line for line in self.log_tail(10**9).splitlines() if not _QUIET.match(line)]
        return "\n".join(kept[-lines:])

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM by PID (a server drains, then exits), SIGKILL after ``timeout``; then
        SIGKILL what is left of its process tree, noted before (MLServer's workers are its
        children, and MLServer sometimes hangs in uvicorn's "Waiting for background tasks
        to complete" after a load run)."""
        # (pid, start time): a PID reused by another process after ours exited is left alone.
        tree = [(pid, _started(pid)) for pid in _descendants(self.pid)]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid, started in tree:
            if started is not None and _started(pid) == started:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def _started(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat field 22); None if gone."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return None


def launch(python: str, tmp: Path, name: str, command: str, flags: Sequence[str],
           threads: int | None = None, env: dict[str, str] | None = None) -> Proc:  # fmt: skip
    """``protoserve COMMAND`` (serve, gateway) on a port it picks; a server also gets a
    metrics port, chosen here (the server logs one it picked only at INFO)."""
    port_file = tmp / f"{name}.port"
    cmd = [python, "-m", "protoserve.clients.cli", command, "--port", "0"]
    cmd += ["--port-file", str(port_file), "--log-level", "WARNING", *flags]
    metrics_port = free_port() if command == "serve" else None
    cmd += ["--metrics-port", str(metrics_port)] if metrics_port else []
    env = dict(env or {})
    if threads:  # torch's intra-op threads (its default: one per core) read these at start
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    p = spawn(tmp, name, cmd, env=env)
    p.port_file = port_file
    p.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else None
    return p


def spawn(tmp: Path, name: str, cmd: Sequence[str], *, env: dict[str, str] | None = None,
          port: int = 0, cwd: Path = ROOT) -> Proc:  # fmt: skip
    """Start ``cmd`` with its output in ``tmp/NAME.log``; ``port`` when it was chosen here."""
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(list(cmd), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out, env={**os.environ, **(env or {})})  # fmt: skip
    return Proc(name, list(cmd), None, log, proc, port=port)


async def wait_ready(p: Proc, deadline: float, models: Sequence[str] = (),
                     paths: Sequence[str] = ()) -> float:  # fmt: skip
    """Until ``p`` listens (protoserve's: once it wrote its port file) and answers: each of
    ``models`` READY (v1 GetModel), each of ``paths`` 200 over HTTP. The seconds waited."""
    import grpc
    import httpx

    from protoserve.inference.v1 import inference_service_pb2 as pb
    from protoserve.inference.v1 import inference_service_pb2_grpc as stubs

    async def ready() -> bool:
        async with httpx.AsyncClient(base_url=f"http://{p.target}", timeout=10) as http:
            for path in paths:
                if (await http.get(path)).status_code != 200:
                    return False
        async with grpc.aio.insecure_channel(p.target) as channel:
            for model in models:
                got = await stubs.InferenceServiceStub(channel).GetModel(
                    pb.GetModelRequest(name=model), timeout=10)  # fmt: skip
                if got.model.state == pb.MODEL_STATE_FAILED:
                    raise SystemExit(f"{p.name}: {model} failed: {got.model.state_message}")
                if got.model.state != pb.MODEL_STATE_READY:
                    return False
        return True

    start = time.monotonic()
    while True:
        if p.proc.poll() is not None:
            raise SystemExit(f"{p.name} exited ({p.proc.returncode}): {p.cmd}\n{p.log_tail()}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{p.name} not ready in time\n{p.log_tail()}")
        if p.port_file and p.port_file.exists() and (port := p.port_file.read_text().strip()):
            p.port = int(port)
        if p.port:
            with contextlib.suppress(grpc.aio.AioRpcError, httpx.HTTPError):
                if await ready():
                    return time.monotonic() - start
        await asyncio.sleep(0.2)


def launch_echo(python: str, tmp: Path, replies: dict[str, bytes]) -> Proc:
    """bench/_echo.py answering each method path of ``replies`` with its bytes; its port is
    in ``port`` once :func:`wait_ready` returns (it writes its port file once serving)."""
    folder = tmp / "echo"
    folder.mkdir(parents=True, exist_ok=True)
    args = []
    for i, (path, reply) in enumerate(replies.items()):
        (file := folder / f"reply-{i}.bin").write_bytes(reply)
        args.append(f"{path}={file}")
    port_file = folder / "port"
    cmd = [python, str(ROOT / "bench" / "_echo.py"), "--port-file", str(port_file), *args]
    p = spawn(tmp, "echo", cmd)
    p.port_file = port_file
    return p


@contextlib.contextmanager
def stopping(procs: list[Proc]) -> Iterator[None]:
    try:
        yield
    finally:
        for p in reversed(procs):
            p.stop()


# The peers ---------------------------------------------------------------------------------------

GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"
REQUEST_ID = "bench"  # fixed, so every server's reply has the same size
PEER_CODE = ROOT / "bench" / "peers"

#: protoserve's dynamic batching, which the peers' adaptive batching is set to match.
MAX_BATCH_SIZE = 32
MAX_BATCH_DELAY_S = 0.002

#: Exact pins of what each peer's virtualenv installs (torch as protoserve's).
PEERS: dict[str, tuple[str, ...]] = {
    # uvloop 0.22+ raises in asyncio.get_event_loop() without a running loop, which
    # MLServer 1.7.1's inference worker calls at start: every worker dies ("There is no
    # current event loop in thread 'MainThread'") and the model never loads. 0.21.0 is
    # the last release that works with it.
    "mlserver": ("torch==2.13.0", "mlserver==1.7.1", "uvloop==0.21.0"),
    "kserve": ("torch==2.13.0", "kserve==0.21.0"),
}
MARKER = "bench-requirements.txt"


def ensure_venv(name: str, root: Path, *, python: str = "python3",
                pins: Sequence[str] | None = None) -> Path:  # fmt: skip
    """Make the virtualenv ``.nox/bench-NAME`` when missing or stale (its marker file does
    not hold ``pins``, by default peer ``name``'s in :data:`PEERS`: a second run costs
    nothing); return its Python. Tools with dependencies of their own (aiperf) use it too."""
    pins = tuple(PEERS[name] if pins is None else pins)
    venv = root.resolve() / ".nox" / f"bench-{name}"
    marker, exe = venv / MARKER, venv / "bin" / "python"
    wanted = "\n".join(pins) + "\n"
    if exe.exists() and marker.exists() and marker.read_text() == wanted:
        return exe
    if not exe.exists():
        print(f"[{name}] creating {venv} ({python} -m venv)", flush=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    marker.unlink(missing_ok=True)
    print(f"[{name}] installing into {venv}: {' '.join(pins)}", flush=True)
    subprocess.run([str(exe), "-m", "pip", "install", *pins], check=True)
    marker.write_text(wanted)
    return exe


def effective_settings(name: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Peer ``name``'s settings: its documented defaults (stated, so that the report shows
    them), adaptive batching equal to protoserve's where it has any, then ``settings``.
    Keys are the peer's own names, and ``torch_threads`` (``OMP_NUM_THREADS``)."""
    if name == "mlserver":  # mlserver.settings.Settings; adaptive batching is off by default
        merged: dict[str, Any] = {
            "parallel_workers": 1,  # one inference worker process beside the main one
            "debug": True,  # an access log line per request, REST and gRPC
            "gzip_enabled": True, "metrics_endpoint": "/metrics", "metrics_port": None,
            "max_batch_size": MAX_BATCH_SIZE, "max_batch_time": MAX_BATCH_DELAY_S,
            "torch_threads": None,
        }  # fmt: skip
    else:  # kserve.model_server's flags
        merged = {
            "workers": 1,  # uvicorn processes for REST
            "max_threads": 4,  # gRPC server's thread pool
            "max_asyncio_workers": None,  # default executor: min(32, cores + 4)
            "enable_latency_logging": True,  # a log line per request
            "metrics": "/metrics on the REST port (always on)",
            # No adaptive batching: in a cluster that is KServe's agent sidecar's, not run here.
            "adaptive_batching": None, "torch_threads": None,
        }  # fmt: skip
    if unknown := set(settings or {}) - set(merged):
        raise ValueError(f"unknown {name} settings: {sorted(unknown)}")
    return {**merged, **(settings or {})}


def peer_command(name: str, python: Path, model_file: Path, workdir: Path, model_name: str,
                 http_port: int, grpc_port: int, settings: dict[str, Any]) -> Any:  # fmt: skip
    """Write peer ``name``'s settings files (:func:`effective_settings`) into ``workdir``: its
    argv (binding 127.0.0.1 only), the variables to add to its environment, its settings."""
    chosen = effective_settings(name, settings)
    workdir.mkdir(parents=True, exist_ok=True)
    env: dict[str, str] = {"PYTHONUNBUFFERED": "1"}
    if chosen["torch_threads"]:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(chosen["torch_threads"])
    if name == "mlserver":
        if chosen["metrics_endpoint"] and not chosen["metrics_port"]:
            chosen["metrics_port"] = free_port()
        server = {
            "host": "127.0.0.1",
            "http_port": http_port,
            "grpc_port": grpc_port,
            **{k: chosen[k] for k in ("parallel_workers", "debug", "gzip_enabled")},
            **{k: chosen[k] for k in ("metrics_endpoint", "metrics_port") if chosen[k]},
            # MLServer's defaults put these under the current directory.
            "metrics_dir": str(workdir / ".metrics"),
            "environments_dir": str(workdir / ".envs"),
        }
        tensor = {"datatype": "FP32", "shape": [-1, _model.FEATURES]}
        model = {
            "name": model_name,
            "implementation": "mlserver_runtime.TorchScriptMLP",
            "parameters": {"uri": str(model_file)},
            "max_batch_size": chosen["max_batch_size"],
            "max_batch_time": chosen["max_batch_time"],
            "inputs": [{"name": _model.INPUT, **tensor}],
            "outputs": [{"name": _model.OUTPUT, **tensor}],
        }
        (workdir / "settings.json").write_text(json.dumps(server, indent=2) + "\n")
        (workdir / model_name).mkdir(exist_ok=True)
        (workdir / model_name / "model-settings.json").write_text(json.dumps(model, indent=2))
        # The console script beside the virtualenv's Python: `mlserver start DIR`.
        argv = [str(python.parent / "mlserver"), "start", str(workdir)]
        env["PYTHONPATH"] = str(PEER_CODE)  # the runtime's module, for its workers too
    else:
        flags = ("workers", "max_threads", "enable_latency_logging", "max_asyncio_workers")
        argv = [str(python), str(PEER_CODE / "kserve_server.py"), f"--model_path={model_file}",
                f"--model_name={model_name}", f"--http_port={http_port}",
                f"--grpc_port={grpc_port}"]  # fmt: skip
        argv += [f"--{k}={chosen[k]}" for k in flags if chosen[k] is not None]
    return argv, env, chosen


# Requests: the same bytes for every server, and answers checked ----------------------------------


def infer_request(model_name: str, rows: list[list[float]], request_id: str = "") -> Any:
    """A ModelInferRequest of ``rows`` as raw INPUT0 bytes (as Triton's gRPC clients send),
    from protoserve's copy of the OIP stubs: the peers' wire format too."""
    from protoserve.oip.v2 import grpc_service_pb2 as pb

    flat = [v for row in rows for v in row]
    request = pb.ModelInferRequest(model_name=model_name, id=request_id)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = _model.INPUT, "FP32"
    tensor.shape.extend([len(rows), _model.FEATURES])
    request.raw_input_contents.append(struct.pack(f"<{len(flat)}f", *flat))
    return request


def rest_body(rows: list[list[float]], request_id: str | None = None) -> bytes:
    """The V2 REST JSON of the same rows (MLServer has no binary tensor extension)."""
    tensor = {"name": _model.INPUT, "shape": [len(rows), _model.FEATURES], "datatype": "FP32",
              "data": [v for row in rows for v in row]}  # fmt: skip
    return json.dumps({**({"id": request_id} if request_id else {}), "inputs": [tensor]}).encode()


def write_load_bodies(workdir: Path, model_name: str) -> tuple[Path, Path]:
    """The load's bodies, one row with the id ``bench``: ``(gRPC-framed, REST JSON)``."""
    rows = _model.sample_rows(1)
    workdir.mkdir(parents=True, exist_ok=True)
    grpc_body, json_body = workdir / f"{model_name}.grpc", workdir / f"{model_name}.json"
    message = infer_request(model_name, rows, REQUEST_ID).SerializeToString()
    grpc_body.write_bytes(grpc_frame(message))
    json_body.write_bytes(rest_body(rows, REQUEST_ID))
    return grpc_body, json_body


def grpc_replies(grpc_port: int, path: str, message: bytes, calls: int = 3) -> set[bytes]:
    """The distinct serialized replies of ``calls`` unary calls of ``message`` to ``path``."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        return {call(message, timeout=30) for _ in range(calls)}


def grpc_reply_frame_size(grpc_port: int, grpc_body: Path, *, calls: int = 3,
                          path: str = GRPC_PATH) -> int:  # fmt: skip
    """Bytes of DATA one good reply to ``grpc_body`` (a gRPC frame; by default a
    ModelInfer) takes (the same for all)."""
    sizes = {len(r) for r in grpc_replies(grpc_port, path, grpc_body.read_bytes()[5:], calls)}
    assert len(sizes) == 1, f"reply sizes differ: {sorted(sizes)}"
    return 5 + sizes.pop()


def check_reply_bytes(extra: dict[str, Any], frame_size: int) -> str:
    """ "" when h2load's DATA bytes (its ``extra``) are a good reply for each call it counts
    as succeeded (and maybe for those reset at the end of the run)."""
    got, ok, late = extra["bytes_data"], extra["succeeded"], extra["in_flight_at_end"]
    if ok * frame_size <= got <= (ok + late) * frame_size:
        return ""
    return (
        f"h2load received {got} bytes of DATA for {ok} calls of {frame_size} bytes each: "
        f"about {ok - got // frame_size} replies were gRPC errors"
    )


def check_output(http_port: int, grpc_port: int, model_name: str, model_file: Path, *,
                 rows: int = 3, tolerance: float = 1e-5) -> None:  # fmt: skip
    """One V2 REST JSON infer and one gRPC ModelInfer with raw input bytes: each OUTPUT0
    must equal the model run here within ``tolerance`` (AssertionError otherwise)."""
    import grpc

    from protoserve.oip.v2 import grpc_service_pb2_grpc as pb_grpc

    data = _model.sample_rows(rows)
    want = _model.reference_output(model_file, data)
    url = f"http://127.0.0.1:{http_port}/v2/models/{model_name}/infer"
    request = urllib.request.Request(url, rest_body(data), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        out = {o["name"]: o for o in json.loads(reply.read())["outputs"]}[_model.OUTPUT]
    assert list(out["shape"]) == [rows, _model.FEATURES], out["shape"]
    answers = {"REST": [float(v) for v in _flatten(out["data"])]}
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        got = stub.ModelInfer(infer_request(model_name, data), timeout=30)
    index = [o.name for o in got.outputs].index(_model.OUTPUT)
    output, raw = got.outputs[index], got.raw_output_contents
    assert list(output.shape) == [rows, _model.FEATURES], output.shape
    floats = struct.unpack(f"<{len(raw[index]) // 4}f", raw[index]) if raw else None
    answers["gRPC"] = list(floats or output.contents.fp32_contents)
    for how, values in answers.items():  # zip(strict) fails on a count that differs
        worst = max(abs(a - b) for a, b in zip(values, want, strict=True))
        assert worst <= tolerance, f"{how}: max abs diff {worst:.3g} > {tolerance}"


def _flatten(data: Any) -> list[Any]:
    return [v for part in data for v in _flatten(part)] if isinstance(data, list) else [data]
