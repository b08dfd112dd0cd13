"""The README's examples, run as written against a real server (only the port differs)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import ServerProcess, tool

pytestmark = pytest.mark.e2e

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_readme_commands_are_the_ci_commands() -> None:
    commands = [b.strip() for b in blocks("sh")[:2]]
    assert commands[0].endswith("nox -s serve")
    assert commands[1].endswith("nox -s tests")
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines(), ".ci/run must run exactly the README's test command"


def test_python_example_runs(served: ServerProcess) -> None:
    (example,) = [b for b in blocks("python") if "grpc.insecure_channel" in b]
    code = example.replace("127.0.0.1:50051", served.target)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "FINISH_REASON_" in done.stdout and "completion_tokens" in done.stdout
    assert re.search(r"2 vectors of \d+", done.stdout)


def test_buf_curl_examples_run(served: ServerProcess) -> None:
    (block,) = [b for b in blocks("sh") if "buf curl" in b]
    commands = re.sub(r"\\\n\s*", "", block).strip().splitlines()
    assert len(commands) == 3
    outputs = []
    for command in commands:
        argv = shlex.split(command.replace("127.0.0.1:50051", served.target))
        argv[0] = tool("buf")
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    assert "protoserve.inference.v1.InferenceService/GenerateStream" in outputs[0]
    assert '"finishReason"' in outputs[1] and '"usage"' in outputs[1]
    assert json.loads(outputs[2]) == {"status": "SERVING"}
