"""How a model's generations decode: the decoder the runtime uses, chosen once at load.

Continuous batching (:class:`~protoserve.server.runtime.model.BatchDecoder`) decodes
every running sequence in one forward pass per step. By default a sequence's tokens
are then the ones it gets alone to float rounding (:attr:`Decoding.BATCHED`); with
batch invariance asked for (``--batch-invariant``) they must be the same bit for bit,
and only a decoder that promises that (:attr:`Decoding.BATCHED_EXACT`) is used.
Otherwise generations decode one sequence at a time. Whatever the outcome, the
server says it at start-up, and as a warning when the machine or the model took
batching away (docs/adr/0015-batch-invariance.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from protoserve.server.runtime.dispatch import describe_current
from protoserve.server.runtime.model import BatchDecoder, Decoding, Model, Task

__all__ = ["DecodingChoice", "choose_decoder"]

#: What decoding one sequence at a time costs, as measured: at 32 sequences, bytelm
#: stepping each alone gives 0.18-0.28 of the tokens per second of one batched forward
#: pass (bench/decoding.py, every dispatch path of an AMD EPYC), and a server 0.30
#: (1.49x one stream instead of 4.92x, on the Intel Xeon of issue #13).
_SEQUENTIAL_COST = (
    "each step runs the model once per sequence (for bytelm at 32 streams: a fifth to "
    "a third of batched decoding's tokens/s)"
)


@dataclass(frozen=True)
class DecodingChoice:
    """The decoder to use (None: generations take turns through ``generate``), how
    generations decode, and the start-up line that says so, at ``level``."""

    decoder: BatchDecoder | None
    decoding: Decoding | None
    message: str
    level: int = logging.INFO


def choose_decoder(
    model: Model, name: str, *, max_active: int, batching: bool, batch_invariant: bool
) -> DecodingChoice:
    """Ask ``model`` for its batch decoder (in the model's worker thread) and decide.

    Args:
        model: The loaded model.
        name: Its served name, for the message.
        max_active: Most sequences decoded at once.
        batching: The server's (or the model's own) batching setting.
        batch_invariant: Every sequence must get bit for bit its lone tokens.
    """
    if Task.TEXT_GENERATION not in model.tasks():
        return DecodingChoice(None, None, "")
    turns = f"model {name}: generations take turns, one step each"
    if not batching:
        return DecodingChoice(None, Decoding.SEQUENTIAL, f"{turns} (batching is off)")
    model.batch_invariant = batch_invariant
    decoder = model.batch_decoder(max_active)
    if decoder is None:
        return DecodingChoice(None, Decoding.SEQUENTIAL, f"{turns} (it has no batch decoder)")
    if batch_invariant and decoder.decoding is Decoding.BATCHED:
        return DecodingChoice(
            None,
            Decoding.SEQUENTIAL,
            f"{turns}: --batch-invariant asks that each get bit for bit its lone tokens, "
            f"which its batch decoder does not promise; {_SEQUENTIAL_COST}",
            logging.WARNING,
        )
    if decoder.decoding is Decoding.SEQUENTIAL:
        instead = (
            "; without --batch-invariant it decodes batched, to float rounding"
            if batch_invariant
            else ""
        )
        return DecodingChoice(
            decoder,
            Decoding.SEQUENTIAL,
            f"model {name}: generations decode one sequence at a time: "
            f"{decoder.decoding_note or 'its batch decoder says so'}, on {describe_current()}; "
            f"{_SEQUENTIAL_COST}{instead}",
            logging.WARNING,
        )
    if decoder.decoding is Decoding.BATCHED_EXACT:
        how = "each gets bit for bit its lone tokens"
    else:
        how = "each gets its lone tokens to float rounding (--batch-invariant: bit for bit)"
    return DecodingChoice(
        decoder,
        decoder.decoding,
        f"model {name}: generations decode batched, up to {max_active} per step; {how}",
    )
