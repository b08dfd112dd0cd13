"""Validating request parameters against what a model declares.

Every check names the field it rejects (``parameters.temperature``), so a
client sees which value to fix; all problems of a request are reported at once.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from typing import Any

from protoserve.server.runtime.errors import FieldViolation, InvalidArgument
from protoserve.server.runtime.model import (
    MAX_STOP_SEQUENCE_CHARS,
    MAX_TOP_LOGPROBS,
    GenerationParams,
    Model,
    Parameter,
    Task,
)

__all__ = ["check_logprobs", "validate_generation"]


def _check(spec: Parameter, value: Any, field: str) -> str | None:
    """What is wrong with ``value`` for ``spec``, or None when it is fine."""
    low, high = spec.minimum, spec.maximum
    if spec.type is list:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            return "must be a list of strings"
        if high is not None and len(value) > high:
            return f"at most {int(high)} items, got {len(value)}"
        for i, item in enumerate(value):
            if not item:
                return f"item {i} is empty"
            if len(item) > MAX_STOP_SEQUENCE_CHARS:
                return f"item {i} is longer than {MAX_STOP_SEQUENCE_CHARS} characters"
        return None
    if spec.type is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if spec.type is str:
        return None if isinstance(value, str) else "must be a string"
    if spec.type is int and (isinstance(value, bool) or not isinstance(value, int)):
        return "must be an integer"
    if spec.type is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "must be a number"
        if not math.isfinite(value):
            return "must be a finite number"
    if low is not None and high is not None and not low <= value <= high:
        return f"must be between {_fmt(low)} and {_fmt(high)}, got {_fmt(value)}"
    if low is not None and value < low:
        return f"must be at least {_fmt(low)}, got {_fmt(value)}"
    if high is not None and value > high:
        return f"must be at most {_fmt(high)}, got {_fmt(value)}"
    return None


def _fmt(number: float) -> str:
    return f"{number:g}" if isinstance(number, float) else str(number)


def validate_generation(model: Model, given: Mapping[str, Any]) -> GenerationParams:
    """Generation parameters from the values a request set, checked against the model's specs.

    Unset parameters take their defaults; an unset seed becomes a random one.

    Raises:
        InvalidArgument: with one field violation per bad or unknown parameter.
    """
    specs = {p.name: p for p in model.parameters() if p.task is Task.TEXT_GENERATION}
    violations: list[FieldViolation] = []
    values: dict[str, Any] = {}
    for name in given:
        if name not in specs:
            violations.append((f"parameters.{name}", "is not a parameter of this model"))
    for name, spec in specs.items():
        value = given.get(name, spec.default)
        if value is None:
            values[name] = None
            continue
        problem = _check(spec, value, f"parameters.{name}")
        if problem:
            violations.append((f"parameters.{name}", problem))
        values[name] = value
    if violations:
        raise InvalidArgument(
            "invalid parameters: " + "; ".join(f"{f} {d}" for f, d in violations), violations
        )
    seed = values.get("seed")
    return GenerationParams(
        max_new_tokens=int(values["max_new_tokens"]),
        temperature=float(values["temperature"]),
        top_k=int(values["top_k"]),
        top_p=float(values["top_p"]),
        seed=secrets.randbits(63) if seed is None else int(seed),
        stop_sequences=tuple(values.get("stop_sequences") or ()),
    )


def check_logprobs(name: str, model: Model, logprobs: int) -> None:
    """Check a request's ``logprobs``: 0 to :data:`MAX_TOP_LOGPROBS` alternatives, of a
    model that :attr:`~Model.supports_logprobs` (``name`` is the model's served name).

    Raises:
        InvalidArgument: naming field ``logprobs``.
    """
    if not model.supports_logprobs:
        raise InvalidArgument.field("logprobs", f"model {name!r} does not return log probabilities")
    if isinstance(logprobs, bool) or not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument.field(
            "logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}, got {logprobs}"
        )
