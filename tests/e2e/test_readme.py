"""The README's examples, run as written against `protoserve up` (only the ports differ)."""

from __future__ import annotations

import json
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
    assert run.endswith("nox -s up")
    assert test.endswith("nox -s tests")
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines(), ".ci/run must run exactly the README's test command"


def test_curl_examples_run(up: Up) -> None:
    (block,) = [b for b in blocks("sh") if "curl -s" in b]
    outputs = []
    for command in commands(block):
        done = subprocess.run(
            shlex.split(up.localize(command)), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    generate, sse, ndjson, embed = outputs
    assert json.loads(generate)["finish_reason"] == "FINISH_REASON_LENGTH"
    assert sse.count("event: message") == 21 and "event: done" in sse
    assert "id: 1\nevent: message\ndata: {" in sse
    lines = [json.loads(line) for line in ndjson.splitlines()]
    assert len(lines) == 11 and lines[-1]["usage"]["completion_tokens"] == 10
    assert len(json.loads(embed)["embeddings"]) == 2


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


def test_python_example_runs(up: Up) -> None:
    (example,) = [b for b in blocks("python") if "grpc.insecure_channel" in b]
    done = subprocess.run(
        [sys.executable, "-c", up.localize(example)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "FINISH_REASON_" in done.stdout and "completion_tokens" in done.stdout
    assert re.search(r"2 vectors of \d+", done.stdout)


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
