"""Log probabilities of generated tokens, from the real bytelm through the runtime.

Each token's ``logprob`` is the model's own (``log_softmax`` of its raw logits), so
a separate forward pass over the prompt and the generated ids must find the same
numbers; continuous batching and one sequence at a time must agree.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
import torch

from protoserve.server.models import bytelm
from protoserve.server.models.builtin import ByteLMModel
from protoserve.server.runtime import FinishReason, GenerateResult, Token
from protoserve.server.runtime.errors import InvalidArgument
from protoserve.server.runtime.model import MAX_TOP_LOGPROBS, ChatMessage
from tests.server._runtime import run, started
from tests.server.models_for_tests import Scripted

PROMPTS = ["def ", "import os\n", "class Node:\n    def __init__(self", "for i in range("]
#: float32 logits through two different kernels (a cached decode step, one whole
#: forward pass): a log probability a little over 1e-6 apart is the same.
TOLERANCE = 1e-4


def forward_logprobs(prompt: str, generated: list[int]) -> torch.Tensor:
    """``log_softmax`` at each generated position, from one forward pass over it all."""
    model = bytelm.load_pretrained()
    ids = bytelm.encode(prompt) + generated
    with torch.inference_mode():
        logits, _ = model(torch.tensor([ids[:-1]]))
    first = len(bytelm.encode(prompt)) - 1
    return torch.log_softmax(logits[0, first:].float(), dim=-1)


def check_against_forward_pass(prompt: str, result: GenerateResult, k: int) -> None:
    assert [t.id for t in result.logprobs] == result.token_ids
    expected = forward_logprobs(prompt, result.token_ids)
    for position, token in enumerate(result.logprobs):
        row = expected[position]
        assert token.logprob is not None
        assert math.isclose(token.logprob, float(row[token.id]), abs_tol=TOLERANCE)
        values = [c.logprob for c in token.top_logprobs]
        assert len(values) == k
        assert values == sorted(values, reverse=True)
        best = torch.sort(row, descending=True, stable=True).values[:k].tolist()
        assert all(math.isclose(a, b, abs_tol=TOLERANCE) for a, b in zip(values, best, strict=True))
        for choice in token.top_logprobs:
            assert math.isclose(choice.logprob, float(row[choice.id]), abs_tol=TOLERANCE)
            assert choice.data == (bytes((choice.id,)) if choice.id < 256 else b"")


def test_sampled_tokens_carry_the_logprobs_of_a_separate_forward_pass() -> None:
    async def main() -> list[GenerateResult]:
        async with started(ByteLMModel()) as runtime:
            return [
                await runtime.generate(
                    "bytelm", prompt, {"max_new_tokens": 24, "seed": 3, "top_k": 20}, logprobs=5
                )
                for prompt in PROMPTS
            ]

    for prompt, result in zip(PROMPTS, run(main()), strict=True):
        # Before temperature and top-k: the model's own probabilities.
        check_against_forward_pass(prompt, result, 5)


def test_greedy_tokens_are_the_most_likely_and_both_decoding_paths_agree() -> None:
    greedy = {"max_new_tokens": 24, "temperature": 0}

    async def generations(**settings: Any) -> list[GenerateResult]:
        async with started(ByteLMModel(), **settings) as runtime:
            # Together, so that continuous batching steps them in one pass.
            return await asyncio.gather(
                *(runtime.generate("bytelm", p, greedy, logprobs=3) for p in PROMPTS)
            )

    batched = run(generations())
    alone = run(generations(batching=False))
    for prompt, one, other in zip(PROMPTS, batched, alone, strict=True):
        check_against_forward_pass(prompt, one, 3)
        for token in one.logprobs:
            assert token.top_logprobs[0].id == token.id
        assert (one.text, one.token_ids) == (other.text, other.token_ids)
        for a, b in zip(one.logprobs, other.logprobs, strict=True):
            assert a.logprob is not None and b.logprob is not None
            assert math.isclose(a.logprob, b.logprob, abs_tol=TOLERANCE)
            assert [c.id for c in a.top_logprobs] == [c.id for c in b.top_logprobs]


def test_chunks_carry_their_tokens_only_when_asked() -> None:
    params = {"max_new_tokens": 30, "seed": 5, "stop_sequences": ["(", ":"]}

    async def main() -> tuple[list[list[Token]], list[list[int]], list[list[Token]], Any]:
        async with started(ByteLMModel()) as runtime:
            asked = [c async for c in runtime.generate_stream("bytelm", "def ", params, logprobs=0)]
            plain = [c async for c in runtime.generate_stream("bytelm", "def ", params)]
            chat = [ChatMessage("user", "def ")]
            spaced = {**params, "stop_sequences": [" "]}
            result = await runtime.generate("bytelm", chat, spaced, logprobs=1)
        return (
            [c.logprobs for c in asked],
            [c.token_ids for c in asked],
            [c.logprobs for c in plain],
            result,
        )

    asked, ids, plain, chat = run(main())
    assert [[t.id for t in tokens] for tokens in asked] == ids
    assert all(t.logprob is not None and t.top_logprobs == () for c in asked for t in c)
    assert plain == [[] for _ in ids]
    # The token that completed the stop sequence is reported, as its id is.
    assert chat.finish_reason is FinishReason.STOP_SEQUENCE
    assert chat.token_ids[-1] == ord(" ") and " " not in chat.text
    assert [t.id for t in chat.logprobs] == chat.token_ids
    assert all(len(t.top_logprobs) == 1 for t in chat.logprobs)


def test_logprobs_a_model_cannot_give_or_out_of_range_are_refused() -> None:
    async def main() -> list[Any]:
        found = []
        async with started(Scripted()) as runtime:
            with pytest.raises(InvalidArgument) as caught:
                await runtime.generate("scripted", "x", {}, logprobs=0)
            found.append(caught.value.violations)
        async with started(ByteLMModel()) as runtime:
            for bad in (-1, MAX_TOP_LOGPROBS + 1):
                with pytest.raises(InvalidArgument) as caught:
                    await runtime.generate("bytelm", "x", {}, logprobs=bad)
                found.append(caught.value.violations)
            top = await runtime.generate(
                "bytelm", "x", {"max_new_tokens": 1}, logprobs=MAX_TOP_LOGPROBS
            )
            found.append(len(top.logprobs[0].top_logprobs))
        return found

    assert run(main()) == [
        [("logprobs", "model 'scripted' does not return log probabilities")],
        [("logprobs", "must be between 0 and 20, got -1")],
        [("logprobs", "must be between 0 and 20, got 21")],
        20,
    ]
