"""A Node.js gRPC client (@grpc/grpc-js + @grpc/proto-loader) against a real server.

The client is built from the same .proto files (tests/e2e/node_client.js): this
checks that another language's gRPC stack agrees with ours on the wire.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import google.api
import pytest

from tests._tools import missing, which
from tests.e2e.conftest import ROOT, ServerProcess

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).with_name("node_client.js")
NODE_PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader")


@pytest.fixture(scope="module")
def node() -> str:
    """Path of node, checked (with the npm packages) before a server is started."""
    path = which("node", install="Node.js, which `npm ci` needs too")
    for package in NODE_PACKAGES:
        if not (ROOT / "node_modules" / package / "package.json").exists():
            missing(f"{package} is not installed: run `npm ci` in {ROOT}")
    return path


def include_dirs() -> list[str]:
    """protos/, the folder holding google/api/*.proto, and protobufjs's google/protobuf."""
    google_api = next(
        Path(p) for p in google.api.__path__ if (Path(p) / "annotations.proto").exists()
    )
    dirs = [ROOT / "protos", google_api.parent.parent]
    protobufjs = ROOT / "node_modules" / "protobufjs"
    if (protobufjs / "google" / "protobuf").is_dir():
        dirs.append(protobufjs)
    return [str(d) for d in dirs]


def test_node_client_generate_and_stream(node: str, served: ServerProcess) -> None:
    command = [node, str(SCRIPT), "--target", served.target, "--max-new-tokens", "12"]
    for folder in include_dirs():
        command += ["--include", folder]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)

    generate = summary["generate"]
    assert generate["finishReason"] == "FINISH_REASON_LENGTH"
    assert generate["tokenIds"] == 12
    assert generate["textLength"] >= 1
    assert generate["usage"] == {"promptTokens": 4, "completionTokens": 12, "totalTokens": 16}
    assert generate["model"] == "bytelm"

    stream = summary["stream"]
    assert stream["messages"] >= 2
    assert stream["tokenIds"] == 12
    assert stream["lastFinishReason"] == "FINISH_REASON_LENGTH"
    assert stream["lastUsage"] == {"promptTokens": 4, "completionTokens": 12, "totalTokens": 16}
    assert stream["onlyLastHasFinishReason"] is True
    assert stream["onlyLastHasUsage"] is True

    assert summary["unknownModel"] == "NOT_FOUND"
