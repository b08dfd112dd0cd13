"""JSON Schemas of protobuf's JSON mapping: scalars, well-known types and google.rpc.Status.

The fixed part of the OpenAPI document (:mod:`protoserve.gateway._openapi`): what
each scalar and well-known type looks like on the wire, whatever the message.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor

__all__ = ["SCALARS", "SCALAR_LIKE", "STATUS", "STATUS_NAME", "WELL_KNOWN"]

Schema = dict[str, Any]

_F = FieldDescriptor
_INT32: Schema = {"type": "integer", "format": "int32"}
_UINT32: Schema = {"type": "integer", "format": "uint32", "minimum": 0}
# proto3 JSON writes 64-bit integers as strings: a JavaScript number would lose
# precision above 2**53. Input also takes JSON numbers, but strings always work.
_INT64: Schema = {"type": "string", "format": "int64"}
_UINT64: Schema = {"type": "string", "format": "uint64"}
_BYTES: Schema = {"type": "string", "format": "byte", "contentEncoding": "base64"}
SCALARS: dict[int, Schema] = {
    _F.TYPE_DOUBLE: {"type": "number", "format": "double"},
    _F.TYPE_FLOAT: {"type": "number", "format": "float"},
    _F.TYPE_INT32: _INT32,
    _F.TYPE_SINT32: _INT32,
    _F.TYPE_SFIXED32: _INT32,
    _F.TYPE_UINT32: _UINT32,
    _F.TYPE_FIXED32: _UINT32,
    _F.TYPE_INT64: _INT64,
    _F.TYPE_SINT64: _INT64,
    _F.TYPE_SFIXED64: _INT64,
    _F.TYPE_UINT64: _UINT64,
    _F.TYPE_FIXED64: _UINT64,
    _F.TYPE_BOOL: {"type": "boolean"},
    _F.TYPE_STRING: {"type": "string"},
    _F.TYPE_BYTES: _BYTES,
}


def _nullable(schema: Schema, what: str) -> Schema:
    # A wrapper's JSON is its bare value, or null when unset: OpenAPI 3.1 says
    # that with a type list, where 3.0 had `nullable`.
    return {**schema, "type": [schema["type"], "null"], "description": f"{what} or null."}


# Well-known types have their own JSON forms and are written inline: they are
# small, and `$ref: google.protobuf.Timestamp` tells a reader less than
# `format: date-time` does.
WELL_KNOWN: dict[str, Schema] = {
    "google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "description": "An RFC 3339 date-time, for example `2024-05-01T12:00:00.5Z`.",
    },
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "description": "Seconds with up to nine decimals and an `s` suffix, for example `1.5s`.",
    },
    "google.protobuf.FieldMask": {
        "type": "string",
        "description": "Comma-separated field paths in lowerCamelCase, for example `a.bC,d`.",
    },
    "google.protobuf.Struct": {
        "type": "object",
        "additionalProperties": True,
        "description": "Any JSON object.",
    },
    "google.protobuf.Value": {"description": "Any JSON value."},
    "google.protobuf.ListValue": {"type": "array", "items": {}, "description": "Any JSON array."},
    "google.protobuf.Empty": {"type": "object", "description": "An empty object."},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {
            "@type": {
                "type": "string",
                "description": "The message's type URL, for example "
                "`type.googleapis.com/google.rpc.ErrorInfo`.",
            }
        },
        "required": ["@type"],
        "additionalProperties": True,
        "description": "A message of the type named by `@type`, with that message's fields.",
    },
    "google.protobuf.DoubleValue": _nullable(SCALARS[_F.TYPE_DOUBLE], "A double"),
    "google.protobuf.FloatValue": _nullable(SCALARS[_F.TYPE_FLOAT], "A float"),
    "google.protobuf.Int64Value": _nullable(_INT64, "An int64 (as a string)"),
    "google.protobuf.UInt64Value": _nullable(_UINT64, "A uint64 (as a string)"),
    "google.protobuf.Int32Value": _nullable(_INT32, "An int32"),
    "google.protobuf.UInt32Value": _nullable(_UINT32, "A uint32"),
    "google.protobuf.BoolValue": _nullable({"type": "boolean"}, "A boolean"),
    "google.protobuf.StringValue": _nullable({"type": "string"}, "A string"),
    "google.protobuf.BytesValue": _nullable(_BYTES, "Base64 bytes"),
}
# Well-known types whose JSON is a single value, so they can be query parameters.
SCALAR_LIKE = {
    name
    for name, schema in WELL_KNOWN.items()
    if schema.get("type") not in (None, "object", "array")
}

STATUS_NAME = "google.rpc.Status"
STATUS: Schema = {
    "type": "object",
    "description": "An error: a gRPC status code, a message for people and details for "
    "programs (google.rpc.Status).",
    "properties": {
        "code": {
            "type": "integer",
            "format": "int32",
            "description": "The gRPC status code (google.rpc.Code), for example 5 for NOT_FOUND.",
        },
        "message": {"type": "string", "description": "What went wrong, in English."},
        "details": {
            "type": "array",
            "items": WELL_KNOWN["google.protobuf.Any"],
            "description": "Machine-readable details such as google.rpc.ErrorInfo, "
            "BadRequest or RetryInfo.",
        },
    },
}
