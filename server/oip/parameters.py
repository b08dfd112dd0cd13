"""Request parameters of the Open Inference Protocol, as each task takes them.

``InferParameter`` carries one bool, integer, double or string. Generation takes
the same parameters as v1's ``GenerationParameters`` (the runtime validates them
the same way); ``stop_sequences``, a list there, is a string holding a JSON array
here, as the protocol has no list value. Embedding takes ``normalize``; tensor
prediction passes every parameter to the model, as v1's Predict does.

Some names belong to the protocol's clients, not to models (Triton reserves
them): those that only tune delivery are dropped (perf_analyzer sends
``triton_enable_empty_final_response`` with every request), and those that ask
for a feature this server lacks (sequence batching, server-side timeouts) are
refused rather than silently ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from protoserve.oip.v2 import grpc_service_pb2 as pb
from protoserve.server.runtime.errors import FieldViolation, InvalidArgument

__all__ = ["embedding_parameters", "generation_parameters", "plain_parameters"]

STOP_SEQUENCES = "stop_sequences"
NORMALIZE = "normalize"
#: Client parameters that change nothing here: REST framing, forwarded headers, a
#: scheduling hint; and every ``triton_`` name.
_DROPPED = frozenset({"binary_data_output", "headers", "priority"})
_DROPPED_PREFIX = "triton_"
#: Client parameters for features this server does not have.
_UNSUPPORTED = {
    "sequence_id": "asks for sequence batching, which this server does not do",
    "sequence_start": "asks for sequence batching, which this server does not do",
    "sequence_end": "asks for sequence batching, which this server does not do",
    "timeout": "asks for a server-side timeout, which this server does not keep; "
    "set a gRPC deadline instead",
}


def plain_parameters(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """The model's parameters as plain values (bool, int, float, str); the clients'
    own (see the module docstring) left out.

    Raises:
        InvalidArgument: a parameter that carries no value, or one asking for a
            feature the server does not have.
    """
    values: dict[str, Any] = {}
    violations: list[FieldViolation] = []
    for name, parameter in parameters.items():
        if name in _DROPPED or name.startswith(_DROPPED_PREFIX):
            continue
        which = parameter.WhichOneof("parameter_choice")
        if name in _UNSUPPORTED:
            violations.append((f"parameters.{name}", _UNSUPPORTED[name]))
        elif which is None:
            violations.append((f"parameters.{name}", "has no value"))
        else:
            values[name] = getattr(parameter, which)
    if violations:
        raise InvalidArgument(
            "invalid parameters: " + "; ".join(f"{f} {d}" for f, d in violations), violations
        )
    return values


def generation_parameters(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """The generation parameters a request set, for ``Runtime.generate`` to validate.

    Raises:
        InvalidArgument: a parameter without a value, or ``stop_sequences`` that is
            not a JSON array of strings.
    """
    values = plain_parameters(parameters)
    if STOP_SEQUENCES in values:
        values[STOP_SEQUENCES] = _string_list(values[STOP_SEQUENCES])
    return values


def _string_list(value: Any) -> list[str]:
    field = f"parameters.{STOP_SEQUENCES}"
    problem = 'must be a string holding a JSON array of strings, such as ["\\n\\n"]'
    if not isinstance(value, str):
        raise InvalidArgument.field(field, problem)
    try:
        parsed = json.loads(value)
    except ValueError:
        raise InvalidArgument.field(field, problem) from None
    if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
        raise InvalidArgument.field(field, problem)
    return parsed


def embedding_parameters(parameters: Mapping[str, pb.InferParameter]) -> bool:
    """``normalize`` (default true), the one parameter of embedding.

    Raises:
        InvalidArgument: any other parameter, or a ``normalize`` that is not a bool.
    """
    values = plain_parameters(parameters)
    violations: list[FieldViolation] = [
        (f"parameters.{name}", f"is not a parameter of embedding; it takes {NORMALIZE}")
        for name in values
        if name != NORMALIZE
    ]
    normalize = values.get(NORMALIZE, True)
    if not isinstance(normalize, bool):
        violations.append((f"parameters.{NORMALIZE}", "must be true or false (bool_param)"))
    if violations:
        raise InvalidArgument(
            "invalid parameters: " + "; ".join(f"{f} {d}" for f, d in violations), violations
        )
    return bool(normalize)
