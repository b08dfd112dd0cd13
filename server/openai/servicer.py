"""``protoserve.openai.v1.OpenAIService``: OpenAI's API over the same runtime.

Thin like the other servicers (docs/architecture.md, rule 7), and in the same call
frame (:mod:`protoserve.server.calls`): request ids, errors as statuses with
``google.rpc`` details, metrics labelled ``openai.`` and the RPC's name
(``openai.ListModels``: v1 has a ListModels too), access lines. It converts OpenAI's
messages, runs each choice as a generation of the runtime
(:mod:`._choices`), and fills in OpenAI's constants: ``object``, ``id``
("chatcmpl-" or "cmpl-" and the call's request id), ``created`` (once per request)
and ``system_fingerprint`` (:func:`fingerprint`). Parameters, and the runtime's
field names in errors, are mapped in :mod:`._requests`.

What the proto leaves open, decided here:

- ListModels lists the models that serve text generation or embedding and are
  READY: what a call can use now. RetrieveModel answers for the same models; one of
  them that is loading or failed is UNAVAILABLE (as a call on it would be), and any
  other id NOT_FOUND ("The model `x` does not exist", in OpenAI's words).
- A model's ``created`` is when its version became READY (``ModelEntry.ready_at``):
  a model the repository loads later shows its own time.
- A generation the server ends early (shutting down, or its model unloaded) has no
  finish reason in OpenAI's words: the call ends UNAVAILABLE, so that a client
  retries rather than take a cut answer for a whole one.
- ``user`` is written to the call's access line (:func:`.calls.note_access`) and
  used for nothing else.
- A streamed chunk that carries nothing (text held back, as a partial character or
  the start of a possible stop sequence, and no log probabilities) is not sent; a
  chat choice's first chunk (its role) and every choice's last (its finish reason)
  always are.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from protoserve.common.logs import REQUEST_ID
from protoserve.openai.v1 import openai_service_pb2 as pb
from protoserve.openai.v1 import openai_service_pb2_grpc as pb_grpc
from protoserve.server.calls import LABEL_PREFIXES, add_service, note_access, streaming, unary
from protoserve.server.metrics import Metrics
from protoserve.server.openai._choices import gather_choices, merge_choices
from protoserve.server.openai._logprobs import TextOffsets, chat_logprobs, completion_logprobs
from protoserve.server.openai._requests import (
    Plan,
    chat_plan,
    check_size,
    check_stream,
    completion_plans,
    renamed,
)
from protoserve.server.runtime.core import ModelEntry, ModelState, Runtime
from protoserve.server.runtime.errors import (
    InvalidArgument,
    NotFound,
    Unavailable,
    bounded,
)
from protoserve.server.runtime.generation import Chunk, FinishReason, Usage
from protoserve.server.runtime.model import ChatMessage, Task

__all__ = ["OWNED_BY", "SERVICE_NAME", "OpenAIServicer", "add_to_server", "fingerprint"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["OpenAIService"].full_name
#: Every model's ``owned_by``.
OWNED_BY = "protoserve"
#: The tasks OpenAI's API serves; a model with neither is not one of its models.
_TASKS = frozenset({Task.TEXT_GENERATION, Task.EMBEDDING})
_FINISH = {
    FinishReason.END_OF_TEXT: pb.FINISH_REASON_STOP,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
}
_ENCODINGS = ("", "float", "base64")
#: The runtime names the texts to embed "inputs"; OpenAI "input".
_EMBEDDING_NAMES = {"inputs": "input"}

T = TypeVar("T")
M = TypeVar("M")


def add_to_server(servicer: OpenAIServicer, server: grpc.aio.Server) -> None:
    """Register every method of ``OpenAIService`` (:func:`.calls.add_service`)."""
    add_service(servicer, server, pb.DESCRIPTOR.services_by_name["OpenAIService"])


def fingerprint(entry: ModelEntry) -> str:
    """``system_fingerprint``: "fp_" and 10 hex digits of a hash of the model's name,
    version and decoding, what decides the tokens a seed gives."""
    decoding = "" if entry.decoding is None else entry.decoding.value
    digest = hashlib.sha256(f"{entry.name}\n{entry.version}\n{decoding}".encode())
    return "fp_" + digest.hexdigest()[:10]


def _finish(reason: FinishReason) -> pb.FinishReason:
    if reason is FinishReason.CANCELLED:
        raise Unavailable(
            "the server ended the generation early (it is shutting down, or the model "
            "was unloaded); retry"
        )
    return _FINISH[reason]


def _as_made(message: M) -> M:
    """A streaming method's items are its messages already."""
    return message


def _not_found(name: str) -> NotFound:
    """No model ``name``, in OpenAI's words, with the ResourceInfo the gateway reads."""
    return NotFound(
        f"The model `{bounded(name)}` does not exist", resource_type="model", resource_name=name
    )


def _note_user(user: str) -> None:
    """OpenAI's ``user`` goes on the call's access line, and nowhere else."""
    if user:
        note_access(user=bounded(user))


def _messages(request: pb.ChatCompletionRequest) -> list[ChatMessage]:
    return [ChatMessage(m.role, m.content, m.name) for m in request.messages]


async def _named(run: Awaitable[T], names: Mapping[str, str]) -> T:
    """``run``'s result; its InvalidArgument in the request's field names (:func:`renamed`)."""
    try:
        return await run
    except InvalidArgument as error:
        raise renamed(error, names) from None


async def _named_stream(
    stream: AsyncGenerator[Chunk, None], names: Mapping[str, str]
) -> AsyncGenerator[Chunk, None]:
    """``stream``'s chunks; its InvalidArgument in the request's field names."""
    async with contextlib.aclosing(stream) as chunks:
        try:
            async for chunk in chunks:
                yield chunk
        except InvalidArgument as error:
            raise renamed(error, names) from None


class _Usage:
    """A request's token counts: each prompt's once, whatever ``n``; every choice's
    generated tokens."""

    def __init__(self) -> None:
        self._prompts: dict[int, int] = {}
        self._completion = 0

    def add(self, prompt: int, usage: Usage) -> None:
        """Count one choice, of prompt number ``prompt``."""
        self._prompts[prompt] = usage.prompt_tokens
        self._completion += usage.completion_tokens

    def message(self) -> pb.Usage:
        prompt = sum(self._prompts.values())
        return pb.Usage(
            prompt_tokens=prompt,
            completion_tokens=self._completion,
            total_tokens=prompt + self._completion,
        )


async def _sent_chunks(
    streams: list[AsyncGenerator[Chunk, None]], usage: _Usage, per_prompt: int, *, role: bool
) -> AsyncGenerator[tuple[int, Chunk, bool], None]:
    """The choices' chunks worth a message, as ``(choice, chunk, first)``, merged
    (:func:`merge_choices`), with each choice's usage counted into ``usage`` (choice
    ``j`` is of prompt ``j // per_prompt``). A chunk with no text, no log probabilities
    and no finish reason is skipped, unless it is a choice's first and ``role`` says
    the first carries the role."""
    begun: set[int] = set()
    async with contextlib.aclosing(merge_choices(streams)) as merged:
        async for index, chunk in merged:
            first = index not in begun
            begun.add(index)
            if chunk.usage is not None:
                usage.add(index // per_prompt, chunk.usage)
            ends = chunk.finish_reason is not None
            if (first and role) or ends or chunk.text or chunk.logprobs:
                yield index, chunk, first


@dataclass(frozen=True)
class _Head:
    """What every message of one answer carries alike."""

    id: str
    created: int
    model: str
    system_fingerprint: str

    def fields(self, kind: str) -> dict[str, Any]:
        """The message's constant fields; ``kind`` is its ``object``."""
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
        }


class OpenAIServicer(pb_grpc.OpenAIServiceServicer):
    """The OpenAI face of a :class:`Runtime`."""

    #: Its methods' label in metrics and access lines (``openai.ListModels``).
    label_prefix = LABEL_PREFIXES[SERVICE_NAME]

    def __init__(self, runtime: Runtime, *, metrics: Metrics | None = None) -> None:
        self.runtime = runtime
        self.metrics = metrics

    def _model(self, entry: ModelEntry) -> pb.Model:
        created = entry.ready_at or 0
        return pb.Model(id=entry.name, object="model", created=created, owned_by=OWNED_BY)

    def _head(
        self, prefix: str, model: str, plan: Plan, generations: int, *, stream: bool
    ) -> _Head:
        """The answer's constants, once the request is one the model could ever serve
        (:func:`check_size`); the model must exist (NOT_FOUND, or INVALID_ARGUMENT for
        none named, as the runtime would say)."""
        if not model:
            raise InvalidArgument.field("model", "must name a model")
        try:
            entry = self.runtime.get_model(model)
        except NotFound:
            raise _not_found(model) from None
        capacity = self.runtime.capacity(model, stream=stream)
        default = entry.model.default_max_new_tokens
        check_size(plan, generations, capacity=capacity, default_max_tokens=default)
        answer_id = prefix + (REQUEST_ID.get() or uuid.uuid4().hex)
        return _Head(answer_id, int(time.time()), model, fingerprint(entry))

    @unary
    async def ListModels(self, request: pb.ListModelsRequest) -> pb.ModelList:
        return pb.ModelList(
            object="list",
            data=[
                self._model(entry)
                for entry in self.runtime.list_models()
                if entry.state is ModelState.READY and entry.model.tasks() & _TASKS
            ],
        )

    @unary
    async def RetrieveModel(self, request: pb.RetrieveModelRequest) -> pb.Model:
        if not request.id:
            raise InvalidArgument.field("id", "must name a model")
        entry = self._served(request.id)
        if entry.state is not ModelState.READY:
            raise Unavailable(f"model {bounded(request.id)!r} is not ready: {entry.state_message}")
        return self._model(entry)

    def _served(self, name: str) -> ModelEntry:
        """The model ``name`` if OpenAI's API serves it, ready or not; else NOT_FOUND."""
        try:
            entry = self.runtime.get_model(name)
        except NotFound:
            entry = None
        if entry is None or not entry.model.tasks() & _TASKS:
            raise _not_found(name)
        return entry

    @unary
    async def CreateChatCompletion(self, request: pb.ChatCompletionRequest) -> pb.ChatCompletion:
        _note_user(request.user)
        check_stream(request, streaming=False, other="StreamChatCompletion")
        plan = chat_plan(request)
        head = self._head("chatcmpl-", request.model, plan, plan.choices, stream=False)
        messages = _messages(request)
        results = await gather_choices(
            [
                _named(
                    self.runtime.generate(
                        request.model, messages, plan.parameters_of(j), logprobs=plan.logprobs
                    ),
                    plan.names,
                )
                for j in range(plan.choices)
            ]
        )
        usage = _Usage()
        choices = []
        for j, result in enumerate(results):
            usage.add(0, result.usage)
            choice = pb.ChatCompletionChoice(
                index=j,
                message=pb.ChatMessage(role="assistant", content=result.text),
                finish_reason=_finish(result.finish_reason),
            )
            if plan.logprobs is not None:
                choice.logprobs.CopyFrom(chat_logprobs(result.logprobs))
            choices.append(choice)
        return pb.ChatCompletion(
            **head.fields("chat.completion"), choices=choices, usage=usage.message()
        )

    @streaming(_as_made)
    async def StreamChatCompletion(
        self, request: pb.ChatCompletionRequest
    ) -> AsyncGenerator[pb.ChatCompletionChunk, None]:
        _note_user(request.user)
        check_stream(request, streaming=True, other="CreateChatCompletion")
        plan = chat_plan(request)
        head = self._head("chatcmpl-", request.model, plan, plan.choices, stream=True)
        messages = _messages(request)
        streams = [
            _named_stream(
                self.runtime.generate_stream(
                    request.model, messages, plan.parameters_of(j), logprobs=plan.logprobs
                ),
                plan.names,
            )
            for j in range(plan.choices)
        ]
        usage = _Usage()
        sent = _sent_chunks(streams, usage, plan.choices, role=True)
        async with contextlib.aclosing(sent) as chunks:
            async for j, chunk, first in chunks:
                choice = pb.ChatCompletionChunkChoice(
                    index=j,
                    delta=pb.ChatDelta(role="assistant" if first else "", content=chunk.text),
                )
                if chunk.finish_reason is not None:
                    choice.finish_reason = _finish(chunk.finish_reason)
                if chunk.logprobs:
                    choice.logprobs.CopyFrom(chat_logprobs(chunk.logprobs))
                yield pb.ChatCompletionChunk(
                    **head.fields("chat.completion.chunk"), choices=[choice]
                )
        if request.stream_options.include_usage:
            yield pb.ChatCompletionChunk(
                **head.fields("chat.completion.chunk"), usage=usage.message()
            )

    @unary
    async def CreateCompletion(self, request: pb.CompletionRequest) -> pb.Completion:
        _note_user(request.user)
        check_stream(request, streaming=False, other="StreamCompletion")
        plans = completion_plans(request)
        generations = plans[0].choices * len(plans)
        head = self._head("cmpl-", request.model, plans[0], generations, stream=False)
        n = plans[0].choices
        results = await gather_choices(
            [
                _named(
                    self.runtime.generate(
                        request.model, prompt, plan.parameters_of(j), logprobs=plan.logprobs
                    ),
                    plan.names,
                )
                for prompt, plan in zip(request.prompt, plans, strict=True)
                for j in range(n)
            ]
        )
        usage = _Usage()
        choices = []
        for index, result in enumerate(results):
            usage.add(index // n, result.usage)
            choice = pb.CompletionChoice(
                index=index, text=result.text, finish_reason=_finish(result.finish_reason)
            )
            if plans[0].logprobs is not None:
                choice.logprobs.CopyFrom(completion_logprobs(result.logprobs, TextOffsets()))
            choices.append(choice)
        return pb.Completion(
            **head.fields("text_completion"), choices=choices, usage=usage.message()
        )

    @streaming(_as_made)
    async def StreamCompletion(
        self, request: pb.CompletionRequest
    ) -> AsyncGenerator[pb.Completion, None]:
        _note_user(request.user)
        check_stream(request, streaming=True, other="CreateCompletion")
        plans = completion_plans(request)
        generations = plans[0].choices * len(plans)
        head = self._head("cmpl-", request.model, plans[0], generations, stream=True)
        n = plans[0].choices
        streams = [
            _named_stream(
                self.runtime.generate_stream(
                    request.model, prompt, plan.parameters_of(j), logprobs=plan.logprobs
                ),
                plan.names,
            )
            for prompt, plan in zip(request.prompt, plans, strict=True)
            for j in range(n)
        ]
        usage = _Usage()
        # Each choice's offsets run on from chunk to chunk: they are in its whole text.
        offsets = [TextOffsets() for _ in streams]
        sent = _sent_chunks(streams, usage, n, role=False)
        async with contextlib.aclosing(sent) as chunks:
            async for index, chunk, _ in chunks:
                choice = pb.CompletionChoice(index=index, text=chunk.text)
                if chunk.finish_reason is not None:
                    choice.finish_reason = _finish(chunk.finish_reason)
                if chunk.logprobs:
                    choice.logprobs.CopyFrom(completion_logprobs(chunk.logprobs, offsets[index]))
                yield pb.Completion(**head.fields("text_completion"), choices=[choice])
        if request.stream_options.include_usage:
            yield pb.Completion(**head.fields("text_completion"), usage=usage.message())

    @unary
    async def CreateEmbedding(self, request: pb.EmbeddingRequest) -> pb.EmbeddingList:
        _note_user(request.user)
        for i, text in enumerate(request.input):
            if not text:
                field = "input" if len(request.input) == 1 else f"input[{i}]"
                raise InvalidArgument.field(field, "must not be an empty string")
        if request.encoding_format not in _ENCODINGS:
            raise InvalidArgument.field(
                "encoding_format",
                f'must be "float" or "base64", not {bounded(request.encoding_format)!r}',
            )
        try:
            vectors, usage = await _named(
                self.runtime.embed(request.model, list(request.input)), _EMBEDDING_NAMES
            )
        except NotFound:
            raise _not_found(request.model) from None
        return pb.EmbeddingList(
            object="list",
            data=[
                pb.Embedding(object="embedding", embedding=row, index=i)
                for i, row in enumerate(vectors.tolist())
            ],
            model=request.model,
            usage=pb.Usage(prompt_tokens=usage.prompt_tokens, total_tokens=usage.prompt_tokens),
        )
