"""The OpenAI API over gRPC, called with ``buf curl`` through reflection alone: the same
functions the gateway serves at /openai/v1, for a client that has never seen the proto.

buf curl prints protobuf's JSON (lowerCamelCase names, enums by name, int64 as strings).
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from protoserve.openai.v1 import openai_service_pb2 as pb
from tests.e2e.conftest import ServerProcess
from tests.e2e.test_buf_curl import buf_curl, json_documents, ok

pytestmark = pytest.mark.e2e

SERVICE = pb.DESCRIPTOR.services_by_name["OpenAIService"]
CHAT = {
    "model": "bytelm",
    "messages": [{"role": "user", "content": "Write a loop."}],
    "maxTokens": 8,
    "temperature": 0.8,
    "seed": "3",
}


def call(served: ServerProcess, method: str, request: dict[str, Any]) -> list[Any]:
    """The messages of one call, as buf curl prints them."""
    return json_documents(ok(buf_curl(served, path=f"{SERVICE.full_name}/{method}", data=request)))


def test_every_method_is_listed_through_reflection(served: ServerProcess) -> None:
    methods = set(ok(buf_curl(served, "--list-methods")).split())
    assert {f"{SERVICE.full_name}/{m.name}" for m in SERVICE.methods} <= methods


def test_list_models(served: ServerProcess) -> None:
    [reply] = call(served, "ListModels", {})
    assert reply["object"] == "list"
    [model] = reply["data"]
    assert (model["id"], model["object"]) == ("bytelm", "model")
    assert int(str(model["created"])) > 0


def test_create_chat_completion(served: ServerProcess) -> None:
    [reply] = call(served, "CreateChatCompletion", CHAT)
    assert reply["object"] == "chat.completion"
    assert str(reply["id"]).startswith("chatcmpl-")
    assert str(reply["systemFingerprint"]).startswith("fp_")
    [choice] = reply["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["finishReason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
    usage = reply["usage"]
    assert 0 < usage["completionTokens"] <= 8
    assert usage["totalTokens"] == usage["promptTokens"] + usage["completionTokens"]


def test_stream_chat_completion_says_what_the_unary_call_says(served: ServerProcess) -> None:
    [whole] = call(served, "CreateChatCompletion", CHAT)
    streamed = {**CHAT, "streamOptions": {"includeUsage": True}}
    chunks = call(served, "StreamChatCompletion", streamed)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    *steps, last = chunks
    assert steps[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in steps if "choices" in c)
    assert text == whole["choices"][0]["message"]["content"]
    assert "choices" not in last and last["usage"] == whole["usage"]


def test_create_embedding(served: ServerProcess) -> None:
    [reply] = call(served, "CreateEmbedding", {"model": "bytelm", "input": ["a", "bc"]})
    assert (reply["object"], reply["model"]) == ("list", "bytelm")
    # proto3 JSON leaves out zeros: the first index is absent.
    assert [e.get("index", 0) for e in reply["data"]] == [0, 1]
    assert all(e["object"] == "embedding" and e["embedding"] for e in reply["data"])
    assert len({len(e["embedding"]) for e in reply["data"]}) == 1


def test_an_unknown_model_is_not_found(served: ServerProcess) -> None:
    result = buf_curl(
        served, path=f"{SERVICE.full_name}/CreateChatCompletion", data={**CHAT, "model": "nosuch"}
    )
    assert result.returncode == 8 * grpc.StatusCode.NOT_FOUND.value[0], result
    [error] = json_documents(result.stderr)
    assert error["code"] == "not_found" and "nosuch" in error["message"]
