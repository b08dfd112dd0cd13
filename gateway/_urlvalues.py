"""Setting request fields from the URL: path variables and query parameters.

Each value is one string, which is turned into the JSON that protobuf's JSON mapping
expects for the field and then parsed by ``json_format``, as a body's value would be:
so ``?seed=18446744073709551615``, ``?color=COLOR_RED`` and ``?ts=2024-05-01T12:00:00Z``
mean what they mean in a body. A field path may use proto or JSON names; maps and
repeated messages cannot be set from a URL (google/api/http.proto). Every failure is an
INVALID_ARGUMENT :class:`GatewayError` naming the field, or :class:`Unaddressable` for a
field path that names nothing a URL can set.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from typing import Any, NoReturn

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from protoserve.gateway._errors import bad_request
from protoserve.gateway._fieldwords import clean, expected, field_type_name, reject, shown
from protoserve.gateway._jsonmapping import (
    FIELD_MASK,
    FLOATS,
    INT_RANGES,
    JSON_WKT,
    URL_SCALAR_MESSAGES,
    WRAPPERS,
    descriptor_of,
    is_map,
    message_type,
    parses,
)

__all__ = ["Unaddressable", "merge_query", "resolve", "set_leaf"]

# URL values are stricter than Python's int()/float(), which json_format uses and which
# also take "1_000", " 7" and "infinity": a URL number is written as in JSON.
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?")
_FLOAT_WORDS = frozenset({"NaN", "Infinity", "-Infinity"})
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")
_FIELD_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class Unaddressable(ValueError):
    """A dotted field path that names no field a URL can set."""

    def __init__(self, description: str, reason: str = "UNSUPPORTED_FIELD") -> None:
        super().__init__(description)
        self.reason = reason


def resolve(descriptor: Descriptor, dotted: str) -> list[FieldDescriptor]:
    """The fields along ``dotted`` (proto or JSON names), ending at one a URL can set.

    Raises:
        Unaddressable: no such field, or one a single string cannot set: a map, a
            repeated message (http.proto forbids both in URLs), a message other than
            the well-known types with a string form (set its fields one by one), or
            Struct/Value/ListValue/Any (only a JSON body can hold them).
    """
    chain: list[FieldDescriptor] = []
    current: Descriptor | None = descriptor
    parts = dotted.split(".")
    for index, part in enumerate(parts):
        so_far = ".".join(f.name for f in chain)
        if current is None:
            kind = field_type_name(chain[-1])
            raise Unaddressable(f'"{so_far}" ({kind}) has no fields', "UNKNOWN_FIELD")
        field = current.fields_by_name.get(part) or _by_json_name(current, part)
        if field is None:
            raise Unaddressable(f"{current.full_name} has no field {shown(part)}", "UNKNOWN_FIELD")
        chain.append(field)
        here = ".".join(f.name for f in chain)
        last = index == len(parts) - 1
        if is_map(field):
            raise Unaddressable(f'"{here}" is a map: those cannot be set from the URL')
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            current = None
            continue
        if field.is_repeated:
            raise Unaddressable(f'"{here}" is a repeated message: those cannot be set from '
                                "the URL (google/api/http.proto)")  # fmt: skip
        type_name = message_type(field).full_name
        if type_name in URL_SCALAR_MESSAGES:
            current = None
        elif type_name in JSON_WKT:
            raise Unaddressable(f'"{here}" is a {type_name}: it cannot be set from the URL')
        elif last:
            raise Unaddressable(f'"{here}" is a message: set its fields, as in "{here}.<field>"')
        else:
            current = message_type(field)
    return chain


def merge_query(
    message: Message, query: Sequence[tuple[str, str]], body: str, bound: set[str]
) -> None:
    """Set the fields the query string names; a key given several times fills a list.

    ``body`` is the rule's body and ``bound`` the field paths the URL path binds: a key
    naming one of their fields is an error, as is a key naming no field a URL can set.
    """
    grouped: dict[str, list[str]] = {}
    for key, value in query:
        grouped.setdefault(key, []).append(value)
    for key, values in grouped.items():
        source = f"query parameter {shown(key)}"
        try:
            chain = resolve(descriptor_of(message), key)
        except Unaddressable as error:
            what = "unknown" if error.reason == "UNKNOWN_FIELD" else "unusable"
            raise bad_request(
                f"{what} {source}: {error}", clean(key), str(error), reason=error.reason
            ) from None
        path = ".".join(f.name for f in chain)
        if path in bound or any(path.startswith(f"{b}.") for b in bound):
            description = f'"{path}" is set by the URL path, not the query string'
            raise reject(source, path, description, "FIELD_BOUND_BY_PATH")
        if body == "*" or chain[0].name == body:
            # http.proto: with body "*" there are no query parameters at all.
            description = f'"{path}" is set by the request body, not the query string'
            raise reject(source, path, description, "FIELD_BOUND_BY_BODY")
        set_leaf(message, chain, values, source, check_oneof=True)


def set_leaf(
    message: Message,
    chain: Sequence[FieldDescriptor],
    values: Sequence[str],
    source: str,
    *,
    check_oneof: bool,
) -> None:
    """Set the field at the end of ``chain`` from URL strings (one per value).

    ``check_oneof`` makes setting a member of a oneof whose other member is already
    set an error (the query); the path, which wins over the body, sets it regardless.
    """
    path = ".".join(f.name for f in chain)
    leaf = chain[-1]
    target = message
    for depth, field in enumerate(chain):
        if check_oneof:
            _check_oneof(target, field, path, source)
        if depth < len(chain) - 1:
            target = getattr(target, field.name)
    if not leaf.is_repeated and len(values) > 1:
        description = f'"{path}" takes one value, not {len(values)}'
        raise reject(source, path, description, "TOO_MANY_VALUES")
    if leaf.type == FieldDescriptor.TYPE_MESSAGE and message_type(leaf).full_name == FIELD_MASK:
        mask = getattr(target, leaf.name)
        mask.SetInParent()
        mask.paths[:] = _mask_paths(values[0], path, source)
        return
    converted = [_url_json(leaf, value, path, source) for value in values]
    try:
        json_format.ParseDict({leaf.name: converted if leaf.is_repeated else converted[0]}, target)
    except (json_format.ParseError, ValueError, TypeError):
        # Name the value that failed: try them one by one (error path only).
        for value, js in zip(values, converted, strict=True):
            if not parses({leaf.name: [js] if leaf.is_repeated else js}, type(target)):
                _invalid(leaf, value, path, source)
        _invalid(leaf, values[-1], path, source)


def _check_oneof(target: Message, field: FieldDescriptor, path: str, source: str) -> None:
    oneof = field.containing_oneof
    if oneof is None:
        return
    current = target.WhichOneof(oneof.name)
    if current is not None and current != field.name:
        description = (
            f'"{field.name}" and "{current}" are both in oneof "{oneof.name}", '
            f'and "{current}" is already set'
        )
        raise reject(source, path, description, "ONEOF_CONFLICT")


def _url_json(field: FieldDescriptor, text: str, path: str, source: str) -> Any:
    """The JSON value a URL string stands for, for json_format to convert."""
    scalar = field
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if message_type(field).full_name not in WRAPPERS:
            return text  # Timestamp, Duration: their JSON form is this very string
        scalar = message_type(field).fields_by_name["value"]
    kind = scalar.type
    if kind == FieldDescriptor.TYPE_BOOL:
        # Only JSON's spelling: "1", "yes" or "True" might be meant as anything.
        if text in ("true", "false"):
            return text == "true"
        _invalid(field, text, path, source)
    if kind in FLOATS:
        if text in _FLOAT_WORDS:
            return text
        if not _NUMBER.fullmatch(text):
            _invalid(field, text, path, source)
        # A number, not the string: json_format range-checks floats only when given
        # numbers ("1e40" would silently become infinity in a float field).
        return float(text)
    if kind in INT_RANGES:
        if not _NUMBER.fullmatch(text):
            _invalid(field, text, path, source)
        return text  # a string: int64 digits stay exact
    if kind == FieldDescriptor.TYPE_BYTES:
        return _url_base64(field, text, path, source)
    return text  # strings; enums by name or number, which json_format both accepts


def _url_base64(field: FieldDescriptor, text: str, path: str, source: str) -> str:
    # A "+" of standard base64 that was not percent-encoded arrives as a space (form
    # decoding); a space is never base64, so it can only have been a "+".
    text = text.replace(" ", "+")
    if _BASE64.fullmatch(text):
        standard = text.replace("-", "+").replace("_", "/").rstrip("=")
        try:
            raw = base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
        except binascii.Error:
            pass
        else:
            return base64.b64encode(raw).decode("ascii")
    _invalid(field, text, path, source)


def _mask_paths(text: str, path: str, source: str) -> list[str]:
    """A FieldMask from a URL: comma-separated paths, snake_case or lowerCamelCase."""
    paths = []
    for part in filter(None, text.split(",")):
        if not _FIELD_PATH.fullmatch(part):
            raise reject(f"invalid {source}", path, f"{shown(part)} is not a field path")
        # The JSON mapping writes mask paths in lowerCamelCase, URLs and people often
        # in the proto's snake_case: take both, as the paths themselves are snake_case.
        snake = part if "_" in part else re.sub(r"[A-Z]", lambda m: "_" + m[0].lower(), part)
        paths.append(snake)
    return paths


def _invalid(field: FieldDescriptor, text: str, path: str, source: str) -> NoReturn:
    description = f"expected {expected(field)}, not {shown(text)}"
    raise reject(f"invalid {source}", path, description)


def _by_json_name(descriptor: Descriptor, name: str) -> FieldDescriptor | None:
    for field in descriptor.fields:
        if field.json_name == name:
            return field
    return None
