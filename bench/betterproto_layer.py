"""What betterproto2's dataclass messages would cost protoserve, next to protobuf (upb).

Measures, in one process, each variant interleaved with the others in every
repetition (medians over the repetitions):

(a) serialise and parse of the same messages with protobuf (upb) and with
    betterproto2: an EmbedResponse of 8x256 floats, a GenerateRequest and a
    GenerateResponse;
(b) what a typed betterproto2 layer on top of the protobuf clients would add
    per call (a protobuf message converted to the betterproto2 dataclass, by
    bytes or by dict), next to real gRPC round trips (GetModel, Generate,
    Embed) to a protoserve server, and the same calls made through
    betterproto2's own grpcio stub;
(c) the conversions the clients already do (``protoserve.clients._convert``:
    protobuf messages to ``Generation``, tensors, ``ModelInfo``).

The betterproto2 classes are generated into a temporary folder from
``protos/`` at every run (nothing is written into the checkout). A server is
started on a free loopback port and stopped at the end, unless ``--target``
names one that runs already, or ``--no-server`` skips the round trips.

Run it with a Python that has protoserve's dependencies and betterproto2::

    pip install betterproto2==0.10.0 betterproto2-compiler==0.10.1 grpcio-tools==1.85.1
    python bench/betterproto_layer.py

The machine shares its cores between this client and the server: compare the
ratios printed here, not absolute times taken on different runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from _harness import cpu_name, dist_versions, import_protoserve, server_python

ROOT = Path(__file__).resolve().parents[1]
PROTO = "protoserve/inference/v1/inference_service.proto"
PLUGIN = "protoc-gen-python_betterproto2"
INSTALL = (
    "betterproto2 is not installed in this Python ({python}).\n"
    "Install it next to protoserve's dependencies, then run this again:\n"
    "    {python} -m pip install betterproto2==0.10.0 betterproto2-compiler==0.10.1 "
    "grpcio-tools==1.85.1\n"
    "(bench/README.md says more)."
)

# ---------------------------------------------------------------------------
# Imports: protoserve (installed, or straight from this checkout) and betterproto2.


def generate_betterproto(tmp: Path) -> ModuleType:
    """Compile protos/ with betterproto2-compiler into `tmp` and import the result."""
    try:
        importlib.import_module("betterproto2")
        importlib.import_module("betterproto2_compiler")
        importlib.import_module("grpc_tools.protoc")
    except ImportError:
        sys.exit(INSTALL.format(python=sys.executable))
    googleapis = Path(importlib.import_module("google.api.annotations_pb2").__file__ or "")
    out = tmp / "protoserve_bp"
    out.mkdir()
    env = dict(os.environ)
    # The plugin is a console script of betterproto2-compiler, next to this Python.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if shutil.which(PLUGIN, path=env["PATH"]) is None:
        sys.exit(INSTALL.format(python=sys.executable))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"-I{googleapis.resolve().parents[2]}",
            f"--python_betterproto2_out={out}",
            # grpcio stubs (the default); `async` would generate grpclib ones.
            "--python_betterproto2_opt=client_generation=sync",
            PROTO,
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    sys.path.insert(0, str(tmp))
    return importlib.import_module("protoserve_bp.protoserve.inference.v1")


def import_convert() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("protoserve.clients._convert"), ""
    except ImportError as error:  # not written yet, or no torch/numpy here
        return None, f"protoserve.clients._convert not importable ({error})"


# ---------------------------------------------------------------------------
# Timing.


def _per_call(fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def _number_for(fn: Callable[[], Any], budget: float) -> int:
    """Calls of `fn` that take about `budget` seconds."""
    fn()
    once = max(_per_call(fn, 3), 1e-7)
    return max(1, int(budget / once))


def compare(cases: dict[str, Callable[[], Any]], repeat: int, budget: float) -> dict[str, float]:
    """Median seconds per call of each case; the cases alternate in every repetition."""
    numbers = {name: _number_for(fn, budget) for name, fn in cases.items()}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            samples[name].append(_per_call(fn, numbers[name]))
    return {name: statistics.median(values) for name, values in samples.items()}


def compare_calls(
    pairs: dict[str, tuple[Callable[[], Any], Callable[[], Any]]], repeat: int, calls: int
) -> dict[str, tuple[float, float, float]]:
    """Round trips of each pair of ways to make a call, the two ways alternating call by call.

    Returns, per pair, the median latency of each way and the median of the
    paired differences (second minus first): with the server's model work in
    every call, that difference is steadier than the difference of medians.
    """
    for first, second in pairs.values():  # warm the channel and the model
        for _ in range(3):
            first()
            second()
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in pairs}
    for _ in range(repeat):
        for name, (first, second) in pairs.items():
            for _ in range(calls):
                start = time.perf_counter()
                first()
                middle = time.perf_counter()
                second()
                end = time.perf_counter()
                samples[name][0].append(middle - start)
                samples[name][1].append(end - middle)
    return {
        name: (
            statistics.median(one),
            statistics.median(two),
            statistics.median(b - a for a, b in zip(one, two, strict=True)),
        )
        for name, (one, two) in samples.items()
    }


# ---------------------------------------------------------------------------
# Messages.

PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


def messages(pb: ModuleType) -> dict[str, Any]:
    rng = random.Random(1234)
    embed = pb.EmbedResponse(model="bytelm", usage=pb.Usage(prompt_tokens=96, total_tokens=96))
    for _ in range(8):
        embed.embeddings.add(values=[rng.uniform(-0.2, 0.2) for _ in range(256)])
    # The largest batch bytelm takes (max_batch_texts) of its 256-wide vectors.
    batch = pb.EmbedResponse(model="bytelm", usage=pb.Usage(prompt_tokens=4096))
    for _ in range(256):
        batch.embeddings.add(values=[rng.uniform(-0.2, 0.2) for _ in range(256)])
    request = pb.GenerateRequest(
        model="bytelm",
        inputs=PROMPT,
        parameters=pb.GenerationParameters(
            max_new_tokens=64,
            temperature=0.8,
            top_k=40,
            top_p=0.95,
            seed=7,
            stop_sequences=["\n\n"],
        ),
    )
    text = "    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)"
    response = pb.GenerateResponse(
        generated_text=text,
        token_ids=list(text.encode()),
        finish_reason=pb.FINISH_REASON_STOP_SEQUENCE,
        usage=pb.Usage(
            prompt_tokens=len(PROMPT),
            completion_tokens=len(text),
            total_tokens=len(PROMPT) + len(text),
        ),
        model="bytelm",
    )
    step = pb.GenerateStreamResponse(text="n", token_ids=[110])
    return {
        "Embedding 256": pb.Embedding(values=embed.embeddings[0].values),
        "EmbedResponse 8x256": embed,
        "EmbedResponse 256x256": batch,
        "GenerateRequest": request,
        "GenerateResponse": response,
        "GenerateStreamResponse 1 token": step,
    }


def check_same(pb_msg: Any, bp_cls: Any) -> Any:
    """`pb_msg` as a `bp_cls`, by bytes and by dict; both must mean what `pb_msg` means."""
    from google.protobuf import json_format

    by_bytes = bp_cls.FromString(pb_msg.SerializeToString())
    by_dict = bp_cls.from_dict(json_format.MessageToDict(pb_msg))
    for how, bp_msg in (("bytes", by_bytes), ("dict", by_dict)):
        again = type(pb_msg).FromString(bytes(bp_msg))
        if again != pb_msg:
            raise SystemExit(
                f"betterproto2 ({how}) changed a {type(pb_msg).__name__}:\n{again}\n!=\n{pb_msg}"
            )
    return by_bytes


# ---------------------------------------------------------------------------
# The server.


@contextlib.contextmanager
def server(python: str, tmp: Path, pb: ModuleType, stubs: ModuleType) -> Iterator[str]:
    import grpc

    port_file = tmp / "server.port"
    cmd = [
        python,
        "-m",
        "protoserve.clients.cli",
        "serve",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--log-level",
        "WARNING",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists() or not port_file.read_text().strip():
            if proc.poll() is not None:
                raise SystemExit(f"the server exited ({proc.returncode}): {' '.join(cmd)}")
            if time.monotonic() > deadline:
                raise SystemExit("the server did not write its port in 120 s")
            time.sleep(0.1)
        target = f"127.0.0.1:{port_file.read_text().strip()}"
        with grpc.insecure_channel(target) as channel:
            stub = stubs.InferenceServiceStub(channel)
            while True:
                model = stub.GetModel(pb.GetModelRequest(name="bytelm"), timeout=10).model
                if model.state == pb.MODEL_STATE_READY:
                    break
                if model.state == pb.MODEL_STATE_FAILED or time.monotonic() > deadline:
                    raise SystemExit(f"bytelm is not ready: {model.state_message}")
                time.sleep(0.2)
        yield target
    finally:
        proc.terminate()  # SIGTERM: the server drains, then exits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------
# Report.


def us(seconds: float) -> str:
    if abs(seconds) >= 1e-3:
        return f"{seconds * 1e3:9.2f} ms"
    return f"{seconds * 1e6:9.2f} µs"


def table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def versions() -> dict[str, str]:
    from google.protobuf.internal import api_implementation

    out = {"python": platform.python_version()}
    out.update(
        dist_versions(
            "protobuf", "grpcio", "betterproto2", "betterproto2-compiler", "numpy", "torch"
        )
    )
    out["protobuf"] += f" ({api_implementation.Type()})"
    out["machine"] = (
        f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"
    )
    out["load average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return out


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=9, help="repetitions (default %(default)s)")
    parser.add_argument(
        "--budget",
        type=float,
        default=0.05,
        help="seconds per repetition of one in-process case (default %(default)s)",
    )
    parser.add_argument(
        "--calls",
        type=int,
        default=20,
        help="round trips per repetition of one call (default %(default)s)",
    )
    parser.add_argument("--target", help="HOST:PORT of a running server (else one is started)")
    parser.add_argument("--server-python", help="Python that starts the server")
    parser.add_argument("--no-server", action="store_true", help="skip the round trips")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="protoserve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        pb, stubs = import_protoserve(tmp)
        bp = generate_betterproto(tmp)
        convert, convert_note = import_convert()
        from google.protobuf import json_format

        results: dict[str, Any] = {"versions": versions()}
        msgs = messages(pb)
        bp_msgs = {name: check_same(m, getattr(bp, type(m).__name__)) for name, m in msgs.items()}

        # (a) serialise + parse.
        cases: dict[str, Callable[[], Any]] = {}
        for name, m in msgs.items():
            data = m.SerializeToString()
            pb_cls, bp_cls, bp_m = type(m), type(bp_msgs[name]), bp_msgs[name]
            cases[f"{name}|pb|ser"] = m.SerializeToString
            cases[f"{name}|bp|ser"] = bp_m.SerializeToString
            cases[f"{name}|pb|parse"] = lambda c=pb_cls, d=data: c.FromString(d)
            cases[f"{name}|bp|parse"] = lambda c=bp_cls, d=data: c.FromString(d)
        a = compare(cases, args.repeat, args.budget)
        rows = []
        for name, m in msgs.items():
            for op in ("ser", "parse"):
                p, b = a[f"{name}|pb|{op}"], a[f"{name}|bp|{op}"]
                label = "serialise" if op == "ser" else "parse"
                rows.append(
                    (name, label, us(p), us(b), f"{b / p:7.0f}x", f"{len(m.SerializeToString())} B")
                )
        results["a"] = a
        table(
            "(a) serialise / parse, median per call",
            ("message", "op", "protobuf (upb)", "betterproto2", "bp/pb", "wire"),
            rows,
        )

        # (b) the typed layer: protobuf message -> betterproto2 dataclass (and back).
        layer: dict[str, Callable[[], Any]] = {}
        for name, m in msgs.items():
            bp_cls = type(bp_msgs[name])
            layer[f"{name}|bytes"] = lambda c=bp_cls, m=m: c.FromString(m.SerializeToString())
            layer[f"{name}|dict"] = lambda c=bp_cls, m=m: c.from_dict(json_format.MessageToDict(m))
        req_bp = bp_msgs["GenerateRequest"]
        layer["GenerateRequest|back"] = lambda: pb.GenerateRequest.FromString(bytes(req_bp))
        # (c) our own conversions, on the same messages.
        if convert is not None:
            embed, response = msgs["EmbedResponse 8x256"], msgs["GenerateResponse"]
            params = {
                "max_new_tokens": 64,
                "temperature": 0.8,
                "top_k": 40,
                "top_p": 0.95,
                "seed": 7,
                "stop_sequences": ["\n\n"],
            }
            batch = msgs["EmbedResponse 256x256"]
            layer["EmbedResponse 8x256|ours"] = lambda: convert.embeddings(embed, False)
            layer["EmbedResponse 256x256|ours"] = lambda: convert.embeddings(batch, False)
            layer["GenerateResponse|ours"] = lambda: convert.generation(response)
            layer["GenerateRequest|ours"] = lambda: convert.generate_request(
                "bytelm", PROMPT, params
            )
            step = msgs["GenerateStreamResponse 1 token"]
            layer["GenerateStreamResponse 1 token|ours"] = lambda: convert.stream_part(step)
        b = compare(layer, args.repeat, args.budget)
        results["b"] = b

        # Round trips, and the model description for (b)/(c).
        rt: dict[str, tuple[float, float, float]] = {}
        if not args.no_server:
            import grpc

            with contextlib.ExitStack() as stack:
                target = args.target or stack.enter_context(
                    server(args.server_python or server_python(), tmp, pb, stubs)
                )
                channel = stack.enter_context(grpc.insecure_channel(target))
                stub = stubs.InferenceServiceStub(channel)
                bp_stub = bp.InferenceServiceStub(channel)
                texts = [PROMPT[: 12 * (i + 1)] for i in range(8)]
                gen = pb.GenerateRequest(
                    model="bytelm",
                    inputs=PROMPT,
                    parameters=pb.GenerationParameters(max_new_tokens=1),
                )
                emb = pb.EmbedRequest(model="bytelm", inputs=texts)
                get = pb.GetModelRequest(name="bytelm")
                bp_gen = bp.GenerateRequest.FromString(gen.SerializeToString())
                bp_emb = bp.EmbedRequest.FromString(emb.SerializeToString())
                bp_get = bp.GetModelRequest.FromString(get.SerializeToString())
                stream = pb.GenerateStreamRequest(
                    model="bytelm",
                    inputs=PROMPT,
                    parameters=pb.GenerationParameters(max_new_tokens=16, seed=1),
                )
                bp_stream = bp.GenerateStreamRequest.FromString(stream.SerializeToString())
                steps = len(list(stub.GenerateStream(stream)))
                results["stream_messages"] = steps
                rt = compare_calls(
                    {
                        "GetModel": (
                            lambda: stub.GetModel(get),
                            lambda: bp_stub.get_model(bp_get),
                        ),
                        "Generate 1 token": (
                            lambda: stub.Generate(gen),
                            lambda: bp_stub.generate(bp_gen),
                        ),
                        "Embed 8 texts": (
                            lambda: stub.Embed(emb),
                            lambda: bp_stub.embed(bp_emb),
                        ),
                        "GenerateStream 16 tokens": (
                            lambda: list(stub.GenerateStream(stream)),
                            lambda: list(bp_stub.generate_stream(bp_stream)),
                        ),
                    },
                    args.repeat,
                    args.calls,
                )
                model = stub.GetModel(get).model
                dims = {len(e.values) for e in stub.Embed(emb).embeddings}
                results["embed_dims"] = sorted(dims)
        else:
            model = pb.Model(
                name="bytelm",
                version="1",
                tasks=[pb.TASK_TEXT_GENERATION],
                state=pb.MODEL_STATE_READY,
                description="bench",
            )
        results["rt"] = rt
        check_same(model, bp.Model)
        model_cases: dict[str, Callable[[], Any]] = {
            "Model|bytes": lambda: bp.Model.FromString(model.SerializeToString()),
            "Model|dict": lambda: bp.Model.from_dict(json_format.MessageToDict(model)),
        }
        if convert is not None:
            model_cases["Model|ours"] = lambda: convert.model_info(model)
        b.update(compare(model_cases, args.repeat, args.budget))

        # Report (b) and (c) against the round trips.
        rows = []
        for name in (*msgs, "Model"):
            row = [name]
            for how in ("bytes", "dict", "ours"):
                value = b.get(f"{name}|{how}")
                row.append(us(value) if value is not None else "-")
            ours = b.get(f"{name}|ours")
            row.append(f"{b[f'{name}|bytes'] / ours:5.0f}x" if ours else "-")
            rows.append(tuple(row))
        table(
            "(b)/(c) converting one protobuf message, median per call",
            ("message", "-> bp (bytes)", "-> bp (dict)", "ours (_convert)", "bp bytes/ours"),
            rows,
        )
        print(f"  bp GenerateRequest -> protobuf (bytes): {us(b['GenerateRequest|back'])}")
        if convert_note:
            print(f"  (c) skipped: {convert_note}")
        if rt:
            rows = []
            steps = results["stream_messages"]
            layers = {
                "GetModel": b["Model|bytes"],
                "Generate 1 token": b["GenerateResponse|bytes"] + b["GenerateRequest|back"],
                "Embed 8 texts": b["EmbedResponse 8x256|bytes"],
                "GenerateStream 16 tokens": steps * b["GenerateStreamResponse 1 token|bytes"]
                + b["GenerateRequest|back"],
            }
            for call, layer_cost in layers.items():
                p, q, diff = rt[call]
                rows.append(
                    (
                        call,
                        us(p),
                        us(q),
                        f"{q / p:5.2f}x",
                        us(diff),
                        us(layer_cost),
                        f"{100 * layer_cost / p:5.1f}%",
                    )
                )
            table(
                "round trips (sync grpcio, loopback, server on the same cores), median per call",
                (
                    "call",
                    "protobuf stub",
                    "betterproto2 stub",
                    "bp/pb",
                    "paired bp-pb",
                    "typed layer (bytes)",
                    "layer/rt",
                ),
                rows,
            )
            print(
                "  typed layer = the bench's message of that kind converted by bytes "
                "(plus the request back to protobuf for Generate*; "
                f"GenerateStream: {steps} messages);"
            )
            print(f"  embedding width the server returned: {results['embed_dims']}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        print("\n" + "; ".join(f"{k} {v}" for k, v in results["versions"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
