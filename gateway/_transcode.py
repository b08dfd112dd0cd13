"""JSON over HTTP to protobuf and back, by the rules of google/api/http.proto.

A request message is filled from three places, in this order:

1. the body, by the rule's ``body``: ``"*"`` is the whole message, ``"field"`` is that
   field's value, ``""`` means no body at all;
2. the path variables, which win over a value the body gave the same field
   (http.proto: a field bound by the path "is passed via the URL path"; grpc-gateway
   likewise decodes the body first and then sets the path's fields over it);
3. the query string, for every leaf field that neither the path nor the body binds.

Values are converted by protobuf's own JSON mapping (``json_format``), also for the
path and the query, whose strings are first turned into the JSON the mapping expects:
so ``?seed=18446744073709551615``, ``?color=COLOR_RED`` and ``?ts=2024-05-01T12:00:00Z``
mean what they mean in a body. Every failure is an INVALID_ARGUMENT
:class:`GatewayError` carrying a ``google.rpc.BadRequest`` that names the field.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, cast

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from protoserve.gateway._errors import GatewayError, bad_request
from protoserve.gateway._rules import Binding

__all__ = ["build_request", "render_message", "render_response"]

# Well-known types that a single query or path string can set, as in a JSON body.
_WRAPPERS = frozenset(
    f"google.protobuf.{name}"
    for name in (
        "DoubleValue", "FloatValue", "Int64Value", "UInt64Value", "Int32Value",
        "UInt32Value", "BoolValue", "StringValue", "BytesValue",
    )
)  # fmt: skip
_TIMESTAMP = "google.protobuf.Timestamp"
_DURATION = "google.protobuf.Duration"
_FIELD_MASK = "google.protobuf.FieldMask"
_URL_SCALAR_MESSAGES = _WRAPPERS | {_TIMESTAMP, _DURATION, _FIELD_MASK}
# Well-known types with a JSON form of their own that is not an object of their fields.
_JSON_WKT = _URL_SCALAR_MESSAGES | {
    "google.protobuf.Any",
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
}

_INT_RANGES = {
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
_FLOATS = {FieldDescriptor.TYPE_FLOAT: "float", FieldDescriptor.TYPE_DOUBLE: "double"}
# URL values are stricter than Python's int()/float(), which json_format uses and which
# also take "1_000", " 7" and "infinity": a URL number is written as in JSON.
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?")
_FLOAT_WORDS = frozenset({"NaN", "Infinity", "-Infinity"})
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")
_FIELD_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Items parsed together while looking for the bad one in a long list or map.
_CHUNK = 64
# Deeper than this, _locate stops narrowing down and blames the object it is in.
_MAX_LOCATE_DEPTH = 100


def build_request(
    binding: Binding,
    path_params: Mapping[str, str],
    query: Sequence[tuple[str, str]],
    body: bytes,
    message_class: type[Message],
) -> Message:
    """The request message for one HTTP request.

    Args:
        binding: the rule the request matched.
        path_params: dotted field path -> decoded value, from the URL path.
        query: the query string's (key, value) pairs, in order; a repeated field
            takes the values of a key given several times.
        body: the raw request body; empty (or only whitespace) means no body.
        message_class: the method's request message class.

    Returns:
        The filled-in request message.

    Raises:
        GatewayError: INVALID_ARGUMENT (400) with a ``google.rpc.BadRequest`` naming
            the field, for: a body that is not UTF-8 JSON, an unknown field, a value
            of the wrong type, a body sent to a rule without one, a query parameter
            naming no field or a field that the path or the body binds, one given
            twice for a single field, or two members of one oneof; INTERNAL (500)
            when the rule names a field the message does not have.
    """
    message = message_class()
    if binding.body == "*":
        _merge_body(_load_json(body), message, "")
    elif binding.body:
        field = _descriptor(message).fields_by_name.get(binding.body)
        if field is None:
            raise _broken_rule(binding, f'its body "{binding.body}" is not a request field')
        _merge_body(_load_json(body), message, field.name)
    elif body.strip():
        raise bad_request(
            f"{binding.verb} {binding.template.pattern} takes no request body; "
            "send the request's fields as query parameters",
            "",
            "this method's HTTP rule has no body",
            reason="BODY_NOT_ALLOWED",
        )
    # The path after the body, so that the URL wins over a body that repeats a field.
    for field_path, text in path_params.items():
        try:
            chain = _resolve(_descriptor(message), field_path)
        except _Unaddressable as error:
            raise _broken_rule(binding, f'its path binds "{field_path}": {error}') from None
        _set_leaf(message, chain, [text], f'path parameter "{field_path}"', check_oneof=False)
    if query:
        bound = {*binding.template.fields, *path_params}
        _merge_query(message, query, binding.body, bound)
    return message


def render_message(message: Message, *, use_proto_names: bool = True) -> dict[str, Any]:
    """One message as proto3 JSON (a dict), as each event of a stream carries it.

    Fields without presence are always emitted, with their default values, as
    grpc-gateway v2's marshaler does (``EmitUnpopulated``); fields with presence
    (messages, ``optional`` scalars, oneof members) appear only when set. Names are
    the proto names (``generated_text``) unless ``use_proto_names`` is False
    (``generatedText``). For the few well-known types whose JSON is not an object
    (Timestamp, Duration, wrappers, Value, ...) the result is that JSON value.

    Raises:
        json_format.SerializeToJsonError, ValueError: a value with no JSON form,
            such as NaN in a ``google.protobuf.Value``.
    """
    return json_format.MessageToDict(
        message,
        always_print_fields_with_no_presence=True,
        preserving_proto_field_name=use_proto_names,
    )


def render_response(binding: Binding, message: Message, *, use_proto_names: bool = True) -> bytes:
    """A unary response's body: compact UTF-8 JSON of the message, as :func:`render_message`.

    With the rule's ``response_body`` set, only that field's value is rendered; an unset
    message field renders as its default message, an unset ``optional`` scalar or oneof
    member as ``null``.

    Raises:
        ValueError: ``response_body`` is not a field of the message, or a value has no
            JSON form (NaN in a ``google.protobuf.Value``).
    """
    value: Any
    if binding.response_body:
        field = _descriptor(message).fields_by_name.get(binding.response_body)
        if field is None:
            raise ValueError(
                f"response_body {binding.response_body!r} of {binding.method.full_name} "
                f"is not a field of {_descriptor(message).full_name}"
            )
        if field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated:
            value = render_message(getattr(message, field.name), use_proto_names=use_proto_names)
        else:
            whole = render_message(message, use_proto_names=use_proto_names)
            value = whole.get(field.name if use_proto_names else field.json_name)
    else:
        value = render_message(message, use_proto_names=use_proto_names)
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


# The body ----------------------------------------------------------------------------


class _Empty:
    """The value of an empty body."""


_EMPTY = _Empty()


class _BadJSON(ValueError):
    """Something Python's json module accepts but JSON (RFC 8259) does not."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate keys are an error, as in json_format.Parse: last-one-wins would hide a
    # client's mistake.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _BadJSON(f"the key {_shown(key)} appears twice in one object")
        result[key] = value
    return result


def _constant(name: str) -> Any:
    raise _BadJSON(f'{name} is not JSON; send it as the string "{name}"')


def _load_json(body: bytes) -> Any:
    if not body.strip():
        return _EMPTY
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise bad_request(
            f"the request body is not valid UTF-8 (byte {error.start})",
            "",
            f"invalid UTF-8 at byte {error.start}",
            reason="INVALID_UTF8",
        ) from None
    try:
        # RFC 8259 lets a parser ignore a byte order mark; Python's json refuses one.
        value = json.loads(text.removeprefix("\ufeff"), object_pairs_hook=_object,
                           parse_constant=_constant)  # fmt: skip
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}"
        raise bad_request(
            f"the request body is not valid JSON: {error.msg} at {where}",
            "",
            f"{error.msg} at {where}",
            reason="INVALID_JSON",
        ) from None
    except _BadJSON as error:
        raise bad_request(
            f"the request body is not valid JSON: {error}", "", str(error), reason="INVALID_JSON"
        ) from None
    except RecursionError:
        raise bad_request(
            "the request body is nested too deeply",
            "",
            "JSON nested too deeply",
            reason="INVALID_JSON",
        ) from None
    # "\ud800" is valid JSON but not Unicode text: no protobuf string can hold it, and
    # upb fails with SystemError on such a key, so refuse it before anything sees it.
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise bad_request(
            "the request body holds a lone UTF-16 surrogate (a \\uD800-\\uDFFF escape "
            "without its pair), which is not Unicode text",
            "",
            "lone surrogate escape",
            reason="INVALID_UTF8",
        )
    return value


def _has_lone_surrogate(value: Any) -> bool:
    # A loop, not recursion: the value may be nested as deep as json.loads allows.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _merge_body(value: Any, message: Message, field_name: str) -> None:
    """Parse a body into ``message``: the whole message, or its field ``field_name``."""
    if value is _EMPTY:
        return
    js = {field_name: value} if field_name else value
    descriptor = _descriptor(message)
    if not field_name and descriptor.full_name not in _JSON_WKT and not isinstance(js, dict):
        description = f"expected a JSON object ({descriptor.full_name}), not {_shown(js)}"
        raise _reject("the request body must be a JSON object", "", description, "INVALID_TYPE")
    try:
        json_format.ParseDict(js, message, ignore_unknown_fields=False)
    except (json_format.ParseError, ValueError, TypeError) as error:
        if "too deep" in str(error):  # json_format's own limit of 100 nested messages
            description = "messages nested more than 100 deep"
            raise _reject("invalid request body", "", description, "INVALID_JSON") from None
        field, description, reason = _locate(js, descriptor, "", 0, error)
        where = f'invalid field "{field}"' if field else "invalid request body"
        raise _reject(where, field, description, reason) from None


def _locate(
    js: Any, descriptor: Descriptor, path: str, depth: int, error: Exception
) -> tuple[str, str, str]:
    """Which field of a JSON object that failed to parse is wrong, and why.

    json_format's errors say so in prose that changes between releases; this walks the
    JSON instead, parsing one key at a time, down to the first key that fails alone.
    Only called on the error path.
    """
    name = descriptor.full_name
    if name in _JSON_WKT or depth > _MAX_LOCATE_DEPTH:
        return path, f"expected {_expected_message(descriptor)}, not {_shown(js)}", "INVALID_VALUE"
    if not isinstance(js, dict):
        return path, f"expected a JSON object ({name}), not {_shown(js)}", "INVALID_TYPE"
    fields = {
        **{f.name: f for f in descriptor.fields},
        **{f.json_name: f for f in descriptor.fields},
    }
    in_oneof: dict[str, str] = {}
    spelled: dict[str, str] = {}
    for key, value in js.items():
        field = fields.get(key)
        if field is None:
            return (
                _join(path, _clean(key)),
                f"unknown field {_shown(key)} in {name}",
                "UNKNOWN_FIELD",
            )
        if field.name in spelled:
            # Both the proto and the JSON name of one field in one object.
            description = f"given twice, as {_shown(spelled[field.name])} and {_shown(key)}"
            return _join(path, field.name), description, "DUPLICATE_FIELD"
        spelled[field.name] = key
        oneof = field.containing_oneof
        if oneof is not None and value is not None:
            if oneof.name in in_oneof:
                other = in_oneof[oneof.name]
                description = f'"{other}" and "{field.name}" are both in oneof "{oneof.name}"'
                return _join(path, field.name), f"{description}; set one", "ONEOF_CONFLICT"
            in_oneof[oneof.name] = field.name
    message_class = message_factory.GetMessageClass(descriptor)
    for key, value in js.items():
        field = fields[key]
        if _parses({key: value}, message_class):
            continue
        here = _join(path, field.name)
        if _is_map(field):
            return _locate_map(field, value, here, depth, error)
        if field.is_repeated:
            if not isinstance(value, list):
                return here, f"expected a JSON array, not {_shown(value)}", "INVALID_TYPE"
            index = _first_bad(field.name, value, message_class)
            if index is None:
                return here, _reason(error), "INVALID_VALUE"
            return _locate_value(field, value[index], f"{here}[{index}]", depth, error)
        return _locate_value(field, value, here, depth, error)
    # Every key parses alone: a problem json_format found with the object as a whole.
    return path, _reason(error), "INVALID_VALUE"


def _locate_map(
    field: FieldDescriptor, value: Any, here: str, depth: int, error: Exception
) -> tuple[str, str, str]:
    if not isinstance(value, dict):
        return here, f"expected a JSON object (a map), not {_shown(value)}", "INVALID_TYPE"
    entry = _message_type(field)
    key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
    parent = message_factory.GetMessageClass(_containing_type(field))
    entries = list(value.items())
    index = _first_bad(field.name, entries, parent, as_map=True)
    if index is None:
        return here, _reason(error), "INVALID_VALUE"
    key, item = entries[index]
    at = f"{here}[{_clean(key)}]"
    if not _map_key_ok(key_field, key):
        return at, f"expected a map key of type {_type_name(key_field)}", "INVALID_KEY"
    return _locate_value(value_field, item, at, depth, error)


def _locate_value(
    field: FieldDescriptor, value: Any, here: str, depth: int, error: Exception
) -> tuple[str, str, str]:
    if value is None:
        return here, "null is not allowed here", "INVALID_VALUE"
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _locate(value, _message_type(field), here, depth + 1, error)
    return here, f"expected {_expected(field)}, not {_shown(value)}", "INVALID_VALUE"


def _first_bad(
    name: str, items: list[Any], message_class: type[Message], *, as_map: bool = False
) -> int | None:
    """The index of the first item of a list (or map entry) that fails alone, or None.

    Chunks first, then one by one within the bad chunk: finding item 10,000 of a list
    costs about one parse of the list, not ten thousand separate parses (json_format's
    per-call cost dwarfs its per-item cost).
    """

    def bad(start: int, stop: int) -> bool:
        chunk = items[start:stop]
        return not _parses({name: dict(chunk) if as_map else chunk}, message_class)

    for start in range(0, len(items), _CHUNK):
        stop = min(start + _CHUNK, len(items))
        if bad(start, stop):
            for index in range(start, stop):
                if bad(index, index + 1):
                    return index
    return None


def _parses(js: dict[str, Any], message_class: type[Message]) -> bool:
    try:
        json_format.ParseDict(js, message_class(), ignore_unknown_fields=False)
    except (json_format.ParseError, ValueError, TypeError):
        return False
    return True


def _map_key_ok(key_field: FieldDescriptor, key: str) -> bool:
    if key_field.type == FieldDescriptor.TYPE_BOOL:
        return key in ("true", "false")
    if key_field.type in _INT_RANGES:
        _, low, high = _INT_RANGES[key_field.type]
        return re.fullmatch(r"-?\d+", key) is not None and low <= int(key) <= high
    return True


# The path and the query --------------------------------------------------------------


class _Unaddressable(ValueError):
    """A dotted field path that names no field a URL can set."""

    def __init__(self, description: str, reason: str = "UNSUPPORTED_FIELD") -> None:
        super().__init__(description)
        self.reason = reason


def _resolve(descriptor: Descriptor, dotted: str) -> list[FieldDescriptor]:
    """The fields along ``dotted`` (proto or JSON names), ending at one a URL can set.

    Raises:
        _Unaddressable: no such field, or one a single string cannot set: a map, a
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
            kind = _type_name(chain[-1])
            raise _Unaddressable(f'"{so_far}" ({kind}) has no fields', "UNKNOWN_FIELD")
        field = current.fields_by_name.get(part) or _by_json_name(current, part)
        if field is None:
            raise _Unaddressable(
                f"{current.full_name} has no field {_shown(part)}", "UNKNOWN_FIELD"
            )
        chain.append(field)
        here = ".".join(f.name for f in chain)
        last = index == len(parts) - 1
        if _is_map(field):
            raise _Unaddressable(f'"{here}" is a map: those cannot be set from the URL')
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            current = None
            continue
        if field.is_repeated:
            raise _Unaddressable(f'"{here}" is a repeated message: those cannot be set from '
                                 "the URL (google/api/http.proto)")  # fmt: skip
        type_name = _message_type(field).full_name
        if type_name in _URL_SCALAR_MESSAGES:
            current = None
        elif type_name in _JSON_WKT:
            raise _Unaddressable(f'"{here}" is a {type_name}: it cannot be set from the URL')
        elif last:
            raise _Unaddressable(f'"{here}" is a message: set its fields, as in "{here}.<field>"')
        else:
            current = _message_type(field)
    return chain


def _merge_query(
    message: Message, query: Sequence[tuple[str, str]], body: str, bound: set[str]
) -> None:
    grouped: dict[str, list[str]] = {}
    for key, value in query:
        grouped.setdefault(key, []).append(value)
    for key, values in grouped.items():
        source = f"query parameter {_shown(key)}"
        try:
            chain = _resolve(_descriptor(message), key)
        except _Unaddressable as error:
            what = "unknown" if error.reason == "UNKNOWN_FIELD" else "unusable"
            raise bad_request(
                f"{what} {source}: {error}", _clean(key), str(error), reason=error.reason
            ) from None
        path = ".".join(f.name for f in chain)
        if path in bound or any(path.startswith(f"{b}.") for b in bound):
            description = f'"{path}" is set by the URL path, not the query string'
            raise _reject(source, path, description, "FIELD_BOUND_BY_PATH")
        if body == "*" or chain[0].name == body:
            # http.proto: with body "*" there are no query parameters at all.
            description = f'"{path}" is set by the request body, not the query string'
            raise _reject(source, path, description, "FIELD_BOUND_BY_BODY")
        _set_leaf(message, chain, values, source, check_oneof=True)


def _set_leaf(
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
        raise _reject(source, path, description, "TOO_MANY_VALUES")
    if leaf.type == FieldDescriptor.TYPE_MESSAGE and _message_type(leaf).full_name == _FIELD_MASK:
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
            if not _parses({leaf.name: [js] if leaf.is_repeated else js}, type(target)):
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
        raise _reject(source, path, description, "ONEOF_CONFLICT")


def _url_json(field: FieldDescriptor, text: str, path: str, source: str) -> Any:
    """The JSON value a URL string stands for, for json_format to convert."""
    scalar = field
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if _message_type(field).full_name not in _WRAPPERS:
            return text  # Timestamp, Duration: their JSON form is this very string
        scalar = _message_type(field).fields_by_name["value"]
    kind = scalar.type
    if kind == FieldDescriptor.TYPE_BOOL:
        # Only JSON's spelling: "1", "yes" or "True" might be meant as anything.
        if text in ("true", "false"):
            return text == "true"
        _invalid(field, text, path, source)
    if kind in _FLOATS:
        if text in _FLOAT_WORDS:
            return text
        if not _NUMBER.fullmatch(text):
            _invalid(field, text, path, source)
        # A number, not the string: json_format range-checks floats only when given
        # numbers ("1e40" would silently become infinity in a float field).
        return float(text)
    if kind in _INT_RANGES:
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
            raise _reject(f"invalid {source}", path, f"{_shown(part)} is not a field path")
        # The JSON mapping writes mask paths in lowerCamelCase, URLs and people often
        # in the proto's snake_case: take both, as the paths themselves are snake_case.
        snake = part if "_" in part else re.sub(r"[A-Z]", lambda m: "_" + m[0].lower(), part)
        paths.append(snake)
    return paths


def _invalid(field: FieldDescriptor, text: str, path: str, source: str) -> NoReturn:
    description = f"expected {_expected(field)}, not {_shown(text)}"
    raise _reject(f"invalid {source}", path, description)


def _reject(where: str, path: str, description: str, reason: str = "INVALID_VALUE") -> GatewayError:
    return bad_request(f"{where}: {description}", path, description, reason=reason)


def _broken_rule(binding: Binding, problem: str) -> GatewayError:
    # A rule that names a field the message lacks is the service's bug, not the
    # client's: 500, and the message says which rule.
    return GatewayError(
        grpc.StatusCode.INTERNAL,
        f"the HTTP rule {binding.verb} {binding.template.pattern} of "
        f"{binding.method.full_name} is broken: {problem}",
    )


# Words for messages -------------------------------------------------------------------


def _expected(field: FieldDescriptor) -> str:
    """What a value of a (singular) field must look like, for error messages."""
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return _expected_message(_message_type(field))
    if kind == FieldDescriptor.TYPE_ENUM:
        return f"a {_enum_type(field).full_name} name or number"
    if kind in _INT_RANGES:
        name, low, high = _INT_RANGES[kind]
        return f"an integer from {low} to {high} ({name})"
    if kind in _FLOATS:
        return f'a number ({_FLOATS[kind]}), "NaN", "Infinity" or "-Infinity"'
    if kind == FieldDescriptor.TYPE_BOOL:
        return "true or false"
    if kind == FieldDescriptor.TYPE_BYTES:
        return "base64 (standard or URL-safe)"
    return "a string"


def _expected_message(descriptor: Descriptor) -> str:
    name = descriptor.full_name
    if name in _WRAPPERS:
        return _expected(descriptor.fields_by_name["value"])
    return {
        _TIMESTAMP: 'an RFC 3339 timestamp such as "2024-05-01T12:00:00Z"',
        _DURATION: 'a duration in seconds such as "1.5s"',
        _FIELD_MASK: 'comma-separated lowerCamelCase field paths such as "fooBar,baz"',
        "google.protobuf.Struct": "a JSON object",
        "google.protobuf.ListValue": "a JSON array",
        "google.protobuf.Value": "a JSON value",
        "google.protobuf.Any": 'a JSON object with a resolvable "@type"',
    }.get(name, f"a JSON object ({name})")


def _type_name(field: FieldDescriptor) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _message_type(field).full_name
    if field.type == FieldDescriptor.TYPE_ENUM:
        return _enum_type(field).full_name
    if field.type in _INT_RANGES:
        return _INT_RANGES[field.type][0]
    if field.type in _FLOATS:
        return _FLOATS[field.type]
    return {FieldDescriptor.TYPE_BOOL: "bool", FieldDescriptor.TYPE_BYTES: "bytes"}.get(
        field.type, "string"
    )


def _shown(value: Any) -> str:
    """A client's value as JSON (a string in quotes), short, for a message."""
    return _clean(json.dumps(value, ensure_ascii=False))


def _clean(text: str, limit: int = 60) -> str:
    """Client text fit for a message: short, and without lone surrogates (which
    would not encode as UTF-8) from JSON's ``\\ud800`` escapes."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _reason(error: Exception) -> str:
    """The innermost message of a json_format error, without its ' at Path' tail."""
    while error.__cause__ is not None and isinstance(error.__cause__, Exception):
        error = error.__cause__
    return _clean(re.sub(r'\s+at\s+"?[\w.\[\]]*"?\.?$', "", str(error)), limit=200)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.type == FieldDescriptor.TYPE_MESSAGE
        and field.is_repeated
        and _message_type(field).GetOptions().map_entry
    )


def _by_json_name(descriptor: Descriptor, name: str) -> FieldDescriptor | None:
    for field in descriptor.fields:
        if field.json_name == name:
            return field
    return None


# The stubs type these as optional (or as a union with upb's classes); in the places
# they are read here they are always set.
def _descriptor(message: Message) -> Descriptor:
    return cast(Descriptor, message.DESCRIPTOR)


def _message_type(field: FieldDescriptor) -> Descriptor:
    assert field.message_type is not None, field.full_name
    return field.message_type


def _containing_type(field: FieldDescriptor) -> Descriptor:
    assert field.containing_type is not None, field.full_name
    return field.containing_type


def _enum_type(field: FieldDescriptor) -> EnumDescriptor:
    assert field.enum_type is not None, field.full_name
    return field.enum_type
