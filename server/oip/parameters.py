"""Request parameters of the Open Inference Protocol, as each task takes them.

``InferParameter`` carries one bool, integer, double or string. Generation takes
the same parameters as v1's ``GenerationParameters`` (the runtime validates them
the same way); ``stop_sequences``, a list there, is a string holding a JSON array
here, as the protocol has no list value. Embedding takes ``normalize``; tensor
prediction passes every parameter to the model, as v1's Predict does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from protoserve.oip.v2 import grpc_service_pb2 as pb
from protoserve.server.errors import FieldViolation, InvalidArgument

__all__ = ["embedding_parameters", "generation_parameters", "plain_parameters"]

STOP_SEQUENCES = "stop_sequences"
NORMALIZE = "normalize"


def plain_parameters(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """The parameters as plain values (bool, int, float, str).

    Raises:
        InvalidArgument: a parameter that carries no value.
    """
    values: dict[str, Any] = {}
    violations: list[FieldViolation] = []
    for name, parameter in parameters.items():
        which = parameter.WhichOneof("parameter_choice")
        if which is None:
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
