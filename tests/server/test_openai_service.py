"""protoserve.openai.v1.OpenAIService over a real port: what a gRPC client of OpenAI's API sees."""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status

from protoserve.inference.v1 import inference_service_pb2 as v1
from protoserve.inference.v1 import inference_service_pb2_grpc as v1_grpc
from protoserve.openai.v1 import openai_service_pb2 as pb
from protoserve.openai.v1 import openai_service_pb2_grpc as pb_grpc
from protoserve.server import GenerationParams, InferenceServer, Model, Token
from protoserve.server.openai._logprobs import TextOffsets, completion_logprobs, token_text
from tests._observe import Generations, SlowCancelled, counted, wait_until
from tests._threads import start_grpc_server, stop_grpc_server

SERVICE = "protoserve.openai.v1.OpenAIService"
STOP, LENGTH = pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH


class Splitting(Model):
    """Says "y" every 20 ms and never ends, unless its seed is odd: then it fails at its
    fourth token. Choices 0 and 1 of one request (seeds s and s + 1) part ways."""

    name = "splitting"

    def warmup(self) -> None:
        pass  # an odd seed would fail, and the failure belongs to a request

    def generate(self, text: str, params: GenerationParams) -> Iterator[Token]:
        for i in itertools.count():
            if params.seed % 2 and i == 3:
                raise RuntimeError("this choice failed")
            time.sleep(0.02)
            yield Token(121, b"y")


MODELS = (
    "bytelm",
    "tests.server.models_for_tests:Scripted",
    "tests.server.models_for_tests:Slow",
    "tests.server.models_for_tests:Doubler",
    "tests.server.models_for_tests:FailsToLoad",
    "tests.server.test_openai_service:Splitting",
)


@dataclass
class Served:
    server: InferenceServer
    channel: grpc.Channel
    stub: pb_grpc.OpenAIServiceStub


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    # Batch-invariant: a choice's tokens are its own whatever runs beside it, so a seed
    # gives the same text in a request of one choice or of two, streamed or not.
    thread, server = start_grpc_server(MODELS, max_queue=16, max_active=4, batch_invariant=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield Served(server, channel, pb_grpc.OpenAIServiceStub(channel))
    channel.close()
    stop_grpc_server(thread, server)


@pytest.fixture
def stub(served: Served) -> pb_grpc.OpenAIServiceStub:
    return served.stub


def error(call: Any, request: Any, timeout: float = 60) -> grpc.RpcError:
    """The error ``call(request)`` raised (a stream is read to its end)."""
    with pytest.raises(grpc.RpcError) as info:
        answer = call(request, timeout=timeout)
        if not hasattr(answer, "ListFields"):
            list(answer)
    return info.value


def violations(err: grpc.RpcError) -> dict[str, str]:
    """The BadRequest field violations of an error's google.rpc status."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status details on the error"
    found = {}
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            found.update({v.field: v.description for v in bad.field_violations})
    return found


def user(text: str) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role="user", content=text)]


def chat(**fields: Any) -> pb.ChatCompletionRequest:
    fields.setdefault("model", "bytelm")
    fields.setdefault("messages", user("Write a function that sorts a list."))
    return pb.ChatCompletionRequest(**fields)


def completion(**fields: Any) -> pb.CompletionRequest:
    fields.setdefault("model", "bytelm")
    fields.setdefault("prompt", ["def "])
    return pb.CompletionRequest(**fields)


def by_choice(chunks: Sequence[Any]) -> dict[int, list[Any]]:
    """Each choice's parts of a stream, in the order they came."""
    found: dict[int, list[Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            found.setdefault(choice.index, []).append(choice)
    return found


# Models.
def test_list_models_lists_the_ready_text_and_embedding_models(stub) -> None:
    before = int(time.time())
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert listed.object == "list"
    models = {m.id: m for m in listed.data}
    # Not doubler (tensors only), not broken (failed to load): nothing a call could use.
    assert set(models) == {"bytelm", "scripted", "slow", "splitting"}
    bytelm = models["bytelm"]
    assert (bytelm.object, bytelm.owned_by) == ("model", "protoserve")
    assert 0 < bytelm.created <= before
    assert stub.RetrieveModel(pb.RetrieveModelRequest(id="bytelm"), timeout=10) == bytelm


def test_openai_list_models_is_counted_apart_from_v1s(served: Served) -> None:
    """Both services have a ListModels; their metrics label tells them apart."""
    from protoserve.inference.v1 import inference_service_pb2 as v1
    from protoserve.inference.v1 import inference_service_pb2_grpc as v1_grpc

    def count(method: str) -> float:
        return counted(served.server, "protoserve_requests_total", method=method, code="OK")

    openai_before, v1_before = count("openai.ListModels"), count("ListModels")
    served.stub.ListModels(pb.ListModelsRequest(), timeout=10)
    served.stub.ListModels(pb.ListModelsRequest(), timeout=10)
    v1_grpc.InferenceServiceStub(served.channel).ListModels(v1.ListModelsRequest(), timeout=10)
    assert count("openai.ListModels") - openai_before == 2
    assert count("ListModels") - v1_before == 1


def test_retrieve_model_of_an_unknown_or_tensor_model_is_not_found(stub) -> None:
    for name in ("gpt-9", "doubler"):
        err = error(stub.RetrieveModel, pb.RetrieveModelRequest(id=name))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert err.details() == f"The model `{name}` does not exist"
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
        info = error_details_pb2.ResourceInfo()
        assert status is not None and status.details[0].Unpack(info)
        assert (info.resource_type, info.resource_name) == ("model", name)
    # A model of the API that failed to load exists, but cannot serve.
    err = error(stub.RetrieveModel, pb.RetrieveModelRequest(id="broken"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "weights missing" in err.details()


# Chat completions.
def test_chat_completion_with_two_choices(served: Served) -> None:
    rid = "openai-chat-request-1"
    answer = served.stub.CreateChatCompletion(
        chat(n=2, seed=11, max_tokens=16), timeout=60, metadata=(("x-request-id", rid),)
    )
    assert answer.id == f"chatcmpl-{rid}"
    assert answer.object == "chat.completion"
    assert answer.model == "bytelm"
    assert abs(answer.created - time.time()) < 600
    assert re.fullmatch(r"fp_[0-9a-f]{10}", answer.system_fingerprint)
    assert [c.index for c in answer.choices] == [0, 1]
    for choice in answer.choices:
        assert choice.message.role == "assistant"
        assert choice.finish_reason in (STOP, LENGTH)
        assert not choice.HasField("logprobs")
    # The prompt is counted once; the generated tokens of both choices.
    one = served.stub.CreateChatCompletion(chat(seed=11, max_tokens=16), timeout=60)
    assert answer.usage.prompt_tokens == one.usage.prompt_tokens > 0
    assert answer.usage.completion_tokens <= 2 * 16
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert one.system_fingerprint == answer.system_fingerprint
    assert (
        counted(
            served.server,
            "protoserve_requests_total",
            method="openai.CreateChatCompletion",
            code="OK",
        )
        >= 2
    )


def test_a_seed_gives_the_same_choices_and_choice_i_samples_with_seed_plus_i(stub) -> None:
    request = chat(n=2, seed=41, max_tokens=24, temperature=1.0)
    first = stub.CreateChatCompletion(request, timeout=60)
    again = stub.CreateChatCompletion(request, timeout=60)
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]
    for i, choice in enumerate(first.choices):
        alone = stub.CreateChatCompletion(chat(seed=41 + i, max_tokens=24), timeout=60)
        assert alone.choices[0].message.content == choice.message.content
    # Seeds wrap into the runtime's 0 to 2**63 - 1: seed -1's second choice is seed 0's first.
    wrapped = stub.CreateChatCompletion(chat(n=2, seed=-1, max_tokens=24), timeout=60)
    zero = stub.CreateChatCompletion(chat(seed=0, max_tokens=24), timeout=60)
    assert wrapped.choices[1].message.content == zero.choices[0].message.content


def test_streamed_chat_sends_each_choice_role_first_and_finish_last(stub) -> None:
    request = chat(n=2, seed=5, max_tokens=24)
    chunks = list(stub.StreamChatCompletion(request, timeout=60))
    assert len({(c.id, c.created, c.system_fingerprint) for c in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-")
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert all(len(c.choices) == 1 and not c.HasField("usage") for c in chunks)
    parts = by_choice(chunks)
    assert set(parts) == {0, 1}
    unary = stub.CreateChatCompletion(request, timeout=60)
    for index, choice_parts in parts.items():
        assert [p.delta.role for p in choice_parts] == ["assistant"] + [""] * (
            len(choice_parts) - 1
        )
        assert all(p.finish_reason == pb.FINISH_REASON_UNSPECIFIED for p in choice_parts[:-1])
        assert choice_parts[-1].finish_reason == unary.choices[index].finish_reason
        assert (
            "".join(p.delta.content for p in choice_parts) == unary.choices[index].message.content
        )


def test_include_usage_adds_a_last_chunk_with_the_whole_usage(stub) -> None:
    request = chat(n=2, seed=9, max_tokens=12, stream_options=pb.StreamOptions(include_usage=True))
    *chunks, last = list(stub.StreamChatCompletion(request, timeout=60))
    assert not last.choices and last.HasField("usage")
    assert all(not c.HasField("usage") for c in chunks)
    unary = stub.CreateChatCompletion(chat(n=2, seed=9, max_tokens=12), timeout=60)
    assert last.usage == unary.usage
    without = list(stub.StreamChatCompletion(chat(n=2, seed=9, max_tokens=12), timeout=60))
    assert all(c.choices and not c.HasField("usage") for c in without)


def test_chat_logprobs_hold_each_token_and_its_alternatives(stub) -> None:
    answer = stub.CreateChatCompletion(
        chat(seed=3, max_tokens=12, logprobs=True, top_logprobs=3), timeout=60
    )
    (choice,) = answer.choices
    content = choice.logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.bytes) == 1  # a byte-level model
        assert entry.token == token_text(entry.bytes)
        alternatives = [a.logprob for a in entry.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        assert entry.logprob <= alternatives[0]
    # The text is the tokens' bytes, up to a stop sequence the last tokens made.
    assert b"".join(e.bytes for e in content).decode().startswith(choice.message.content)
    streamed = list(
        stub.StreamChatCompletion(chat(seed=3, max_tokens=12, logprobs=True), timeout=60)
    )
    tokens = [e for c in streamed for ch in c.choices for e in ch.logprobs.content]
    assert [(t.token, t.logprob) for t in tokens] == [(t.token, t.logprob) for t in content]
    assert all(not t.top_logprobs for t in tokens)


def test_stop_and_max_tokens_and_end_of_text_finish_reasons(stub) -> None:
    # scripted says "héllo wörld. STOP here. 🙂 end", a byte a step.
    stopped = stub.CreateCompletion(completion(model="scripted", stop=["STOP"]), timeout=60)
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == ("héllo wörld. ", STOP)
    cut = stub.CreateCompletion(completion(model="scripted", max_tokens=3), timeout=60)
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == ("hé", LENGTH)
    whole = stub.CreateCompletion(completion(model="scripted", max_tokens=100), timeout=60)
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (
        "héllo wörld. STOP here. 🙂 end",
        STOP,
    )
    streamed = list(
        stub.StreamChatCompletion(chat(model="scripted", stop=["STOP", "wör"]), timeout=60)
    )
    parts = by_choice(streamed)[0]
    assert "".join(p.delta.content for p in parts) == "héllo "
    assert parts[-1].finish_reason == STOP


# Completions.
def test_completions_give_n_choices_per_prompt_indexed_prompt_times_n(stub) -> None:
    prompts = ["def ", "import "]
    answer = stub.CreateCompletion(
        completion(prompt=prompts, n=2, seed=7, max_tokens=10), timeout=60
    )
    assert answer.id.startswith("cmpl-") and answer.object == "text_completion"
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    # Choice j of each prompt samples with seed + j, whatever the other prompts.
    for index, choice in enumerate(answer.choices):
        prompt, j = divmod(index, 2)
        alone = stub.CreateCompletion(
            completion(prompt=[prompts[prompt]], seed=7 + j, max_tokens=10), timeout=60
        )
        assert alone.choices[0].text == choice.text
    # Each prompt counted once: 4 + 7 bytes.
    assert answer.usage.prompt_tokens == 11
    streamed = list(
        stub.StreamCompletion(
            completion(
                prompt=prompts,
                n=2,
                seed=7,
                max_tokens=10,
                stream_options=pb.StreamOptions(include_usage=True),
            ),
            timeout=60,
        )
    )
    assert streamed[-1].usage == answer.usage and not streamed[-1].choices
    parts = by_choice(streamed[:-1])
    assert {i: "".join(p.text for p in ps) for i, ps in parts.items()} == {
        c.index: c.text for c in answer.choices
    }
    assert all(
        ps[-1].finish_reason == c.finish_reason
        for ps, c in zip(parts.values(), answer.choices, strict=False)
    )


def test_completion_logprobs_are_parallel_lists_with_offsets_in_the_text(stub) -> None:
    request = completion(seed=2, max_tokens=16, logprobs=2)
    (choice,) = stub.CreateCompletion(request, timeout=60).choices
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 16
    assert "".join(lp.tokens) == choice.text  # ASCII code: one character a token
    assert list(lp.text_offset) == list(range(16))
    assert all(len(t.logprobs) <= 2 and t.logprobs for t in lp.top_logprobs)
    assert all(x <= 0 for x in lp.token_logprobs)
    # Streamed, the offsets run on from chunk to chunk.
    streamed = list(stub.StreamCompletion(request, timeout=60))
    offsets = [o for m in streamed for c in m.choices for o in c.logprobs.text_offset]
    assert offsets == list(lp.text_offset)


def test_token_text_escapes_partial_characters_and_offsets_count_characters() -> None:
    # "é" is two tokens of a byte-level model; neither is a whole character alone.
    tokens = [Token(104, b"h", -0.1), Token(195, b"\xc3", -0.2), Token(169, b"\xa9", -0.3)]
    tokens.append(Token(33, b"!", -0.4))
    lp = completion_logprobs(tokens, TextOffsets())
    assert list(lp.tokens) == ["h", "\\xc3", "\\xa9", "!"]
    assert list(lp.text_offset) == [0, 1, 1, 2]  # in "hé!"
    assert token_text("🙂".encode()) == "🙂"


# Embeddings.
def test_embeddings_equal_the_native_embed(served: Served) -> None:
    texts = ["def f():", "import os"]
    for encoding in ("", "float", "base64"):
        answer = served.stub.CreateEmbedding(
            pb.EmbeddingRequest(model="bytelm", input=texts, encoding_format=encoding), timeout=60
        )
        assert answer.object == "list" and answer.model == "bytelm"
        assert [(e.object, e.index) for e in answer.data] == [("embedding", 0), ("embedding", 1)]
        native = v1_grpc.InferenceServiceStub(served.channel).Embed(
            v1.EmbedRequest(model="bytelm", inputs=texts), timeout=60
        )
        assert [list(e.embedding) for e in answer.data] == [
            list(e.values) for e in native.embeddings
        ]
        assert answer.usage.prompt_tokens == answer.usage.total_tokens == native.usage.prompt_tokens
        assert answer.usage.completion_tokens == 0


# Errors.
LONG = "x" * 9000  # past bytelm's 8192 input tokens


@pytest.mark.parametrize(
    ("method", "request_", "field"),
    [
        ("CreateChatCompletion", chat(max_tokens=5000), "max_tokens"),
        ("CreateChatCompletion", chat(max_completion_tokens=5000), "max_completion_tokens"),
        (
            "CreateChatCompletion",
            chat(max_tokens=5, max_completion_tokens=5),
            "max_completion_tokens",
        ),
        ("CreateChatCompletion", chat(temperature=50), "temperature"),
        ("CreateChatCompletion", chat(temperature=2.5), "temperature"),
        ("StreamCompletion", completion(temperature=-1), "temperature"),
        ("CreateChatCompletion", chat(top_p=2), "top_p"),
        ("CreateChatCompletion", chat(stop=[""]), "stop"),
        ("CreateChatCompletion", chat(n=0), "n"),
        ("CreateChatCompletion", chat(n=17), "n"),
        ("CreateChatCompletion", chat(messages=[]), "messages"),
        (
            "CreateChatCompletion",
            chat(messages=[*user("a"), pb.ChatMessage(role="tool")]),
            "messages[1].role",
        ),
        ("CreateChatCompletion", chat(messages=user(LONG)), "messages"),
        ("CreateChatCompletion", chat(stream=True), "stream"),
        ("CreateChatCompletion", chat(stream_options=pb.StreamOptions()), "stream_options"),
        ("CreateChatCompletion", chat(model=""), "model"),
        ("CreateChatCompletion", chat(model="doubler"), "model"),
        ("CreateChatCompletion", chat(top_logprobs=2), "top_logprobs"),
        ("CreateChatCompletion", chat(logprobs=True, top_logprobs=21), "top_logprobs"),
        ("CreateChatCompletion", chat(model="scripted", logprobs=True), "logprobs"),
        # 4 x 2048 x 21 log probabilities, over MAX_LOGPROB_ENTRIES (2**17).
        (
            "CreateChatCompletion",
            chat(n=4, max_tokens=2048, logprobs=True, top_logprobs=20),
            "top_logprobs",
        ),
        ("CreateCompletion", completion(n=16, max_tokens=2048, logprobs=5), "logprobs"),
        ("StreamChatCompletion", chat(stream=False), "stream"),
        ("StreamChatCompletion", chat(max_completion_tokens=0), "max_completion_tokens"),
        ("CreateCompletion", completion(max_tokens=0), "max_tokens"),
        ("CreateCompletion", completion(prompt=[]), "prompt"),
        ("CreateCompletion", completion(prompt=[LONG]), "prompt"),
        ("CreateCompletion", completion(prompt=["a", LONG]), "prompt[1]"),
        ("CreateCompletion", completion(prompt=["a"] * 5, n=4), "prompt"),
        ("CreateCompletion", completion(logprobs=6), "logprobs"),
        ("StreamCompletion", completion(stop=["x"] * 9), "stop"),
        ("CreateEmbedding", pb.EmbeddingRequest(model="bytelm"), "input"),
        ("CreateEmbedding", pb.EmbeddingRequest(model="bytelm", input=[""]), "input"),
        ("CreateEmbedding", pb.EmbeddingRequest(model="bytelm", input=["a", ""]), "input[1]"),
        ("CreateEmbedding", pb.EmbeddingRequest(model="bytelm", input=["a", LONG]), "input[1]"),
        (
            "CreateEmbedding",
            pb.EmbeddingRequest(model="bytelm", input=["a"], encoding_format="int8"),
            "encoding_format",
        ),
    ],
)
def test_invalid_arguments_name_openai_parameters(
    stub, method: str, request_: Any, field: str
) -> None:
    err = error(getattr(stub, method), request_)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(err), violations(err)
    assert err.details().startswith(f"{field}:") or f" {field} " in err.details(), err.details()
    assert "parameters." not in err.details() and "inputs" not in err.details()


def test_n_and_choices_in_all_are_bounded_at_16(stub) -> None:
    assert len(stub.CreateCompletion(completion(n=16, max_tokens=1), timeout=60).choices) == 16
    assert (
        len(
            stub.CreateCompletion(
                completion(prompt=["a"] * 8, n=2, max_tokens=1), timeout=60
            ).choices
        )
        == 16
    )
    err = error(stub.CreateCompletion, completion(prompt=["a"] * 17, max_tokens=1))
    assert list(violations(err)) == ["prompt"]


def test_an_unknown_model_is_not_found(stub) -> None:
    for call, request in (
        (stub.CreateChatCompletion, chat(model="gpt-9")),
        (stub.StreamCompletion, completion(model="gpt-9")),
        (stub.CreateEmbedding, pb.EmbeddingRequest(model="gpt-9", input=["a"])),
    ):
        err = error(call, request)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert err.details() == "The model `gpt-9` does not exist"


# Cancelling.
def test_leaving_a_stream_cancels_every_choice(served: Served) -> None:
    cancelled = SlowCancelled(served.server)
    stream = served.stub.StreamChatCompletion(chat(model="slow", n=2, max_tokens=1000), timeout=60)
    seen: set[int] = set()
    for chunk in stream:
        seen.update(c.index for c in chunk.choices)
        if seen == {0, 1}:
            break
    stream.cancel()
    cancelled.wait(2)  # both stopped long before their 1000 tokens
    # The call's own count comes once its frame has unwound, after the generations'.
    wait_until(
        lambda: (
            counted(
                served.server,
                "protoserve_requests_total",
                method="openai.StreamChatCompletion",
                code="CANCELLED",
            )
            >= 1
        ),
        "the call counted CANCELLED",
    )


def test_a_deadline_cancels_every_choice_of_a_unary_call(served: Served) -> None:
    cancelled = SlowCancelled(served.server)
    err = error(
        served.stub.CreateCompletion, completion(model="slow", n=2, max_tokens=1000), timeout=1.0
    )
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    cancelled.wait(2)


def test_a_choice_that_fails_ends_the_stream_and_cancels_the_others(served: Served) -> None:
    generations = Generations(served.server, "splitting")
    # Seed 0: choice 0 goes on, choice 1 (seed 1) fails at its fourth token.
    err = error(served.stub.StreamCompletion, completion(model="splitting", n=2, seed=0))
    assert err.code() == grpc.StatusCode.INTERNAL and "request id" in err.details()
    assert "this choice failed" not in err.details()
    generations.wait_cancelled(1)  # choice 0, cancelled; the failed one is not counted


def test_a_generation_the_server_ends_early_is_unavailable(served: Served) -> None:
    generations = Generations(served.server, "slow")
    stream = served.stub.StreamCompletion(completion(model="slow", max_tokens=1000), timeout=60)
    next(stream)
    served.server.runtime.get_model("slow").scheduler.request_stop()
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    wait_until(lambda: generations.in_flight() == 0, "the stopped generation left")


# The service on the server.
def test_user_is_written_to_the_access_line(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="protoserve.server.access")
    served.stub.CreateChatCompletion(
        chat(max_tokens=1, user="user-1234"),
        timeout=60,
        metadata=(("x-request-id", "openai-user-line"),),
    )

    def line() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "request_id", None) == "openai-user-line"]

    wait_until(line, "the call's access line")
    (record,) = line()
    assert (record.method, record.user) == ("openai.CreateChatCompletion", "user-1234")  # type: ignore[attr-defined]


def test_health_and_reflection_report_the_service(served: Served) -> None:
    health = health_pb2_grpc.HealthStub(served.channel)

    def status(service: str) -> int:
        return int(health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)

    # The server's readiness, as for every service (not ready here: broken failed to load).
    assert status(SERVICE) == status("") == status("protoserve.inference.v1.InferenceService")
    database = ProtoReflectionDescriptorDatabase(served.channel)
    assert SERVICE in database.get_services()
    file = database.FindFileContainingSymbol(SERVICE)
    assert file.package == "protoserve.openai.v1"
    methods = {m.name for s in file.service for m in s.method}
    assert methods == {m.name for m in pb.DESCRIPTOR.services_by_name["OpenAIService"].methods}
    # With the proto's comments, the spec of every method.
    comments = {tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location}
    assert comments[(6, 0)].startswith(" OpenAIService serves OpenAI's API")
