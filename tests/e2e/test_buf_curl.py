"""buf curl against a real server, through reflection alone (no .proto files).

A client that has never seen protoserve's protos discovers the services, builds
requests from JSON and decodes the answers: this is what reflection is for.

buf curl prints each response message as pretty JSON on stdout (a stream is
several JSON documents one after another) and, when the call fails, a JSON
error ``{"code": "not_found", "message": ...}`` on stderr with exit status
8 x the numeric gRPC code.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import grpc
import pytest

from protoserve.inference.v1 import inference_service_pb2 as pb
from tests.e2e.conftest import ServerProcess, tool

pytestmark = pytest.mark.e2e

SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"]
TIMEOUT = 30


def buf_curl(
    server: ServerProcess, *args: str, path: str = "", data: dict[str, Any] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [
        tool("buf"),
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--connect-timeout",
        "10",
        *args,
    ]
    if data is not None:
        command += ["-d", json.dumps(data)]
    command.append(f"http://{server.target}/{path}")
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def json_documents(text: str) -> list[Any]:
    """Every JSON document in ``text``, one after another (how buf curl prints a stream)."""
    decoder = json.JSONDecoder()
    documents: list[Any] = []
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index == len(text):
            return documents
        document, index = decoder.raw_decode(text, index)
        documents.append(document)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"buf curl exited {result.returncode}:\n{result.stderr}"
    return result.stdout


def test_list_methods_through_reflection(served: ServerProcess) -> None:
    methods = ok(buf_curl(served, "--list-methods")).split()
    expected = {f"{SERVICE.full_name}/{method.name}" for method in SERVICE.methods}
    assert expected <= set(methods)
    assert "grpc.health.v1.Health/Check" in methods
    assert any(
        m.startswith("grpc.reflection.") and m.endswith(".ServerReflection/ServerReflectionInfo")
        for m in methods
    ), methods


def test_generate(served: ServerProcess) -> None:
    request = {"model": "bytelm", "inputs": "def ", "parameters": {"maxNewTokens": 8, "seed": 1}}
    [response] = json_documents(
        ok(buf_curl(served, path=f"{SERVICE.full_name}/Generate", data=request))
    )
    assert isinstance(response["generatedText"], str) and response["generatedText"]
    assert len(response["tokenIds"]) == 8
    assert response["finishReason"] == "FINISH_REASON_LENGTH"
    assert response["usage"] == {"promptTokens": 4, "completionTokens": 8, "totalTokens": 12}
    assert response["model"] == "bytelm"


def test_generate_stream_prints_one_document_per_message(served: ServerProcess) -> None:
    request = {"model": "bytelm", "inputs": "def ", "parameters": {"maxNewTokens": 16, "seed": 1}}
    messages = json_documents(
        ok(buf_curl(served, path=f"{SERVICE.full_name}/GenerateStream", data=request))
    )
    assert len(messages) >= 2
    *steps, last = messages
    assert all("finishReason" not in m and "usage" not in m for m in steps), steps
    assert last["finishReason"] == "FINISH_REASON_LENGTH"
    assert last["usage"] == {"promptTokens": 4, "completionTokens": 16, "totalTokens": 20}
    assert sum(len(m.get("tokenIds", [])) for m in messages) == 16


def test_health_check(served: ServerProcess) -> None:
    [response] = json_documents(ok(buf_curl(served, path="grpc.health.v1.Health/Check")))
    assert response == {"status": "SERVING"}


def test_unknown_model_is_not_found(served: ServerProcess) -> None:
    result = buf_curl(
        served, path=f"{SERVICE.full_name}/Generate", data={"model": "nosuch", "inputs": "x"}
    )
    assert result.returncode == 8 * grpc.StatusCode.NOT_FOUND.value[0], result
    assert result.stdout.strip() == ""
    [error] = json_documents(result.stderr)
    assert error["code"] == "not_found"
    assert "nosuch" in error["message"]
