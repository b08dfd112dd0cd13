"""Words for the transcoder's error messages: what a field takes, and what it was given.

The pieces of an INVALID_ARGUMENT message that the body (:mod:`protoserve.gateway._transcode`)
and the URL (:mod:`protoserve.gateway._urlvalues`) share: the value a field expects, a
type's name, a client's value quoted short and safe, a json_format error's own words,
and :func:`reject`, which puts them into a :class:`GatewayError`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from protoserve.gateway._errors import GatewayError, bad_request
from protoserve.gateway._jsonmapping import (
    DURATION,
    FIELD_MASK,
    FLOATS,
    INT_RANGES,
    TIMESTAMP,
    WRAPPERS,
    enum_type,
    message_type,
)

__all__ = [
    "clean",
    "expected",
    "expected_message",
    "field_type_name",
    "join_path",
    "reason_of",
    "reject",
    "shown",
]


def reject(where: str, path: str, description: str, reason: str = "INVALID_VALUE") -> GatewayError:
    """An INVALID_ARGUMENT error: "``where``: ``description``", with a BadRequest for ``path``."""
    return bad_request(f"{where}: {description}", path, description, reason=reason)


def expected(field: FieldDescriptor) -> str:
    """What a value of a (singular) field must look like, for error messages."""
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return expected_message(message_type(field))
    if kind == FieldDescriptor.TYPE_ENUM:
        return f"a {enum_type(field).full_name} name or number"
    if kind in INT_RANGES:
        name, low, high = INT_RANGES[kind]
        return f"an integer from {low} to {high} ({name})"
    if kind in FLOATS:
        return f'a number ({FLOATS[kind]}), "NaN", "Infinity" or "-Infinity"'
    if kind == FieldDescriptor.TYPE_BOOL:
        return "true or false"
    if kind == FieldDescriptor.TYPE_BYTES:
        return "base64 (standard or URL-safe)"
    return "a string"


def expected_message(descriptor: Descriptor) -> str:
    """What a message's JSON must look like, for error messages."""
    name = descriptor.full_name
    if name in WRAPPERS:
        return expected(descriptor.fields_by_name["value"])
    return {
        TIMESTAMP: 'an RFC 3339 timestamp such as "2024-05-01T12:00:00Z"',
        DURATION: 'a duration in seconds such as "1.5s"',
        FIELD_MASK: 'comma-separated lowerCamelCase field paths such as "fooBar,baz"',
        "google.protobuf.Struct": "a JSON object",
        "google.protobuf.ListValue": "a JSON array",
        "google.protobuf.Value": "a JSON value",
        "google.protobuf.Any": 'a JSON object with a resolvable "@type"',
    }.get(name, f"a JSON object ({name})")


def field_type_name(field: FieldDescriptor) -> str:
    """A field's type as a proto file writes it: ``int64``, ``pkg.Message``."""
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_type(field).full_name
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enum_type(field).full_name
    if field.type in INT_RANGES:
        return INT_RANGES[field.type][0]
    if field.type in FLOATS:
        return FLOATS[field.type]
    return {FieldDescriptor.TYPE_BOOL: "bool", FieldDescriptor.TYPE_BYTES: "bytes"}.get(
        field.type, "string"
    )


def shown(value: Any) -> str:
    """A client's value as JSON (a string in quotes), short, for a message."""
    return clean(json.dumps(value, ensure_ascii=False))


def clean(text: str, limit: int = 60) -> str:
    """Client text fit for a message: short, and without lone surrogates (which
    would not encode as UTF-8) from JSON's ``\\ud800`` escapes."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def reason_of(error: Exception) -> str:
    """The innermost message of a json_format error, without its ' at Path' tail."""
    while error.__cause__ is not None and isinstance(error.__cause__, Exception):
        error = error.__cause__
    return clean(re.sub(r'\s+at\s+"?[\w.\[\]]*"?\.?$', "", str(error)), limit=200)


def join_path(path: str, name: str) -> str:
    """``path.name``, or ``name`` at the top level."""
    return f"{path}.{name}" if path else name
