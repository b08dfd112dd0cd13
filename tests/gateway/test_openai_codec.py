"""OpenAI's HTTP API through the gateway's OpenAI codec: the bytes an OpenAI SDK reads.

A real grpc.aio server of ``protoserve.openai.v1.OpenAIService`` that answers fixed
messages (and records what reached it) stands behind the real gateway on uvicorn, so
that every assertion is about the codec: JSON in and out, the ``data: [DONE]``
stream, the error bodies and statuses. tests/e2e runs the official ``openai``
package against the real server.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from openapi_spec_validator import OpenAPIV31SpecValidator

from protoserve.gateway import build_gateway
from protoserve.openai.v1 import openai_service_pb2 as pb
from protoserve.openai.v1 import openai_service_pb2_grpc
from tests._observe import wait_until
from tests._threads import LoopThread, UvicornThread

CREATED = 1_700_000_000
STOP = pb.FINISH_REASON_STOP
LENGTH = pb.FINISH_REASON_LENGTH


async def fail(
    context: grpc.aio.ServicerContext[Any, Any],
    code: grpc.StatusCode,
    message: str,
    *details: Message,
) -> None:
    """Abort the call with ``google.rpc`` details, as protoserve's server sends them."""
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    status = status_pb2.Status(code=code.value[0], message=message, details=packed)
    trailer = (("grpc-status-details-bin", status.SerializeToString()),)
    await context.abort(code, message, trailing_metadata=trailer)


def bad_field(field_name: str) -> error_details_pb2.BadRequest:
    violation = error_details_pb2.BadRequest.FieldViolation(field=field_name, description="bad")
    return error_details_pb2.BadRequest(field_violations=[violation])


async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """The failures a test asks for by model name."""
    if request.model == "busy":
        delay = duration_pb2.Duration(seconds=2)
        await fail(
            context,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "the queue is full",
            error_details_pb2.RetryInfo(retry_delay=delay),
        )
    if request.model == "locked":
        await fail(context, grpc.StatusCode.UNAUTHENTICATED, "no token")
    if request.model == "broken":
        await fail(context, grpc.StatusCode.INTERNAL, "internal error (request id r1)")
    if request.model == "picky":
        await fail(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages[1].role: must be system, developer, user or assistant",
            bad_field("messages[1].role"),
        )
    if request.model == "nobody":
        await fail(
            context,
            grpc.StatusCode.NOT_FOUND,
            "model 'nobody' not found",
            error_details_pb2.ResourceInfo(resource_type="model", resource_name="nobody"),
        )


@dataclass
class Upstream(openai_service_pb2_grpc.OpenAIServiceServicer):
    """OpenAIService with fixed answers; ``seen`` holds every request that reached it."""

    seen: list[Message] = field(default_factory=list)
    cancelled: int = 0

    async def ListModels(self, request: Any, context: Any) -> pb.ModelList:
        model = pb.Model(id="m", object="model", created=CREATED, owned_by="protoserve")
        return pb.ModelList(object="list", data=[model])

    async def RetrieveModel(self, request: Any, context: Any) -> pb.Model:
        if request.id != "m":
            await fail(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"the model `{request.id}` does not exist",
                error_details_pb2.ResourceInfo(resource_type="model", resource_name=request.id),
            )
        return pb.Model(id="m", object="model", created=CREATED, owned_by="protoserve")

    async def CreateChatCompletion(self, request: Any, context: Any) -> pb.ChatCompletion:
        self.seen.append(request)
        await refuse(request, context)
        logprobs = None
        if request.logprobs:
            top = pb.TopLogprob(token="h", logprob=-0.5, bytes=b"h")
            token = pb.TokenLogprob(token="h", logprob=-0.25, bytes=b"h", top_logprobs=[top])
            logprobs = pb.ChoiceLogprobs(content=[token])
        text = "|".join(m.content for m in request.messages)
        choice = pb.ChatCompletionChoice(
            index=0,
            message=pb.ChatMessage(role="assistant", content=text),
            finish_reason=STOP,
            logprobs=logprobs,
        )
        return pb.ChatCompletion(
            id="chatcmpl-r1",
            object="chat.completion",
            created=CREATED,
            model=request.model,
            choices=[choice],
            usage=pb.Usage(prompt_tokens=3, completion_tokens=1, total_tokens=4),
            system_fingerprint="fp_0123456789",
        )

    async def StreamChatCompletion(
        self, request: Any, context: Any
    ) -> AsyncIterator[pb.ChatCompletionChunk]:
        self.seen.append(request)
        await refuse(request, context)
        head = {"id": "chatcmpl-r2", "object": "chat.completion.chunk", "created": CREATED}
        head |= {"model": request.model, "system_fingerprint": "fp_0123456789"}
        deltas = [("assistant", "", 0), ("", "Hel", 0), ("", "lo", LENGTH)]
        if request.model == "endless":
            deltas = [("assistant", "", 0)]
        for role, content, finish in deltas:
            delta = pb.ChatDelta(role=role, content=content)
            choice = pb.ChatCompletionChunkChoice(index=0, delta=delta, finish_reason=finish)
            yield pb.ChatCompletionChunk(**head, choices=[choice])
        if request.model == "fails-midway":
            await fail(context, grpc.StatusCode.UNAVAILABLE, "the model was unloaded")
        if request.model == "endless":
            try:
                while True:
                    choice = pb.ChatCompletionChunkChoice(index=0, delta=pb.ChatDelta(content="a"))
                    yield pb.ChatCompletionChunk(**head, choices=[choice])
                    await context_sleep()
            finally:
                self.cancelled += 1
        if request.stream_options.include_usage:
            usage = pb.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
            yield pb.ChatCompletionChunk(**head, usage=usage)

    async def CreateCompletion(self, request: Any, context: Any) -> pb.Completion:
        self.seen.append(request)
        await refuse(request, context)
        logprobs = None
        if request.HasField("logprobs"):
            alternatives = pb.TokenAlternatives(logprobs={"o": -0.5, "a": -1.0})
            logprobs = pb.CompletionLogprobs(
                tokens=["o"], token_logprobs=[-0.5], top_logprobs=[alternatives], text_offset=[2]
            )
        choices = [
            pb.CompletionChoice(index=i, text=p + "!", finish_reason=STOP, logprobs=logprobs)
            for i, p in enumerate(request.prompt)
        ]
        return pb.Completion(
            id="cmpl-r3",
            object="text_completion",
            created=CREATED,
            model=request.model,
            choices=choices,
            usage=pb.Usage(prompt_tokens=2, completion_tokens=2, total_tokens=4),
            system_fingerprint="fp_0123456789",
        )

    async def StreamCompletion(self, request: Any, context: Any) -> AsyncIterator[pb.Completion]:
        self.seen.append(request)
        await refuse(request, context)
        head = {"id": "cmpl-r4", "object": "text_completion", "created": CREATED}
        head |= {"model": request.model, "system_fingerprint": "fp_0123456789"}
        for text, finish in (("a", 0), ("b", STOP)):
            choice = pb.CompletionChoice(index=0, text=text, finish_reason=finish)
            yield pb.Completion(**head, choices=[choice])
        if request.stream_options.include_usage:
            usage = pb.Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)
            yield pb.Completion(**head, usage=usage)

    async def CreateEmbedding(self, request: Any, context: Any) -> pb.EmbeddingList:
        self.seen.append(request)
        await refuse(request, context)
        data = [
            pb.Embedding(object="embedding", embedding=[0.5, -0.25, 0.1], index=i)
            for i, _ in enumerate(request.input)
        ]
        usage = pb.Usage(prompt_tokens=4, total_tokens=4)
        return pb.EmbeddingList(object="list", data=data, model=request.model, usage=usage)


async def context_sleep() -> None:
    import asyncio

    await asyncio.sleep(0.01)


@dataclass
class Fixed:
    upstream: Upstream
    http: httpx.Client


@pytest.fixture(scope="module")
def fixed() -> Iterator[Fixed]:
    upstream = Upstream()
    thread = LoopThread()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        openai_service_pb2_grpc.add_OpenAIServiceServicer_to_server(upstream, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = thread.run(start())
    gateway = UvicornThread(build_gateway(f"127.0.0.1:{port}", keepalive=0.5))
    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            yield Fixed(upstream, http)
    finally:
        gateway.stop()
        thread.run(server.stop(0))
        thread.stop()


CHAT = "/openai/v1/chat/completions"
COMPLETIONS = "/openai/v1/completions"
EMBEDDINGS = "/openai/v1/embeddings"
USER = {"role": "user", "content": "hi"}


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


# Models ---------------------------------------------------------------------------------


def test_models_list_and_retrieve(fixed: Fixed) -> None:
    model = {"id": "m", "object": "model", "created": CREATED, "owned_by": "protoserve"}
    listed = fixed.http.get("/openai/v1/models")
    assert listed.status_code == 200
    assert listed.json() == {"object": "list", "data": [model]}
    assert fixed.http.get("/openai/v1/models/m").json() == model
    missing = fixed.http.get("/openai/v1/models/gpt-9")
    assert missing.status_code == 404
    assert error_of(missing) == {
        "message": "the model `gpt-9` does not exist",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    }


# Chat -----------------------------------------------------------------------------------


def test_a_chat_completion_is_openai_json(fixed: Fixed) -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    body = {
        "model": "m",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": parts}],
        "stop": "\n",
        "max_tokens": 5,
        "temperature": 0,
        "seed": 7,
        "user": "u1",
        "tool_choice": None,  # null means unset
    }
    response = fixed.http.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "id": "chatcmpl-r1",
        "object": "chat.completion",
        "created": CREATED,
        "model": "m",
        "system_fingerprint": "fp_0123456789",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "be brief|ab", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    seen: Any = fixed.upstream.seen[-1]
    assert isinstance(seen, pb.ChatCompletionRequest)
    assert list(seen.stop) == ["\n"]
    assert (seen.max_tokens, seen.temperature, seen.seed, seen.user) == (5, 0, 7, "u1")
    assert not seen.HasField("stream") and not seen.HasField("top_p")


def test_chat_logprobs_are_openai_s_layout(fixed: Fixed) -> None:
    body = {"model": "m", "messages": [USER], "logprobs": True, "top_logprobs": 1}
    choice = fixed.http.post(CHAT, json=body).json()["choices"][0]
    top = {"token": "h", "logprob": -0.5, "bytes": [104]}
    assert choice["logprobs"] == {
        "content": [{"token": "h", "logprob": -0.25, "bytes": [104], "top_logprobs": [top]}],
        "refusal": None,
    }
    assert fixed.upstream.seen[-1].top_logprobs == 1  # type: ignore[attr-defined]


def chunk(delta: dict[str, Any], finish: str | None, **more: Any) -> bytes:
    data = {
        "id": "chatcmpl-r2",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "m",
        "system_fingerprint": "fp_0123456789",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **more,
    }
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def test_stream_true_streams_even_when_accept_says_json(fixed: Fixed) -> None:
    # What the SDKs send: the body asks for the stream, Accept for JSON.
    body = {"model": "m", "messages": [USER], "stream": True}
    response = fixed.http.post(CHAT, json=body, headers={"Accept": "application/json"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.content == (
        chunk({"role": "assistant", "content": ""}, None)
        + chunk({"content": "Hel"}, None)
        + chunk({"content": "lo"}, "length")
        + b"data: [DONE]\n\n"
    )
    assert fixed.upstream.seen[-1].stream is True  # type: ignore[attr-defined]


def test_include_usage_puts_null_usage_on_every_chunk_before_the_usage_chunk(
    fixed: Fixed,
) -> None:
    body = {
        "model": "m",
        "messages": [USER],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = fixed.http.post(CHAT, json=body)
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    last = {
        "id": "chatcmpl-r2",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "m",
        "system_fingerprint": "fp_0123456789",
        "choices": [],
        "usage": usage,
    }
    assert response.content == (
        chunk({"role": "assistant", "content": ""}, None, usage=None)
        + chunk({"content": "Hel"}, None, usage=None)
        + chunk({"content": "lo"}, "length", usage=None)
        + b"data: "
        + json.dumps(last, separators=(",", ":")).encode()
        + b"\n\ndata: [DONE]\n\n"
    )


def test_an_error_after_the_stream_started_is_one_error_event(fixed: Fixed) -> None:
    body = {"model": "fails-midway", "messages": [USER], "stream": True}
    response = fixed.http.post(CHAT, json=body)
    assert response.status_code == 200
    *events, last = response.content.split(b"\n\n")[:-1]
    assert len(events) == 3 and all(e.startswith(b'data: {"id"') for e in events)
    assert json.loads(last.removeprefix(b"data: ")) == {
        "error": {
            "message": "the model was unloaded",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert response.content.endswith(b"}\n\n")  # no [DONE] after the error


def test_leaving_a_stream_cancels_the_upstream_call(fixed: Fixed) -> None:
    before = fixed.upstream.cancelled
    body = {"model": "endless", "messages": [USER], "stream": True}
    with fixed.http.stream("POST", CHAT, json=body) as response:
        first = next(response.iter_lines())
        assert first.startswith('data: {"id":"chatcmpl-r2"')
    wait_until(lambda: fixed.upstream.cancelled > before, "the upstream stream was cancelled")


def test_a_stream_refused_at_once_gets_its_own_status(fixed: Fixed) -> None:
    body = {"model": "picky", "messages": [USER], "stream": True}
    response = fixed.http.post(CHAT, json=body)
    assert response.status_code == 400
    assert error_of(response)["param"] == "messages[1].role"


# Completions and embeddings ------------------------------------------------------------


def test_a_completion_takes_a_prompt_string_or_list(fixed: Fixed) -> None:
    one = fixed.http.post(COMPLETIONS, json={"model": "m", "prompt": "ab"})
    assert one.status_code == 200, one.text
    assert one.json() == {
        "id": "cmpl-r3",
        "object": "text_completion",
        "created": CREATED,
        "model": "m",
        "system_fingerprint": "fp_0123456789",
        "choices": [{"text": "ab!", "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
    }
    two = fixed.http.post(COMPLETIONS, json={"model": "m", "prompt": ["a", "b"], "logprobs": 1})
    choices = two.json()["choices"]
    assert [c["text"] for c in choices] == ["a!", "b!"]
    assert choices[0]["logprobs"] == {
        "tokens": ["o"],
        "token_logprobs": [-0.5],
        "top_logprobs": [{"o": -0.5, "a": -1.0}],
        "text_offset": [2],
    }


def test_a_streamed_completion(fixed: Fixed) -> None:
    body = {"model": "m", "prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    response = fixed.http.post(COMPLETIONS, json=body)
    events = [json.loads(e.removeprefix(b"data: ")) for e in response.content.split(b"\n\n")[:-2]]
    assert response.content.endswith(b"\n\ndata: [DONE]\n\n")
    assert [e["choices"] for e in events] == [
        [{"text": "a", "index": 0, "logprobs": None, "finish_reason": None}],
        [{"text": "b", "index": 0, "logprobs": None, "finish_reason": "stop"}],
        [],
    ]
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert [e["usage"] for e in events] == [None, None, usage]
    assert {e["object"] for e in events} == {"text_completion"}


def test_embeddings_as_floats_and_as_base64(fixed: Fixed) -> None:
    floats = fixed.http.post(EMBEDDINGS, json={"model": "m", "input": "a"})
    assert floats.json() == {
        "object": "list",
        "data": [{"object": "embedding", "embedding": [0.5, -0.25, 0.1], "index": 0}],
        "model": "m",
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
    }
    body = {"model": "m", "input": ["a", "b"], "encoding_format": "base64"}
    encoded = fixed.http.post(EMBEDDINGS, json=body).json()["data"]
    assert [item["index"] for item in encoded] == [0, 1]
    vector = struct.unpack("<3f", base64.b64decode(encoded[1]["embedding"]))
    assert vector == struct.unpack("<3f", struct.pack("<3f", 0.5, -0.25, 0.1))


# Errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        (CHAT, {"tool_choice": "required"}, "tool_choice"),
        (CHAT, {"functions": [{"name": "f"}]}, "functions"),
        (CHAT, {"function_call": {"name": "f"}}, "function_call"),
        (CHAT, {"response_format": {"type": "json_object"}}, "response_format"),
        (CHAT, {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        (CHAT, {"modalities": ["text", "audio"]}, "modalities"),
        (CHAT, {"prediction": {"type": "content", "content": "x"}}, "prediction"),
        (CHAT, {"logit_bias": {"50256": -100}}, "logit_bias"),
        (CHAT, {"presence_penalty": 0.5}, "presence_penalty"),
        (CHAT, {"frequency_penalty": -1}, "frequency_penalty"),
        (CHAT, {"web_search_options": {}}, "web_search_options"),
        (CHAT, {"reasoning_effort": "low"}, "reasoning_effort"),
        (CHAT, {"store": True}, "store"),
        (CHAT, {"service_tier": "flex"}, "service_tier"),
        (CHAT, {"verbosity": "low"}, "verbosity"),
        (COMPLETIONS, {"echo": True}, "echo"),
        (COMPLETIONS, {"suffix": "end"}, "suffix"),
        (COMPLETIONS, {"best_of": 2}, "best_of"),
        (EMBEDDINGS, {"dimensions": 8}, "dimensions"),
    ],
)
def test_parameters_the_models_cannot_honour_are_refused_by_name(
    fixed: Fixed, path: str, extra: dict[str, Any], param: str
) -> None:
    base = {
        CHAT: {"model": "m", "messages": [USER]},
        COMPLETIONS: {"model": "m", "prompt": "x"},
        EMBEDDINGS: {"model": "m", "input": "x"},
    }[path]
    before = len(fixed.upstream.seen)
    response = fixed.http.post(path, json={**base, **extra})
    assert response.status_code == 400
    error = error_of(response)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, None)
    assert f"'{param}'" in error["message"]
    assert len(fixed.upstream.seen) == before  # refused by the gateway, never called


def test_parameters_that_change_nothing_are_accepted(fixed: Fixed) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi", "refusal": None}],
        "store": False,
        "metadata": {"k": "v"},
        "service_tier": "auto",
        "parallel_tool_calls": True,
        "tools": [],
        "response_format": {"type": "text"},
        "modalities": ["text"],
        "logit_bias": {},
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        # What the openai SDK (3.x) sends as keyword arguments of its own.
        "safety_identifier": "user-1",
        "prompt_cache_key": "k",
        "prompt_cache_retention": "in-memory",
        "verbosity": "medium",
        "stream": True,
        "stream_options": {"include_usage": True, "include_obfuscation": False},
    }
    assert fixed.http.post(CHAT, json=body).status_code == 200
    body = {"model": "m", "prompt": "x", "n": 2, "best_of": 2, "echo": False, "suffix": None}
    assert fixed.http.post(COMPLETIONS, json=body).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        (CHAT, {"model": "m", "messages": [USER], "foo": 1}, "foo",
         "Unrecognized request argument supplied: foo"),
        (CHAT, {"model": "m", "messages": [USER], "temperature": "hot"}, "temperature",
         "Invalid type for 'temperature': expected a decimal, but got a string instead."),
        (CHAT, {"model": "m", "messages": [USER], "stream": "yes"}, "stream",
         "Invalid type for 'stream': expected a boolean, but got a string instead."),
        (CHAT, {"model": "m", "messages": [USER], "max_tokens": -1}, "max_tokens",
         "Invalid 'max_tokens': integer below minimum value. Expected a value >= 0, but got "
         "-1 instead."),
        (CHAT, {"model": "m", "messages": [USER], "stop": 3}, "stop",
         "Invalid type for 'stop': expected a string or an array of strings, but got an "
         "integer instead."),
        (CHAT, {"model": "m"}, "messages", "Missing required parameter: 'messages'."),
        (CHAT, {"messages": [USER]}, "model", "Missing required parameter: 'model'."),
        (CHAT, {"model": "m", "messages": [{"content": "x"}]}, "messages[0].role",
         "Missing required parameter: 'messages[0].role'."),
        (CHAT, {"model": "m", "messages": [USER], "stream_options": {"include_usage": True}},
         "stream_options",
         "The 'stream_options' parameter is only allowed when 'stream' is enabled."),
        (COMPLETIONS, {"model": "m", "prompt": [1, 2, 3]}, "prompt",
         "Invalid 'prompt': token ids are not supported; send the text instead."),
        (EMBEDDINGS, {"model": "m", "input": [[1, 2]]}, "input",
         "Invalid 'input': token ids are not supported; send the text instead."),
        (EMBEDDINGS, {"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format",
         "Invalid 'encoding_format': \"int8\"; expected 'float' or 'base64'."),
    ],
)  # fmt: skip
def test_bad_requests_name_the_parameter(
    fixed: Fixed, path: str, body: dict[str, Any], param: str, message: str
) -> None:
    response = fixed.http.post(path, json=body)
    assert response.status_code == 400
    assert error_of(response) == {
        "message": message,
        "type": "invalid_request_error",
        "param": param,
        "code": None,
    }


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"type": "image_url", "image_url": {"url": "http://x/y.png"}},
         "messages[1].content[1].type"),
        ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
         "messages[1].content[1].type"),
        ({"type": "file", "file": {"file_id": "f"}}, "messages[1].content[1].type"),
    ],
)  # fmt: skip
def test_content_parts_other_than_text_are_refused_by_position(
    fixed: Fixed, part: dict[str, Any], param: str
) -> None:
    content = [{"type": "text", "text": "look"}, part]
    body = {"model": "m", "messages": [USER, {"role": "user", "content": content}]}
    response = fixed.http.post(CHAT, json=body)
    assert response.status_code == 400
    assert error_of(response)["param"] == param


def test_tool_messages_are_refused_by_name(fixed: Fixed) -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = {"model": "m", "messages": [USER, {"role": "assistant", "tool_calls": [call]}]}
    response = fixed.http.post(CHAT, json=body)
    assert response.status_code == 400
    assert error_of(response)["param"] == "messages[1].tool_calls"


def test_a_body_that_is_not_json_is_a_400(fixed: Fixed) -> None:
    response = fixed.http.post(CHAT, content=b"{nope", headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and error["param"] is None
    assert error["message"].startswith("We could not parse the JSON body of your request")


def test_a_field_name_that_is_no_text_is_a_400(fixed: Fixed) -> None:
    # A lone UTF-16 surrogate escaped in JSON parses, but cannot be a field name or echoed.
    body = b'{"\\ud800": 1, "model": "m", "messages": []}'
    response = fixed.http.post(CHAT, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == "\\ud800"
    assert error["message"] == "Unrecognized request argument supplied: \\ud800"


def test_upstream_errors_in_openai_s_shape(fixed: Fixed) -> None:
    picky = fixed.http.post(CHAT, json={"model": "picky", "messages": [USER]})
    assert picky.status_code == 400
    assert error_of(picky)["param"] == "messages[1].role"

    busy = fixed.http.post(CHAT, json={"model": "busy", "messages": [USER]})
    assert busy.status_code == 429
    assert busy.headers["retry-after"] == "2"
    assert error_of(busy) == {
        "message": "the queue is full",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }

    locked = fixed.http.post(COMPLETIONS, json={"model": "locked", "prompt": "x"})
    assert locked.status_code == 401
    assert locked.headers["www-authenticate"] == "Bearer"
    assert error_of(locked)["type"] == "authentication_error"

    nobody = fixed.http.post(EMBEDDINGS, json={"model": "nobody", "input": "x"})
    assert nobody.status_code == 404
    assert error_of(nobody)["code"] == "model_not_found"

    broken = fixed.http.post(CHAT, json={"model": "broken", "messages": [USER]})
    assert broken.status_code == 500
    assert error_of(broken) == {
        "message": "internal error (request id r1)",
        "type": "server_error",
        "param": None,
        "code": None,
    }


def test_the_openapi_document_describes_the_five_routes(fixed: Fixed) -> None:
    document = fixed.http.get("/openapi.json").json()
    OpenAPIV31SpecValidator(document).validate()
    paths = document["paths"]
    chat = paths[CHAT]["post"]
    assert chat["x-codec"] == "openai"
    assert chat["x-grpc-methods"] == [
        "/protoserve.openai.v1.OpenAIService/CreateChatCompletion",
        "/protoserve.openai.v1.OpenAIService/StreamChatCompletion",
    ]
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    schema = chat["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/openai.ChatCompletionRequest"}
    assert set(paths["/openai/v1/models/{id}"]) == {"get"}
    for path in ("/openai/v1/models", COMPLETIONS, EMBEDDINGS):
        operation = next(iter(paths[path].values()))
        assert operation["responses"]["default"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/openai.Error"
        }


# The real server -------------------------------------------------------------------------
# protoserve's own OpenAIService (server/openai/) with bytelm and the test models, behind
# the shared gateway (tests/gateway/conftest.py's ``stack``).


def test_the_openapi_examples_work_as_they_are(stack: Any) -> None:
    # The /docs page starts each request body from its operation's example.
    with httpx.Client(base_url=stack.url, timeout=60) as http:
        paths = http.get("/openapi.json").json()["paths"]
        for path in (CHAT, COMPLETIONS, EMBEDDINGS):
            example = paths[path]["post"]["requestBody"]["content"]["application/json"]["example"]
            answer = http.post(path, json=example)
            assert answer.status_code == 200, (path, answer.text)
            if example.get("stream"):
                assert answer.text.endswith("data: [DONE]\n\n")


def test_bytelm_answers_in_openai_s_json(stack: Any) -> None:
    with httpx.Client(base_url=stack.url, timeout=60) as http:
        body = {"model": "bytelm", "messages": [USER], "max_tokens": 4, "seed": 1}
        chat = http.post(CHAT, json=body)
        assert chat.status_code == 200, chat.text
        answer = chat.json()
        assert answer["id"].startswith("chatcmpl-") and answer["object"] == "chat.completion"
        assert isinstance(answer["created"], int)
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
        assert answer["choices"][0]["logprobs"] is None
        body = {"model": "bytelm", "prompt": "ab", "max_tokens": 3, "logprobs": 1, "seed": 1}
        completion = http.post(COMPLETIONS, json=body).json()
        logprobs = completion["choices"][0]["logprobs"]
        assert len(logprobs["tokens"]) == completion["usage"]["completion_tokens"]
        assert len(logprobs["top_logprobs"]) == len(logprobs["token_logprobs"])
        missing = http.post(CHAT, json={"model": "gpt-9", "messages": [USER]})
        assert missing.status_code == 404
        assert error_of(missing)["code"] == "model_not_found"
        too_many = {"model": "bytelm", "messages": [USER], "logprobs": True, "top_logprobs": 21}
        refused = http.post(CHAT, json=too_many)
        assert refused.status_code == 400
        assert error_of(refused)["param"] == "top_logprobs"  # the server named it


def test_bytelm_streams_chat_as_openai_does(stack: Any) -> None:
    body = {
        "model": "bytelm",
        "messages": [USER],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.Client(base_url=stack.url, timeout=60) as http:
        response = http.post(CHAT, json=body, headers={"Accept": "application/json"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    frames = response.content.split(b"\n\n")
    assert frames[-2:] == [b"data: [DONE]", b""]
    chunks = [json.loads(frame.removeprefix(b"data: ")) for frame in frames[:-2]]
    assert all(frame.startswith(b"data: {") for frame in frames[:-2])
    *generated, usage = chunks
    assert [c["usage"] for c in generated] == [None] * len(generated)
    assert generated[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in generated][-1] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert len({c["id"] for c in chunks}) == 1


def test_leaving_a_stream_cancels_the_generation_on_the_server(stack: Any) -> None:
    from tests._observe import SlowCancelled

    cancelled = SlowCancelled(stack.server)
    body = {"model": "slow", "prompt": "x", "max_tokens": 1000, "stream": True}
    with (
        httpx.Client(base_url=stack.url, timeout=30) as http,
        http.stream("POST", COMPLETIONS, json=body) as response,
    ):
        lines = response.iter_lines()  # held: a dropped generator would close it first
        assert next(lines).startswith('data: {"id":"cmpl-')
    cancelled.wait()
