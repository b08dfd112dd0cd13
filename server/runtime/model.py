"""The base class a model implements to be served, and the types it speaks.

A model is plain Python: it loads itself, then generates, embeds or predicts
when asked. It never sees gRPC. The runtime calls the methods that do its work
(``load``, ``warmup``, ``batch_decoder``, ``generate``, ``embed``, ``predict``)
from the model's own worker thread, one call at a time, so a model needs no
locking and its work never blocks the event loop (docs/architecture.md, rule 5).
The methods that describe it (``tasks``, ``parameters``, ``count_tokens``,
``describe_inputs``, ``describe_outputs``) are also called on the event loop, to
check and describe requests: they must be quick, and must not change anything
the work uses; so is ``chat_prompt``, which renders a conversation as a prompt.

Example::

    class Doubler(Model):
        name = "doubler"
        inputs = (TensorInfo("x", "float32", (-1,)),)
        outputs = (TensorInfo("y", "float32", (-1,)),)

        def predict(self, inputs, parameters):
            return {"y": inputs["x"] * 2}
"""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from protoserve.server.runtime.errors import InvalidArgument, bounded

__all__ = [
    "CHAT_ROLES",
    "DEFAULT_CHAT_TEMPLATE",
    "MAX_STOP_SEQUENCE_CHARS",
    "MAX_TOP_LOGPROBS",
    "BatchDecoder",
    "ChatMessage",
    "ChatTemplate",
    "Decoding",
    "GenerationParams",
    "Model",
    "Parameter",
    "Task",
    "TensorInfo",
    "Token",
    "TokenChoice",
    "check_messages",
    "warm_up_text",
]

#: Longest stop sequence accepted, in characters; longer ones only cost holdback
#: (text held back in case it is the start of one) and are never useful.
MAX_STOP_SEQUENCE_CHARS = 256
#: Most alternatives a request may ask for at each position (``logprobs``); OpenAI's
#: ``top_logprobs`` allows 0 to 20.
MAX_TOP_LOGPROBS = 20
#: The roles a chat message may have. "developer" (OpenAI's newer name for the
#: instructions) is rendered as "system" is.
CHAT_ROLES = ("system", "developer", "user", "assistant")


class Task(enum.Enum):
    """A kind of work a model can do; a model serves those whose method it overrides."""

    TEXT_GENERATION = "text_generation"
    EMBEDDING = "embedding"
    TENSOR_PREDICTION = "tensor_prediction"


class Decoding(enum.Enum):
    """How a model's generations decode when several run at once (GetModel's ``decoding``)."""

    #: One forward pass per step for every running sequence. A sequence's tokens are
    #: the ones it gets alone up to float rounding: where two candidate tokens are
    #: that close, a batched run may take the other one.
    BATCHED = "batched"
    #: One forward pass per step, and every sequence gets, bit for bit, the tokens it
    #: gets alone (batch invariance, ``--batch-invariant``).
    BATCHED_EXACT = "batched-exact"
    #: Each sequence's step runs alone, the model once per sequence per step: the
    #: tokens it gets alone, without batching's speed.
    SEQUENTIAL = "sequential"


@dataclass(frozen=True)
class TensorInfo:
    """One input or output: a name, a dtype name (``"float32"``, ``"string"`` ...) and a shape.

    ``-1`` in the shape marks a dimension of any size.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    description: str = ""


@dataclass(frozen=True)
class Parameter:
    """A request parameter a model accepts: its type, default and bounds.

    ``type`` is one of ``int``, ``float``, ``bool``, ``str`` or ``list`` (of
    strings). For numbers ``minimum``/``maximum`` bound the value (inclusive);
    for lists ``maximum`` bounds the number of items.
    """

    name: str
    task: Task
    type: type
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""


@dataclass(frozen=True)
class GenerationParams:
    """Validated generation parameters; every field is set."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_sequences: tuple[str, ...] = ()
    #: None: no log probabilities. ``k >= 0``: each token's log probability and its
    #: ``k`` most likely alternatives (:attr:`Token.logprob`, :attr:`Token.top_logprobs`).
    logprobs: int | None = None


@dataclass(frozen=True)
class TokenChoice:
    """One of the most likely tokens at a position, with its log probability."""

    id: int
    data: bytes
    logprob: float


@dataclass(frozen=True)
class Token:
    """One generated token: its id and the bytes it stands for (UTF-8 text, possibly partial).

    When the request asked for log probabilities (:attr:`GenerationParams.logprobs`)
    and the model :attr:`~Model.supports_logprobs`, ``logprob`` is the token's
    ``log_softmax`` of the model's raw logits (before temperature, top-k and top-p:
    what the model thinks, not how it was sampled), and ``top_logprobs`` the
    ``logprobs`` most likely tokens there, most likely first, ties by lower id.
    """

    id: int
    data: bytes
    logprob: float | None = None
    top_logprobs: tuple[TokenChoice, ...] = ()


_PLACEHOLDER = re.compile(r"\{(content|name)\}")


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation: who says it (:data:`CHAT_ROLES`) and what.

    ``name`` tells apart participants of one role; a template shows it only where
    its format says ``{name}``.
    """

    role: str
    content: str
    name: str = ""


@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation becomes one prompt, for models that only continue text.

    Each message is its role's format with ``{content}`` replaced by the message's
    text (and ``{name}`` by its name), in order; "developer" messages use
    ``system``. Then ``generation_prompt`` marks where the answer begins. Every
    chat generation also stops at each of ``stop``: the marker of the turn after
    the answer, which a model that learned the format writes when it is done. Only
    ``{content}`` and ``{name}`` are placeholders; other braces are text.

    The default (:data:`DEFAULT_CHAT_TEMPLATE`) is plain text a byte-level model
    reads as it reads any document: a Markdown-like header line per turn and a
    blank line between turns::

        ### System
        You answer in Python.

        ### User
        Sort a list.

        ### Assistant

    and it stops at ``"\\n### "``, the next header. A model repository sets its own
    with a ``[chat_template]`` table (docs/model-repository.md).

    Raises:
        ValueError: a format lacks ``{content}``, or a stop sequence is empty or
            longer than :data:`MAX_STOP_SEQUENCE_CHARS` (the message names the field).
    """

    system: str = "### System\n{content}\n\n"
    user: str = "### User\n{content}\n\n"
    assistant: str = "### Assistant\n{content}\n\n"
    generation_prompt: str = "### Assistant\n"
    stop: tuple[str, ...] = ("\n### ",)

    def __post_init__(self) -> None:
        for field in ("system", "user", "assistant"):
            if "{content}" not in getattr(self, field):
                raise ValueError(f"{field}: must contain {{content}}, where the message goes")
        for i, stop in enumerate(self.stop):
            if not 1 <= len(stop) <= MAX_STOP_SEQUENCE_CHARS:
                raise ValueError(
                    f"stop: item {i} must be 1 to {MAX_STOP_SEQUENCE_CHARS} characters"
                )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The fields a ``[chat_template]`` table may set, in declaration order."""
        return tuple(f.name for f in fields(cls))

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt for ``messages``: each message in its role's format, then
        ``generation_prompt``.

        Raises:
            InvalidArgument: no messages (field ``messages``), or a role not in
                :data:`CHAT_ROLES` (field ``messages[i].role``).
        """
        check_messages(messages)
        parts = []
        for message in messages:
            role = "system" if message.role == "developer" else message.role
            parts.append(_fill(getattr(self, role), message))
        parts.append(self.generation_prompt)
        return "".join(parts)


def _fill(form: str, message: ChatMessage) -> str:
    """``form`` with its placeholders replaced in one pass, so that a message's text
    holding ``{name}`` stays as it is."""
    values = {"content": message.content, "name": message.name}
    return _PLACEHOLDER.sub(lambda m: values[m[1]], form)


#: The template of every model that sets none: see :class:`ChatTemplate`.
DEFAULT_CHAT_TEMPLATE = ChatTemplate()


def check_messages(messages: Sequence[ChatMessage]) -> None:
    """Raise InvalidArgument for an empty conversation or a role not in :data:`CHAT_ROLES`."""
    if not messages:
        raise InvalidArgument.field("messages", "must hold at least one message")
    for i, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise InvalidArgument.field(
                f"messages[{i}].role",
                f"must be one of {', '.join(CHAT_ROLES)}, not {bounded(message.role)!r}",
            )


class BatchDecoder:
    """Continuous batching: many sequences decode together, one step for all of them.

    A model that can decode several sequences in one forward pass returns one
    of these from :meth:`Model.batch_decoder`. The runtime then admits a new
    request with :meth:`prefill` (which also chooses its first token), steps
    every running sequence with one :meth:`step` call, and calls
    :meth:`release` as soon as a sequence finishes, is cancelled or times
    out. All calls come from the model's worker thread, one at a time.

    Each sequence keeps its own parameters and seed: its tokens must be the
    ones it gets decoding alone, to float rounding (:attr:`decoding`).
    """

    #: Most sequences held at once; the runtime never prefills more.
    max_sequences: int = 1
    #: How steps decode. BATCHED promises a sequence the tokens it gets alone to
    #: float rounding; BATCHED_EXACT promises them bit for bit (``--batch-invariant``
    #: uses a decoder only then); SEQUENTIAL says each step runs the model once per
    #: sequence (a decoder that found it cannot keep its promise batched, here).
    decoding: Decoding = Decoding.BATCHED
    #: Why ``decoding`` is SEQUENTIAL, in a few words; the server logs it at start-up.
    decoding_note: str = ""

    def prefill(self, text: str, params: GenerationParams) -> tuple[Any, Token | None]:
        """Start a sequence: read the prompt and choose the first token.

        Returns an opaque state for :meth:`step` and :meth:`release`, and the
        first token (None: the model ended the text at once).
        """
        raise NotImplementedError

    def step(self, states: Sequence[Any]) -> list[Token | None]:
        """One decode step for each sequence: its next token, or None at end of text.

        ``states`` may be any subset of the live sequences, in any order; the
        result is in the same order.
        """
        raise NotImplementedError

    def release(self, state: Any) -> None:
        """The sequence left the batch; free what it holds. Called once per sequence."""


class Model:
    """Base class of a servable model. Override the methods of the tasks it serves.

    Text generation: :meth:`generate` (one sequence at a time, steps taking
    turns) or :meth:`batch_decoder` (continuous batching), or both.
    Embeddings: :meth:`embed`; requests arriving together are joined into one
    call (dynamic batching, :attr:`max_batch_size`). Tensors: :meth:`predict`,
    joined the same way when :attr:`predict_batches` is set.

    Class attributes describe the model; override them in a subclass or set
    them on an instance. Methods run in the model's worker thread.
    """

    name: ClassVar[str] = "model"
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    #: Inputs and outputs of ``predict``; empty means any named tensors.
    inputs: ClassVar[Sequence[TensorInfo]] = ()
    outputs: ClassVar[Sequence[TensorInfo]] = ()
    #: Generation limits and defaults, used by :meth:`parameters`.
    default_max_new_tokens: ClassVar[int] = 64
    max_new_tokens_limit: ClassVar[int] = 1024
    max_input_tokens: ClassVar[int] = 4096
    max_stop_sequences: ClassVar[int] = 8
    #: Most texts in one ``embed`` request.
    max_batch_texts: ClassVar[int] = 256
    #: Dynamic batching: most items in one model call -- texts for ``embed``,
    #: rows (dimension 0) for ``predict`` when :attr:`predict_batches` is set.
    #: Requests that arrive together are run as one call up to this size; 1 turns it off.
    max_batch_size: ClassVar[int] = 32
    #: Seconds the runtime may wait for more requests to fill a batch, and only
    #: while the model has nothing else to do. 0: an idle model runs what is queued
    #: at once, and batches form from what arrives while it is busy (a wait only
    #: adds latency when requests come one at a time: bench/README.md).
    max_batch_delay: ClassVar[float] = 0.0
    #: True when every ``predict`` input and output has the batch as dimension 0
    #: and rows do not affect each other, so that requests whose inputs agree in
    #: dtype and in every other dimension may be concatenated into one call.
    predict_batches: ClassVar[bool] = False

    #: Set by the server before it calls :meth:`batch_decoder`: every sequence must get
    #: bit for bit the tokens it gets alone (``--batch-invariant``, or a repository
    #: model's ``[batching] batch_invariant``). A decoder that cannot promise that
    #: (its ``decoding`` is BATCHED) is not used; generations then take turns.
    batch_invariant: bool = False

    #: Where the model runs. A class may ask for one (``"cpu"``, ``"cuda"``,
    #: ``"cuda:1"``, ``"auto"``); None (the default) takes the server's ``--device``,
    #: and a repository's ``model.toml`` ``device`` wins over both. Before
    #: :meth:`load`, the runtime sets the concrete :class:`torch.device` on the
    #: instance (``cpu``, ``cuda:0``): load the weights there, and put there the
    #: tensors the model makes. :meth:`predict` gets its inputs on it already.
    device: torch.device | str | None = None
    #: The model loads on :attr:`device` and makes its tensors there: the server's
    #: ``--device auto`` may then put it on a GPU. False (the default for a class of
    #: yours): ``auto`` leaves it on the CPU; a device named (``--device cuda``, the
    #: class's or model.toml's ``device``) still places it.
    follows_device: ClassVar[bool] = False
    #: The floating-point dtype the model computes in: ``"float32"``, ``"float16"``
    #: or ``"bfloat16"``; None takes the server's ``--dtype`` (float32 by default);
    #: ``model.toml``'s ``dtype`` wins. Set on the instance as a :class:`torch.dtype`
    #: before :meth:`load`. The API's tensors keep their declared dtypes: casting
    #: inputs to this dtype and outputs back is the model's (docs/devices.md).
    dtype: torch.dtype | str | None = None
    #: Copies of the model the server runs at once, each loaded and run by a worker
    #: thread of its own (a request goes to the least busy); None takes the server's
    #: ``--instances`` (1 by default); ``model.toml``'s ``instances`` wins. The copies
    #: are made before :meth:`load` (``copy.deepcopy``), so each loads its own weights.
    instances: int | None = None
    #: Devices the instances take in turn (``["cuda:0", "cuda:1"]``); None: each takes
    #: :attr:`device`. ``model.toml``'s ``devices`` wins.
    devices: Sequence[str] | None = None

    #: How :meth:`chat_prompt` turns a conversation into a prompt, and the stop
    #: sequences every chat generation gets. A model repository's ``[chat_template]``
    #: sets it on the instance.
    chat_template: ChatTemplate = DEFAULT_CHAT_TEMPLATE
    #: True when :meth:`generate` and the batch decoder fill :attr:`Token.logprob` and
    #: :attr:`Token.top_logprobs` for requests that ask (:attr:`GenerationParams.logprobs`);
    #: the runtime refuses the request otherwise.
    supports_logprobs: ClassVar[bool] = False

    def load(self) -> None:
        """Load weights and get ready. Called once, before anything else."""

    def batch_decoder(self, max_sequences: int) -> BatchDecoder | None:
        """A decoder for continuous batching of generations, or None (the default).

        Called once, after :meth:`load`. ``max_sequences`` is the most the
        runtime will run at once. Without a decoder, generations run through
        :meth:`generate` and take turns one step at a time.
        """
        return None

    def warmup(self) -> None:
        """Run every task once on a tiny input, so the first request pays no one-off costs.

        The model is not READY until this has returned.
        """
        warm_up_text(self, "warm up")

    def tasks(self) -> set[Task]:
        """The tasks this model serves: those whose method the subclass overrides."""
        kind = type(self)
        found = set()
        if kind.generate is not Model.generate or kind.batch_decoder is not Model.batch_decoder:
            found.add(Task.TEXT_GENERATION)
        if kind.embed is not Model.embed:
            found.add(Task.EMBEDDING)
        if kind.predict is not Model.predict:
            found.add(Task.TENSOR_PREDICTION)
        return found

    def parameters(self) -> list[Parameter]:
        """The parameters requests may set. The default covers text generation."""
        if Task.TEXT_GENERATION not in self.tasks():
            return []
        gen = Task.TEXT_GENERATION
        return [
            Parameter(
                "max_new_tokens",
                gen,
                int,
                self.default_max_new_tokens,
                1,
                self.max_new_tokens_limit,
                "Most tokens to generate.",
            ),
            Parameter(
                "temperature",
                gen,
                float,
                1.0,
                0.0,
                10.0,
                "Scales the logits before sampling; 0 is greedy decoding.",
            ),
            Parameter(
                "top_k",
                gen,
                int,
                0,
                0,
                None,
                "Sample among the k most likely tokens; 0 means no limit.",
            ),
            Parameter(
                "top_p",
                gen,
                float,
                1.0,
                0.0,
                1.0,
                "Nucleus sampling: the smallest set of tokens whose probabilities "
                "add up to p; 1 means no limit, 0 keeps only the most likely token.",
            ),
            Parameter(
                "seed",
                gen,
                int,
                None,
                0,
                2**63 - 1,
                "Makes sampling reproducible; unset means a random seed.",
            ),
            Parameter(
                "stop_sequences",
                gen,
                list,
                [],
                None,
                self.max_stop_sequences,
                "End the generation when one of these texts is generated; "
                f"each is 1 to {MAX_STOP_SEQUENCE_CHARS} characters.",
            ),
        ]

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt that continues the conversation ``messages`` with the answer.

        Called on the event loop, like :meth:`count_tokens`: it must be quick (a
        tokenizer's ``apply_chat_template`` compiles its template once: do that in
        :meth:`load`). The default renders :attr:`chat_template`; a model with a
        format of its own overrides this, and :meth:`chat_stops` if its answers need
        stop sequences. The runtime has checked the roles (:func:`check_messages`)
        before calling it.

        Raises:
            InvalidArgument: naming the field (``messages[i].content`` ...) of a
                conversation the model cannot take.
        """
        return self.chat_template.render(messages)

    def chat_stops(self) -> tuple[str, ...]:
        """Stop sequences every chat generation gets, besides the request's own.

        By default ``chat_template.stop`` when :meth:`chat_prompt` is the default one,
        which renders that template; none when a subclass renders its own prompt (its
        model ends an answer its own way, and the default template's ``"\n### "``
        would cut answers that hold a Markdown heading). Override to give others.
        """
        if type(self).chat_prompt is Model.chat_prompt:
            return self.chat_template.stop
        return ()

    def count_tokens(self, text: str) -> int:
        """The number of tokens ``text`` encodes to; the default counts UTF-8 bytes."""
        return len(text.encode("utf-8"))

    def generate(self, text: str, params: GenerationParams) -> Iterator[Token]:
        """Continue ``text``: yield one token per step, as soon as it is chosen.

        Stop (return) at the end of text. The runtime stops iterating at
        ``max_new_tokens`` or a stop sequence, and closes the iterator when
        the request is cancelled, so each ``next()`` should be one step.

        The default decodes one sequence alone with :meth:`batch_decoder`, so a
        model with a decoder need not write this too.
        """
        decoder = self.batch_decoder(1)
        if decoder is None:
            raise NotImplementedError(f"{type(self).__name__} does not generate text")
        state, token = decoder.prefill(text, params)
        try:
            while token is not None:
                yield token
                token = decoder.step([state])[0]
        finally:
            decoder.release(state)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """One vector per text: a float tensor of shape ``[len(texts), dim]``."""
        raise NotImplementedError

    def predict(
        self, inputs: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]
    ) -> Mapping[str, torch.Tensor]:
        """Run on named tensors, return named tensors."""
        raise NotImplementedError

    def describe_inputs(self) -> list[TensorInfo]:
        """The inputs of every task this model serves."""
        found = list(self.inputs)
        tasks = self.tasks()
        if Task.TEXT_GENERATION in tasks:
            found.append(TensorInfo("inputs", "string", (1,), "Text to continue (generate)."))
        if Task.EMBEDDING in tasks:
            found.append(TensorInfo("inputs", "string", (-1,), "Texts to embed (embed)."))
        return found

    def describe_outputs(self) -> list[TensorInfo]:
        """The outputs of every task this model serves."""
        found = list(self.outputs)
        tasks = self.tasks()
        if Task.TEXT_GENERATION in tasks:
            found.append(TensorInfo("generated_text", "string", (1,), "The continuation."))
        if Task.EMBEDDING in tasks:
            found.append(TensorInfo("embeddings", "float32", (-1, -1), "One vector per text."))
        return found


def warm_up_text(model: Model, text: str) -> None:
    """Run the model's text tasks once on ``text``: two generation steps, one embedding.

    Tasks the model does not serve are skipped. Used by :meth:`Model.warmup` and by
    a model repository's ``[warmup] text``.
    """
    tasks = model.tasks()
    if Task.TEXT_GENERATION in tasks:
        params = GenerationParams(max_new_tokens=2, temperature=1.0, top_k=0, top_p=1.0, seed=0)
        tokens = iter(model.generate(text, params))
        try:
            # Two steps: the prefill and one decode step; never the whole text.
            for _ in itertools.islice(tokens, params.max_new_tokens):
                pass
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
    if Task.EMBEDDING in tasks:
        model.embed([text])
