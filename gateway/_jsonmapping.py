"""Protobuf's JSON mapping, as both halves of transcoding need it.

Which well-known types have a JSON form of their own (and which of those one URL
string can set), each integer type's range, the float types, whether a JSON value
parses into a message, and typed accessors for the descriptor attributes that the
stubs type as optional. Used by :mod:`protoserve.gateway._transcode` (the body),
:mod:`protoserve.gateway._urlvalues` (the path and the query) and
:mod:`protoserve.gateway._fieldwords` (their error messages).
"""

from __future__ import annotations

from typing import Any, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

__all__ = [
    "DURATION",
    "FIELD_MASK",
    "FLOATS",
    "INT_RANGES",
    "JSON_WKT",
    "TIMESTAMP",
    "URL_SCALAR_MESSAGES",
    "WRAPPERS",
    "containing_type",
    "descriptor_of",
    "enum_type",
    "is_map",
    "message_type",
    "parses",
]

# Well-known types that a single query or path string can set, as in a JSON body.
WRAPPERS = frozenset(
    f"google.protobuf.{name}"
    for name in (
        "DoubleValue", "FloatValue", "Int64Value", "UInt64Value", "Int32Value",
        "UInt32Value", "BoolValue", "StringValue", "BytesValue",
    )
)  # fmt: skip
TIMESTAMP = "google.protobuf.Timestamp"
DURATION = "google.protobuf.Duration"
FIELD_MASK = "google.protobuf.FieldMask"
URL_SCALAR_MESSAGES = WRAPPERS | {TIMESTAMP, DURATION, FIELD_MASK}
# Well-known types with a JSON form of their own that is not an object of their fields.
JSON_WKT = URL_SCALAR_MESSAGES | {
    "google.protobuf.Any",
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
}

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: ("int32", -(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: ("sint32", -(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: ("sfixed32", -(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: ("uint32", 0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: ("fixed32", 0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: ("int64", -(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: ("sint64", -(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: ("sfixed64", -(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: ("uint64", 0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: ("fixed64", 0, 2**64 - 1),
}
FLOATS = {FieldDescriptor.TYPE_FLOAT: "float", FieldDescriptor.TYPE_DOUBLE: "double"}


def parses(js: dict[str, Any], message_class: type[Message]) -> bool:
    """Whether json_format accepts ``js`` as a ``message_class`` (unknown fields refused)."""
    try:
        json_format.ParseDict(js, message_class(), ignore_unknown_fields=False)
    except (json_format.ParseError, ValueError, TypeError):
        return False
    return True


def is_map(field: FieldDescriptor) -> bool:
    """Whether ``field`` is a map (a repeated field of a map-entry message)."""
    return (
        field.type == FieldDescriptor.TYPE_MESSAGE
        and field.is_repeated
        and message_type(field).GetOptions().map_entry
    )


# The stubs type these as optional (or as a union with upb's classes); in the places
# they are read here they are always set.
def descriptor_of(message: Message) -> Descriptor:
    return cast(Descriptor, message.DESCRIPTOR)


def message_type(field: FieldDescriptor) -> Descriptor:
    assert field.message_type is not None, field.full_name
    return field.message_type


def containing_type(field: FieldDescriptor) -> Descriptor:
    assert field.containing_type is not None, field.full_name
    return field.containing_type


def enum_type(field: FieldDescriptor) -> EnumDescriptor:
    assert field.enum_type is not None, field.full_name
    return field.enum_type
