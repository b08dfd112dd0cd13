"""The README's examples, run as written against `protoserve up` (only the ports differ)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import tool

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def commands(block: str) -> list[str]:
    return re.sub(r"\\\n\s*", "", block).strip().splitlines()


@dataclass
class Up:
    grpc: str
    http: str

    def localize(self, text: str) -> str:
        return text.replace("127.0.0.1:50051", self.grpc).replace(
            "http://127.0.0.1:8080", self.http
        )


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    log = tmp_path_factory.mktemp("up") / "up.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "protoserve.clients.cli",
                "up",
                "--grpc-port",
                "0",
                "--http-port",
                "0",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        while not (
            found := re.search(r"gRPC on ([\d.]+:\d+), HTTP on (http://[\d.:]+)", log.read_text())
        ):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield Up(found.group(1), found.group(2))
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()


def test_readme_commands_are_the_ci_commands() -> None:
    run, test = (b.strip() for b in blocks("sh")[:2])
    assert (run, test) == ("python3 dev.py up", "python3 dev.py tests")
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines(), ".ci/run must run exactly the README's test command"


def test_curl_examples_run(up: Up) -> None:
    (block,) = [b for b in blocks("sh") if "curl -s" in b and "/v2/" not in b]
    outputs = []
    for command in commands(block):
        done = subprocess.run(
            shlex.split(up.localize(command)), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    generate, sse, ndjson, embed = outputs
    assert json.loads(generate)["finish_reason"] == "FINISH_REASON_LENGTH"
    # 20 tokens in one message each, or fewer messages when the reader fell behind
    # (a message holds every token since the one before).
    messages = [
        json.loads(line.removeprefix("data: "))
        for event in sse.split("\n\n")
        if "event: message" in event
        for line in event.splitlines()
        if line.startswith("data: ")
    ]
    assert 1 <= len(messages) <= 20 and "event: done" in sse
    assert sum(len(m.get("token_ids", [])) for m in messages) == 20
    assert "id: 1\nevent: message\ndata: {" in sse
    lines = [json.loads(line) for line in ndjson.splitlines()]
    assert 1 <= len(lines) <= 10 and lines[-1]["usage"]["completion_tokens"] == 10
    assert len(json.loads(embed)["embeddings"]) == 2


def test_open_inference_protocol_curl_example_runs(up: Up) -> None:
    (block,) = [b for b in blocks("sh") if "curl -s" in b and "/v2/" in b]
    # One command whose JSON body spans lines inside its quotes.
    done = subprocess.run(
        shlex.split(up.localize(block)), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert (answer["model_name"], answer["model_version"]) == ("bytelm", "1")
    (output,) = answer["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("text_output", "BYTES", [1])
    (text,) = output["data"]
    assert isinstance(text, str) and text


def test_error_example_is_what_the_gateway_answers(up: Up) -> None:
    (shown,) = [b for b in blocks("json") if "fieldViolations" in b]
    done = subprocess.run(
        [
            "curl",
            "-s",
            f"{up.http}/v1/models/bytelm:generate",
            "-d",
            '{"inputs": "x", "parameters": {"temperature": -1}}',
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(done.stdout) == json.loads(shown)


def python_client_example(up: Up, index: int) -> str:
    """What the README's ``index``-th Python client example prints, run against ``up``."""
    examples = [b for b in blocks("python") if "from protoserve.clients import" in b]
    assert len(examples) == 3
    done = subprocess.run(
        [sys.executable, "-c", up.localize(examples[index])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_python_client_example_over_grpc_runs(up: Up) -> None:
    out = python_client_example(up, 0)
    assert " length Usage(prompt_tokens=4, completion_tokens=40)" in out
    assert "torch.Size([2," in out


def test_python_client_example_over_http_and_in_process_runs(up: Up) -> None:
    out = python_client_example(up, 1)
    # The same seeded generation, over HTTP and in-process: printed twice, identical.
    half = len(out) // 2
    assert out.strip() and out[:half] == out[half:]


def test_python_client_example_of_errors_runs(up: Up) -> None:
    out = python_client_example(up, 2)
    assert "parameters.temperature" in out and "parameters.top_p" in out
    assert "NOT_FOUND" in out and "gpt-9" in out


def test_command_line_examples_run(up: Up) -> None:
    (block,) = [b for b in blocks("sh") if "protoserve generate" in b]
    env = {**os.environ, "PROTOSERVE_SERVER": up.grpc}
    outputs = []
    for command in commands(block):
        argv = shlex.split(up.localize(command))
        assert argv[0] == "protoserve"
        done = subprocess.run(
            [sys.executable, "-m", "protoserve.clients.cli", *argv[1:]],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done)
    assert outputs[0].stdout.startswith("bytelm\t1\tready")
    assert outputs[1].stdout.strip()
    # Unseeded: 20 tokens, or fewer when the model ended the text (sampling may pick its end).
    usage = re.search(r"finish: (length|end_of_text); tokens: 7 in, (\d+) out", outputs[2].stderr)
    assert usage is not None, outputs[2].stderr
    assert int(usage[2]) == 20 if usage[1] == "length" else 1 <= int(usage[2]) < 20
    assert len(outputs[3].stdout.splitlines()) == 2


def test_bring_your_own_model_example_runs(tmp_path: Path) -> None:
    (model_code,) = [b for b in blocks("python") if "class Echo(Model)" in b]
    (tmp_path / "readme_models.py").write_text(model_code)
    code = (
        "from protoserve.clients import LocalClient\n"
        "import numpy as np\n"
        "with LocalClient('readme_models:Echo') as client:\n"
        "    print(client.generate('hello', max_new_tokens=3))\n"
        "    print(client.embed(['a b c'], normalize=False).tolist())\n"
        "    print(client.predict({'x': np.ones(2, dtype=np.float32)})['y'].tolist())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["hel", "[[5.0, 2.0]]", "[2.0, 2.0]"]


def test_buf_curl_examples_run(up: Up) -> None:
    (block,) = [b for b in blocks("sh") if "buf curl" in b]
    outputs = []
    for command in commands(block):
        argv = shlex.split(up.localize(command))
        argv[0] = tool("buf")
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    assert "protoserve.inference.v1.InferenceService/GenerateStream" in outputs[0]
    assert '"finishReason"' in outputs[1] and '"usage"' in outputs[1]
    assert json.loads(outputs[2]) == {"status": "SERVING"}
