"""The official ``openai`` package against real ``protoserve serve`` and ``protoserve gateway``
processes at ``/openai/v1``: what an application written for OpenAI sees (issue #17).

One server (bytelm and the test models, bearer tokens required, ``--batch-invariant`` so
that a seeded text is the same bit for bit however many generations decode beside it) and
one gateway serve the whole module, through both clients the package has, ``OpenAI`` and
``AsyncOpenAI``. What the server did is read from its ``/metrics``, never from a clock.
tests/e2e/test_openai_limits.py has the server with tiny limits (429, Retry-After).
"""

from __future__ import annotations

import asyncio
import base64
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests._observe import wait_until
from tests.e2e.conftest import ROOT, ServerProcess, start_process, start_server

pytestmark = pytest.mark.e2e

TOKEN = "openai-test-token"
TEST_MODELS = "tests.server.models_for_tests"
#: What the ``scripted`` test model says, whatever it is asked.
SCRIPT = "héllo wörld. STOP here. 🙂 end"
PROMPTS = ["def fibonacci(n):\n", "import os\n", "class Queue:\n", "for key in items:\n"]


@dataclass
class Stack:
    """A server and the gateway in front of it, and where to reach each."""

    server: ServerProcess
    gateway: ServerProcess
    metrics_url: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}/openai/v1"

    def client(self, **options: Any) -> OpenAI:
        """The SDK as an application makes it; no retries unless asked, so that an error
        arrives as the server sent it."""
        return OpenAI(**{"base_url": self.base_url, "api_key": TOKEN, "max_retries": 0, **options})

    def async_client(self, **options: Any) -> AsyncOpenAI:
        return AsyncOpenAI(
            **{"base_url": self.base_url, "api_key": TOKEN, "max_retries": 0, **options}
        )

    def sample(self, name: str, **labels: str) -> float:
        """One sample of the server's ``/metrics`` (0 before the series has one)."""
        text = httpx.get(self.metrics_url, timeout=10).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0

    def in_flight(self, model: str) -> float:
        return self.sample("protoserve_streams_in_flight", model=model)

    def cancelled(self, model: str) -> float:
        return self.sample("protoserve_cancellations_total", model=model)


def start_stack(tmp_path: Path, *flags: str) -> Stack:
    """``protoserve serve FLAGS`` (test models importable, metrics on a port it picks) and
    ``protoserve gateway`` in front of it."""
    env = {"PYTHONPATH": str(ROOT)}
    server = start_server(tmp_path, "--metrics-port", "0", *flags, env=env)
    found = re.search(r"serving metrics on (http://\S+/metrics)", server.output())
    assert found, server.output()
    try:
        gateway = start_process(tmp_path, "gateway", "--upstream", server.target)
    except BaseException:
        server.stop()
        raise
    return Stack(server, gateway, found.group(1))


def stop_stack(stack: Stack) -> None:
    stack.gateway.stop()
    stack.server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("openai")
    (tokens := tmp / "tokens").write_text(f"{TOKEN}\n")
    models = ("bytelm", *(f"{TEST_MODELS}:{c}" for c in ("Scripted", "Slow", "Exploding")))
    flags = [arg for model in models for arg in ("--model", model)]
    started = start_stack(tmp, *flags, "--auth-token-file", str(tokens), "--batch-invariant")
    yield started
    stop_stack(started)


@pytest.fixture
def client(stack: Stack) -> Iterator[OpenAI]:
    with stack.client() as made:
        yield made


# Models ------------------------------------------------------------------------------------------


def test_models_list_and_retrieve(client: OpenAI) -> None:
    listed = client.models.list()
    ids = [model.id for model in listed]
    assert {"bytelm", "scripted", "slow", "exploding"} <= set(ids)
    assert all(model.object == "model" and isinstance(model.created, int) for model in listed)
    model = client.models.retrieve("bytelm")
    assert (model.id, model.object) == ("bytelm", "model")
    assert model.owned_by
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nosuch")
    assert info.value.status_code == 404
    assert "nosuch" in info.value.message


# Chat --------------------------------------------------------------------------------------------

CHAT = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "A function that adds two numbers."},
]


def test_chat_unary_and_streamed_say_the_same(client: OpenAI) -> None:
    args: dict[str, Any] = {"model": "bytelm", "messages": CHAT, "max_tokens": 24, "seed": 3}
    completion = client.chat.completions.create(**args, temperature=0.8)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert isinstance(completion.created, int) and completion.created > 0
    assert completion.model == "bytelm"
    assert re.fullmatch(r"fp_[0-9a-f]{10}", completion.system_fingerprint or "")
    [choice] = completion.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None
    assert 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if choice.finish_reason == "length":
        assert usage.completion_tokens == 24

    with client.chat.completions.create(**args, temperature=0.8, stream=True) as stream:
        chunks = list(stream)
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert {c.created for c in chunks} == {chunks[0].created}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks)  # not asked for
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == choice.finish_reason and not any(finishes[:-1])
    assert chunks[-1].system_fingerprint == completion.system_fingerprint


def test_chat_stop_as_a_string_and_a_list(client: OpenAI) -> None:
    stopped = client.chat.completions.create(
        model="scripted", messages=CHAT, stop="STOP", max_tokens=100
    )
    assert stopped.choices[0].message.content == "héllo wörld. "
    assert stopped.choices[0].finish_reason == "stop"
    with client.chat.completions.create(
        model="scripted", messages=CHAT, stop=["wör", "STOP"], stream=True
    ) as stream:
        chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "héllo "
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The model's end of text is a stop as well; max_tokens ends it by length.
    whole = client.chat.completions.create(model="scripted", messages=CHAT)
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (SCRIPT, "stop")
    cut = client.chat.completions.create(model="scripted", messages=CHAT, max_completion_tokens=5)
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ("héll", "length")


def test_chat_n_2_unary_and_streamed(client: OpenAI) -> None:
    args: dict[str, Any] = {"model": "bytelm", "messages": CHAT, "max_tokens": 12, "n": 2}
    completion = client.chat.completions.create(**args, seed=5, temperature=1.0)
    assert [c.index for c in completion.choices] == [0, 1]
    assert all(c.message.role == "assistant" for c in completion.choices)
    assert completion.usage is not None
    assert 0 < completion.usage.completion_tokens <= 2 * 12  # both choices' tokens
    with client.chat.completions.create(**args, seed=5, temperature=1.0, stream=True) as stream:
        chunks = list(stream)
    seen: dict[int, list[Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            seen.setdefault(choice.index, []).append(choice)
    assert sorted(seen) == [0, 1]
    for index, choices in seen.items():
        assert choices[0].delta.role == "assistant", index  # each choice's first chunk
        assert choices[-1].finish_reason in ("stop", "length")
        assert not any(c.finish_reason for c in choices[:-1])
        text = "".join(c.delta.content or "" for c in choices)
        assert text == completion.choices[index].message.content


def test_chat_seed_reproduces_the_text(client: OpenAI) -> None:
    def text(seed: int) -> str:
        completion = client.chat.completions.create(
            model="bytelm", messages=CHAT, max_tokens=32, temperature=1.0, seed=seed
        )
        return completion.choices[0].message.content or ""

    first = text(11)
    assert text(11) == first
    assert text(12) != first  # the seed decides what is sampled


def test_chat_include_usage(client: OpenAI) -> None:
    with client.chat.completions.create(
        model="scripted",
        messages=CHAT,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)
    *steps, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.completion_tokens, last.usage.total_tokens) == (
        5,
        last.usage.prompt_tokens + 5,
    )
    assert all(c.usage is None for c in steps)
    assert "".join(c.choices[0].delta.content or "" for c in steps if c.choices) == "héll"


def test_chat_logprobs(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model="bytelm",
        messages=CHAT,
        max_tokens=10,
        temperature=0.0,
        logprobs=True,
        top_logprobs=3,
    )
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    tokens = choice.logprobs.content
    assert completion.usage is not None
    assert len(tokens) == completion.usage.completion_tokens
    assert b"".join(bytes(t.bytes or []) for t in tokens).decode() == choice.message.content
    for token in tokens:
        assert token.logprob <= 0.0
        assert len(token.top_logprobs) == 3
        ranked = [alt.logprob for alt in token.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        # Greedy: the token taken is the most likely one.
        assert token.top_logprobs[0].bytes == token.bytes
        assert token.top_logprobs[0].logprob == token.logprob
    # Without asking, none.
    plain = client.chat.completions.create(model="bytelm", messages=CHAT, max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_streamed_are_the_unary_ones(client: OpenAI) -> None:
    args: dict[str, Any] = {"model": "bytelm", "messages": CHAT, "max_tokens": 8}
    args.update(temperature=0.0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**args)
    assert whole.choices[0].logprobs is not None
    with client.chat.completions.create(**args, stream=True) as stream:
        chunks = [c for c in stream if c.choices]
    streamed = [
        t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content or []
    ]
    assert streamed == whole.choices[0].logprobs.content


def test_logprobs_of_a_model_without_them_are_refused(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="scripted", messages=CHAT, logprobs=True)
    assert info.value.param == "logprobs"


# Completions -------------------------------------------------------------------------------------


def test_completion_unary_and_streamed(client: OpenAI) -> None:
    args: dict[str, Any] = {"model": "bytelm", "prompt": "def add(a, b):\n", "max_tokens": 20}
    completion = client.completions.create(**args, seed=2, temperature=0.7, user="someone")
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    [choice] = completion.choices
    assert choice.index == 0 and choice.finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.prompt_tokens == len(args["prompt"])
    with client.completions.create(**args, seed=2, temperature=0.7, stream=True) as stream:
        chunks = list(stream)
    assert {c.object for c in chunks} == {"text_completion"}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == choice.finish_reason and not any(finishes[:-1])


def test_completion_stop_n_and_usage(client: OpenAI) -> None:
    completion = client.completions.create(model="scripted", prompt="x", stop="STOP", n=2)
    assert [(c.index, c.text, c.finish_reason) for c in completion.choices] == [
        (0, "héllo wörld. ", "stop"),
        (1, "héllo wörld. ", "stop"),
    ]
    with client.completions.create(
        model="scripted",
        prompt="x",
        max_tokens=3,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {0: "hé", 1: "hé"}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_completion_seed_reproduces_the_text(client: OpenAI) -> None:
    def text(seed: int) -> str:
        return (
            client.completions.create(
                model="bytelm", prompt="import ", max_tokens=32, temperature=1.0, seed=seed
            )
            .choices[0]
            .text
        )

    assert text(21) == text(21)
    assert text(21) != text(22)


def test_completion_logprobs(client: OpenAI) -> None:
    completion = client.completions.create(
        model="bytelm", prompt="import ", max_tokens=8, temperature=0.0, logprobs=2
    )
    choice = completion.choices[0]
    logprobs = choice.logprobs
    assert logprobs is not None
    assert logprobs.tokens is not None and logprobs.token_logprobs is not None
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 8
    assert all(lp <= 0.0 for lp in logprobs.token_logprobs)
    assert logprobs.top_logprobs is not None and len(logprobs.top_logprobs) == 8
    for token, logprob, alternatives in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert 1 <= len(alternatives) <= 2
        assert alternatives[token] == logprob  # greedy: the token is the most likely
        assert logprob == max(alternatives.values())
    offsets = logprobs.text_offset or []
    assert len(offsets) == 8 and offsets == sorted(offsets)


# Embeddings --------------------------------------------------------------------------------------

TEXTS = ["def add(a, b):", "hello wörld", "x"]


def native_vectors(stack: Stack, texts: list[str] = TEXTS) -> list[bytes]:
    """The same texts' vectors from the v1 API's Embed over gRPC, as float32 bytes.

    Compared bit for bit with a request of the same texts only: a text embedded in a
    pass with others is equal to its lone vector to float rounding, and which way the
    last bit goes depends on the CPU's kernels (AVX-512 Xeons differ from AMD's)."""
    with grpc.insecure_channel(stack.server.target) as channel:
        reply = pb_grpc.InferenceServiceStub(channel).Embed(
            pb.EmbedRequest(model="bytelm", inputs=texts),
            metadata=[("authorization", f"Bearer {TOKEN}")],
            timeout=30,
        )
    return [struct.pack(f"<{len(e.values)}f", *e.values) for e in reply.embeddings]


def float32(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def test_embeddings_float_and_base64_equal_the_native_embed(stack: Stack, client: OpenAI) -> None:
    native = native_vectors(stack)
    as_floats = client.embeddings.create(model="bytelm", input=TEXTS, encoding_format="float")
    assert as_floats.object == "list" and as_floats.model == "bytelm"
    assert [e.index for e in as_floats.data] == [0, 1, 2]
    assert all(e.object == "embedding" for e in as_floats.data)
    assert [float32(e.embedding) for e in as_floats.data] == native
    assert as_floats.usage.prompt_tokens == as_floats.usage.total_tokens > 0

    # Asked for base64, the SDK hands over the string: little-endian float32.
    as_base64 = client.embeddings.create(model="bytelm", input=TEXTS, encoding_format="base64")
    encoded: list[Any] = [e.embedding for e in as_base64.data]
    assert all(isinstance(e, str) for e in encoded)
    assert [base64.b64decode(e) for e in encoded] == native

    # Asked for nothing, it asks for base64 and decodes it itself.
    default = client.embeddings.create(model="bytelm", input=TEXTS)
    assert [float32(list(e.embedding)) for e in default.data] == native

    one = client.embeddings.create(model="bytelm", input=TEXTS[0], encoding_format="float")
    assert [float32(e.embedding) for e in one.data] == native_vectors(stack, TEXTS[:1])


# Errors ------------------------------------------------------------------------------------------


def test_bad_parameters_are_bad_requests_naming_the_parameter(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="bytelm", messages=CHAT, temperature=-1)
    assert info.value.status_code == 400
    assert info.value.param == "temperature"
    assert info.value.type == "invalid_request_error"

    bad_role: Any = [{"role": "robot", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="bytelm", messages=bad_role)
    assert info.value.param == "messages[0].role"

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="bytelm", messages=CHAT, max_tokens=0)
    assert info.value.param == "max_tokens"


def test_what_the_model_cannot_honour_is_refused_never_ignored(client: OpenAI) -> None:
    tool: Any = {"type": "function", "function": {"name": "now", "parameters": {}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="bytelm", messages=CHAT, tools=[tool])
    assert info.value.param == "tools"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="bytelm", messages=CHAT, response_format={"type": "json_object"}
        )
    assert info.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="bytelm", input="x", dimensions=8)
    assert info.value.param == "dimensions"
    # The streaming route refuses before it starts, as an HTTP status.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="bytelm", messages=CHAT, tools=[tool], stream=True)
    assert info.value.param == "tools"


def test_a_wrong_key_is_an_authentication_error(stack: Stack) -> None:
    with (
        stack.client(api_key="not-the-token") as wrong,
        pytest.raises(openai.AuthenticationError) as info,
    ):
        wrong.chat.completions.create(model="bytelm", messages=CHAT, max_tokens=2)
    assert info.value.status_code == 401
    with stack.client(api_key="not-the-token") as wrong, pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_an_unknown_model_is_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nosuch", messages=CHAT)
    assert info.value.status_code == 404 and "nosuch" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nosuch", prompt="x", stream=True)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nosuch", input="x")


def test_a_failing_model_is_an_internal_server_error(client: OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="exploding", messages=CHAT)
    assert info.value.status_code == 500
    assert "secret internal detail" not in str(info.value.body)


def test_an_error_after_the_stream_started_raises_api_error(client: OpenAI) -> None:
    received = []
    with pytest.raises(openai.APIError) as info:
        with client.chat.completions.create(
            model="exploding", messages=CHAT, stream=True
        ) as stream:
            for chunk in stream:
                received.append(chunk)
    assert not isinstance(info.value, openai.APIStatusError)  # the response was a 200
    assert received[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in received if c.choices) == "A"
    assert "secret internal detail" not in str(info.value.body)


# Leaving a stream early --------------------------------------------------------------------------


def test_breaking_out_of_a_stream_stops_the_generation(stack: Stack, client: OpenAI) -> None:
    before = stack.cancelled("slow")
    with client.chat.completions.create(
        model="slow", messages=CHAT, max_tokens=1000, stream=True
    ) as stream:
        for count, _ in enumerate(stream, 1):
            if count == 3:
                break
    # Leaving the block closed the response: the server counts the generation cancelled.
    wait_until(lambda: stack.cancelled("slow") == before + 1, "the generation counted cancelled")
    wait_until(lambda: stack.in_flight("slow") == 0, "no generation of slow in flight")


def test_async_client_breaking_out_stops_the_generation(stack: Stack) -> None:
    before = stack.cancelled("slow")

    async def run() -> None:
        async with stack.async_client() as client:
            stream = await client.completions.create(
                model="slow", prompt="x", max_tokens=1000, stream=True
            )
            async with stream:
                async for _ in stream:
                    break

    asyncio.run(run())
    wait_until(lambda: stack.cancelled("slow") == before + 1, "the generation counted cancelled")
    wait_until(lambda: stack.in_flight("slow") == 0, "no generation of slow in flight")


# The async client --------------------------------------------------------------------------------


def test_async_client(stack: Stack, client: OpenAI) -> None:
    async def run() -> tuple[Any, ...]:
        async with stack.async_client() as aclient:
            models = [m.id async for m in aclient.models.list()]
            chat = await aclient.chat.completions.create(
                model="scripted", messages=CHAT, stop="STOP"
            )
            stream = await aclient.chat.completions.create(
                model="scripted", messages=CHAT, max_tokens=5, stream=True
            )
            streamed = "".join(
                [c.choices[0].delta.content or "" async for c in stream if c.choices]
            )
            embedded = await aclient.embeddings.create(model="bytelm", input=TEXTS)
            with pytest.raises(openai.NotFoundError):
                await aclient.completions.create(model="nosuch", prompt="x")
            with pytest.raises(openai.APIError) as info:
                stream = await aclient.completions.create(
                    model="exploding", prompt="x", stream=True
                )
                _ = [c async for c in stream]
            assert not isinstance(info.value, openai.APIStatusError)
            return models, chat, streamed, embedded

    models, chat, streamed, embedded = asyncio.run(run())
    assert "bytelm" in models
    assert chat.choices[0].message.content == "héllo wörld. "
    assert streamed == "héll"
    assert [float32(list(e.embedding)) for e in embedded.data] == native_vectors(stack)


# The same seed alone and under load --------------------------------------------------------------


def test_a_seeded_completion_is_the_same_alone_and_under_load(stack: Stack) -> None:
    probe: dict[str, Any] = {
        "model": "bytelm",
        "prompt": "def main():\n",
        "max_tokens": 32,
        "temperature": 0.9,
        "seed": 1234,
    }

    async def run() -> tuple[str, str, float, list[bool]]:
        async with stack.async_client() as client:
            alone = (await client.completions.create(**probe)).choices[0].text
            streams = [
                await client.completions.create(
                    model="bytelm",
                    prompt=PROMPTS[i % len(PROMPTS)] + f"# {i}\n",
                    max_tokens=96,
                    temperature=0.8,
                    seed=100 + i,
                    stream=True,
                )
                for i in range(8)
            ]
            # Each of the 8 has begun (its first chunk came): they decode while the probe runs,
            # read all along so that none sits out a step for want of a reader.
            firsts = [await s.__anext__() for s in streams]
            assert all(f.choices for f in firsts)

            async def drain(stream: Any) -> None:
                async for _ in stream:
                    pass

            readers = [asyncio.create_task(drain(s)) for s in streams]
            busy = await asyncio.to_thread(stack.in_flight, "bytelm")
            loaded = (await client.completions.create(**probe)).choices[0].text
            # Still running when the probe ended (96 tokens against its 32): it had company.
            running = [not r.done() for r in readers]
            await asyncio.gather(*readers)
            return alone, loaded, busy, running

    alone, loaded, busy, running = asyncio.run(run())
    assert busy >= 8
    assert running.count(True) >= 6, running
    assert alone and loaded == alone
