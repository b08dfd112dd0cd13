"""OpenAI's request parameters in the runtime's terms, and the runtime's errors in OpenAI's.

A request becomes a :class:`Plan`: how many choices, the runtime's generation
parameters (``max_tokens`` or ``max_completion_tokens`` is ``max_new_tokens``,
``stop`` is ``stop_sequences``), each choice's seed and the log probabilities to
ask for. The runtime checks values against the model and names what it rejects in
its own words (``parameters.max_new_tokens``, ``inputs``); :func:`renamed` puts
those errors in the words of the request the client sent (``max_tokens``,
``prompt``), field violations and message alike, so the gateway's ``param`` names
what the client can fix.

What the proto leaves open, decided here:

- ``n`` is 1 to :data:`MAX_CHOICES`, and so is the number of generations a request
  makes in all (prompts times ``n``): each is a generation of its own, counted
  against the model's queue and the server's streams.
- Choice ``j`` samples with ``seed + j`` taken modulo 2**63, into the runtime's
  seeds (0 to 2**63 - 1): a negative seed is as good as any, and choice 1 with seed
  ``s`` is choice 0 with seed ``s + 1``. For completions ``j`` counts the choices of
  one prompt, so a prompt continues the same whatever other prompts the list holds.
- ``stream`` disagreeing with the call is refused only when set: unset is either
  call's (a gRPC caller of a streaming method need not repeat it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from protoserve.openai.v1 import openai_service_pb2 as pb
from protoserve.server.runtime.errors import InvalidArgument
from protoserve.server.runtime.model import MAX_TOP_LOGPROBS

__all__ = [
    "MAX_CHOICES",
    "MAX_COMPLETION_LOGPROBS",
    "MAX_LOGPROB_ENTRIES",
    "MAX_TEMPERATURE",
    "Plan",
    "chat_plan",
    "check_size",
    "check_stream",
    "completion_plans",
    "renamed",
]

#: Most generations one request makes: ``n``, times the prompts of a completion.
MAX_CHOICES = 16
#: Most alternatives a completion's ``logprobs`` may ask for (OpenAI's bound).
MAX_COMPLETION_LOGPROBS = 5
#: OpenAI's highest temperature (the runtime's own limit, bytelm's 10, is wider): a
#: client tuned against OpenAI never sends more, and gets the same 400 for it here.
MAX_TEMPERATURE = 2.0
#: Most log probabilities one request may ask for: generations x tokens x (1 +
#: alternatives). Each is a message built on the server's event loop and a JSON object
#: on the gateway's; past this an answer would hold other calls up for a noticeable
#: time (n = 3 of bytelm's 2048 tokens with 20 alternatives is within it).
MAX_LOGPROB_ENTRIES = 2**17
#: The runtime's seeds are 0 to 2**63 - 1; a choice's seed is taken modulo this.
_SEEDS = 2**63

#: The runtime's names for generation parameters -> the request's (both requests agree).
_PARAMETERS = {
    "parameters.temperature": "temperature",
    "parameters.top_p": "top_p",
    "parameters.top_k": "top_k",
    "parameters.seed": "seed",
    "parameters.stop_sequences": "stop",
}

Request: TypeAlias = pb.ChatCompletionRequest | pb.CompletionRequest


@dataclass(frozen=True)
class Plan:
    """How a request runs in the runtime.

    Attributes:
        choices: choices per prompt (``n``).
        parameters: the runtime's generation parameters the request set, but the seed.
        seed: the request's seed, or None for a random one per choice.
        logprobs: alternatives per token to ask for, or None for no log probabilities.
        names: the runtime's field names -> the request's (:func:`renamed`).
        logprobs_field: the request's field that set ``logprobs``'s alternatives.
    """

    choices: int
    parameters: Mapping[str, Any]
    seed: int | None
    logprobs: int | None
    names: Mapping[str, str] = field(default_factory=dict)
    logprobs_field: str = "logprobs"

    def parameters_of(self, choice: int) -> dict[str, Any]:
        """The parameters of choice number ``choice`` (of one prompt): its seed is
        ``seed + choice``, modulo 2**63 (the module docstring)."""
        if self.seed is None:
            return dict(self.parameters)
        return {**self.parameters, "seed": (self.seed + choice) % _SEEDS}


def check_stream(request: Request, *, streaming: bool, other: str) -> None:
    """Refuse a request whose ``stream`` says it is ``other``'s, the call of the other
    kind, and ``stream_options`` on a unary call."""
    if request.HasField("stream") and request.stream != streaming:
        given = "true" if request.stream else "false"
        raise InvalidArgument.field("stream", f"is {given}, which is {other}'s; call {other}")
    if not streaming and request.HasField("stream_options"):
        raise InvalidArgument.field(
            "stream_options", "is only for a streamed answer (stream: true)"
        )


def _choices(request: Request) -> int:
    if not request.HasField("n"):
        return 1
    if not 1 <= request.n <= MAX_CHOICES:
        raise InvalidArgument.field("n", f"must be between 1 and {MAX_CHOICES}, got {request.n}")
    return request.n


def _sampling(request: Request, max_tokens: str) -> dict[str, Any]:
    """The runtime's parameters the request set, but the seed; ``max_tokens`` names the
    field that holds ``max_new_tokens``."""
    given: dict[str, Any] = {}
    if request.HasField(max_tokens):
        given["max_new_tokens"] = getattr(request, max_tokens)
    if request.HasField("temperature") and not 0 <= request.temperature <= MAX_TEMPERATURE:
        raise InvalidArgument.field(
            "temperature",
            f"must be between 0 and {MAX_TEMPERATURE:g} (OpenAI's range), "
            f"got {request.temperature:g}",
        )
    for name in ("temperature", "top_p", "top_k"):
        if request.HasField(name):
            given[name] = getattr(request, name)
    if request.stop:
        given["stop_sequences"] = list(request.stop)
    return given


def chat_plan(request: pb.ChatCompletionRequest) -> Plan:
    """A chat request's plan.

    Raises:
        InvalidArgument: ``max_tokens`` and ``max_completion_tokens`` both set (naming
            ``max_completion_tokens``), ``n`` out of range, ``top_logprobs`` out of
            range or without ``logprobs``.
    """
    if request.HasField("max_tokens") and request.HasField("max_completion_tokens"):
        raise InvalidArgument.field(
            "max_completion_tokens", "cannot be set with max_tokens, its deprecated name: set one"
        )
    max_tokens = "max_tokens" if request.HasField("max_tokens") else "max_completion_tokens"
    logprobs: int | None = None
    if request.HasField("top_logprobs"):
        if not request.logprobs:
            raise InvalidArgument.field("top_logprobs", "needs logprobs: true")
        if request.top_logprobs > MAX_TOP_LOGPROBS:
            raise InvalidArgument.field(
                "top_logprobs",
                f"must be between 0 and {MAX_TOP_LOGPROBS}, got {request.top_logprobs}",
            )
    if request.logprobs:
        logprobs = request.top_logprobs
    return Plan(
        choices=_choices(request),
        parameters=_sampling(request, max_tokens),
        seed=request.seed if request.HasField("seed") else None,
        logprobs=logprobs,
        names={**_PARAMETERS, "parameters.max_new_tokens": max_tokens},
        logprobs_field="top_logprobs" if request.top_logprobs else "logprobs",
    )


def completion_plans(request: pb.CompletionRequest) -> list[Plan]:
    """A completion request's plans, one per prompt (they differ only in the name
    their errors give the prompt).

    Raises:
        InvalidArgument: no prompt, ``n`` out of range, more than :data:`MAX_CHOICES`
            choices in all, ``logprobs`` out of range.
    """
    prompts = len(request.prompt)
    if not prompts:
        raise InvalidArgument.field("prompt", "must hold at least one prompt")
    choices = _choices(request)
    if prompts * choices > MAX_CHOICES:
        raise InvalidArgument.field(
            "prompt",
            f"holds {prompts} prompts; with n = {choices} that is {prompts * choices} "
            f"choices, more than the {MAX_CHOICES} a request may have",
        )
    logprobs: int | None = None
    if request.HasField("logprobs"):
        if request.logprobs > MAX_COMPLETION_LOGPROBS:
            raise InvalidArgument.field(
                "logprobs",
                f"must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {request.logprobs}",
            )
        logprobs = request.logprobs
    parameters = _sampling(request, "max_tokens")
    seed = request.seed if request.HasField("seed") else None
    names = {**_PARAMETERS, "parameters.max_new_tokens": "max_tokens"}
    return [
        Plan(
            choices=choices,
            parameters=parameters,
            seed=seed,
            logprobs=logprobs,
            # One prompt is "prompt", however it was sent (over HTTP a string is a list of one).
            names={**names, "inputs": "prompt" if prompts == 1 else f"prompt[{p}]"},
        )
        for p in range(prompts)
    ]


def check_size(plan: Plan, generations: int, *, capacity: int, default_max_tokens: int) -> None:
    """Refuse a request that could never be admitted, or whose answer would be too big.

    Args:
        plan: the request's plan (one prompt's, for a completion).
        generations: how many generations the request runs at once (choices in all).
        capacity: the most the model and server hold at once (``Runtime.capacity``):
            more could never all be admitted, and a 429 would have the client retry
            in vain.
        default_max_tokens: the model's tokens per generation when the request sets none.

    Raises:
        InvalidArgument: naming ``n``, or the field that asked for the alternatives.
    """
    if generations > capacity:
        raise InvalidArgument.field(
            "n",
            f"asks for {generations} generations at once; this model holds at most "
            f"{capacity} at a time",
        )
    if plan.logprobs is None:
        return
    tokens = int(plan.parameters.get("max_new_tokens", default_max_tokens))
    entries = generations * tokens * (1 + plan.logprobs)
    if entries > MAX_LOGPROB_ENTRIES:
        raise InvalidArgument.field(
            plan.logprobs_field,
            f"asks, with {generations} choices of up to {tokens} tokens, for {entries} log "
            f"probabilities; a request may ask for at most {MAX_LOGPROB_ENTRIES} (ask for "
            "fewer choices, tokens or alternatives)",
        )


def renamed(error: InvalidArgument, names: Mapping[str, str]) -> InvalidArgument:
    """``error`` with the runtime's field names put as ``names`` says, in its field
    violations and its message; a name followed by an index (``inputs[2]``) keeps it."""
    if not names:
        return error
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w.\[])(?:{alternatives})(?!\w)")

    def rename(text: str) -> str:
        return pattern.sub(lambda m: names[m[0]], text)

    return InvalidArgument(
        rename(error.message), [(rename(f), description) for f, description in error.violations]
    )
