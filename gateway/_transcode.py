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

This module holds the public functions and reads the body; the path and the query are
set by :mod:`protoserve.gateway._urlvalues`, and both take their wording from
:mod:`protoserve.gateway._fieldwords` and their type facts from
:mod:`protoserve.gateway._jsonmapping`.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from protoserve.gateway._errors import GatewayError, bad_request
from protoserve.gateway._fieldwords import (
    clean,
    expected,
    expected_message,
    field_type_name,
    join_path,
    reason_of,
    reject,
    shown,
)
from protoserve.gateway._jsonmapping import (
    INT_RANGES,
    JSON_WKT,
    containing_type,
    descriptor_of,
    is_map,
    message_type,
    parses,
)
from protoserve.gateway._rules import Binding
from protoserve.gateway._urlvalues import Unaddressable, merge_query, resolve, set_leaf

__all__ = ["build_request", "render_message", "render_response"]

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Items parsed together while looking for the bad one in a long list or map.
_CHUNK = 64
# Deeper than this, _locate stops narrowing down and blames the object it is in.
_MAX_LOCATE_DEPTH = 100


_STRING = FieldDescriptor.TYPE_STRING


@functools.lru_cache(maxsize=4096)
def _path_chain(descriptor: Descriptor, field_path: str) -> tuple[FieldDescriptor, ...]:
    """``resolve`` of a path parameter, once per message type and field path (the
    templates bound both; an Unaddressable one is not cached, and raises each time)."""
    return tuple(resolve(descriptor, field_path))


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
        field = descriptor_of(message).fields_by_name.get(binding.body)
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
            chain = _path_chain(descriptor_of(message), field_path)
        except Unaddressable as error:
            raise _broken_rule(binding, f'its path binds "{field_path}": {error}') from None
        leaf = chain[-1]
        if len(chain) == 1 and leaf.type == _STRING and not leaf.is_repeated and text.isascii():
            # A plain string field (a model's name): what json_format would do, at a
            # fraction of its cost on every request (ASCII holds no lone surrogate).
            setattr(message, leaf.name, text)
            continue
        set_leaf(message, chain, [text], f'path parameter "{field_path}"', check_oneof=False)
    if query:
        bound = {*binding.template.fields, *path_params}
        merge_query(message, query, binding.body, bound)
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
        field = descriptor_of(message).fields_by_name.get(binding.response_body)
        if field is None:
            raise ValueError(
                f"response_body {binding.response_body!r} of {binding.method.full_name} "
                f"is not a field of {descriptor_of(message).full_name}"
            )
        if field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated:
            value = render_message(getattr(message, field.name), use_proto_names=use_proto_names)
        else:
            whole = render_message(message, use_proto_names=use_proto_names)
            value = whole.get(field.name if use_proto_names else field.json_name)
    else:
        value = render_message(message, use_proto_names=use_proto_names)
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _broken_rule(binding: Binding, problem: str) -> GatewayError:
    # A rule that names a field the message lacks is the service's bug, not the
    # client's: 500, and the message says which rule.
    return GatewayError(
        grpc.StatusCode.INTERNAL,
        f"the HTTP rule {binding.verb} {binding.template.pattern} of "
        f"{binding.method.full_name} is broken: {problem}",
    )


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
            raise _BadJSON(f"the key {shown(key)} appears twice in one object")
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
    descriptor = descriptor_of(message)
    if not field_name and descriptor.full_name not in JSON_WKT and not isinstance(js, dict):
        description = f"expected a JSON object ({descriptor.full_name}), not {shown(js)}"
        raise reject("the request body must be a JSON object", "", description, "INVALID_TYPE")
    try:
        json_format.ParseDict(js, message, ignore_unknown_fields=False)
    except (json_format.ParseError, ValueError, TypeError) as error:
        if "too deep" in str(error):  # json_format's own limit of 100 nested messages
            description = "messages nested more than 100 deep"
            raise reject("invalid request body", "", description, "INVALID_JSON") from None
        field, description, reason = _locate(js, descriptor, "", 0, error)
        where = f'invalid field "{field}"' if field else "invalid request body"
        raise reject(where, field, description, reason) from None


def _locate(
    js: Any, descriptor: Descriptor, path: str, depth: int, error: Exception
) -> tuple[str, str, str]:
    """Which field of a JSON object that failed to parse is wrong, and why.

    json_format's errors say so in prose that changes between releases; this walks the
    JSON instead, parsing one key at a time, down to the first key that fails alone.
    Only called on the error path.
    """
    name = descriptor.full_name
    if name in JSON_WKT or depth > _MAX_LOCATE_DEPTH:
        return path, f"expected {expected_message(descriptor)}, not {shown(js)}", "INVALID_VALUE"
    if not isinstance(js, dict):
        return path, f"expected a JSON object ({name}), not {shown(js)}", "INVALID_TYPE"
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
                join_path(path, clean(key)),
                f"unknown field {shown(key)} in {name}",
                "UNKNOWN_FIELD",
            )
        if field.name in spelled:
            # Both the proto and the JSON name of one field in one object.
            description = f"given twice, as {shown(spelled[field.name])} and {shown(key)}"
            return join_path(path, field.name), description, "DUPLICATE_FIELD"
        spelled[field.name] = key
        oneof = field.containing_oneof
        if oneof is not None and value is not None:
            if oneof.name in in_oneof:
                other = in_oneof[oneof.name]
                description = f'"{other}" and "{field.name}" are both in oneof "{oneof.name}"'
                return join_path(path, field.name), f"{description}; set one", "ONEOF_CONFLICT"
            in_oneof[oneof.name] = field.name
    message_class = message_factory.GetMessageClass(descriptor)
    for key, value in js.items():
        field = fields[key]
        if parses({key: value}, message_class):
            continue
        here = join_path(path, field.name)
        if is_map(field):
            return _locate_map(field, value, here, depth, error)
        if field.is_repeated:
            if not isinstance(value, list):
                return here, f"expected a JSON array, not {shown(value)}", "INVALID_TYPE"
            index = _first_bad(field.name, value, message_class)
            if index is None:
                return here, reason_of(error), "INVALID_VALUE"
            return _locate_value(field, value[index], f"{here}[{index}]", depth, error)
        return _locate_value(field, value, here, depth, error)
    # Every key parses alone: a problem json_format found with the object as a whole.
    return path, reason_of(error), "INVALID_VALUE"


def _locate_map(
    field: FieldDescriptor, value: Any, here: str, depth: int, error: Exception
) -> tuple[str, str, str]:
    if not isinstance(value, dict):
        return here, f"expected a JSON object (a map), not {shown(value)}", "INVALID_TYPE"
    entry = message_type(field)
    key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
    parent = message_factory.GetMessageClass(containing_type(field))
    entries = list(value.items())
    index = _first_bad(field.name, entries, parent, as_map=True)
    if index is None:
        return here, reason_of(error), "INVALID_VALUE"
    key, item = entries[index]
    at = f"{here}[{clean(key)}]"
    if not _map_key_ok(key_field, key):
        return at, f"expected a map key of type {field_type_name(key_field)}", "INVALID_KEY"
    return _locate_value(value_field, item, at, depth, error)


def _locate_value(
    field: FieldDescriptor, value: Any, here: str, depth: int, error: Exception
) -> tuple[str, str, str]:
    if value is None:
        return here, "null is not allowed here", "INVALID_VALUE"
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _locate(value, message_type(field), here, depth + 1, error)
    return here, f"expected {expected(field)}, not {shown(value)}", "INVALID_VALUE"


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
        return not parses({name: dict(chunk) if as_map else chunk}, message_class)

    for start in range(0, len(items), _CHUNK):
        stop = min(start + _CHUNK, len(items))
        if bad(start, stop):
            for index in range(start, stop):
                if bad(index, index + 1):
                    return index
    return None


def _map_key_ok(key_field: FieldDescriptor, key: str) -> bool:
    if key_field.type == FieldDescriptor.TYPE_BOOL:
        return key in ("true", "false")
    if key_field.type in INT_RANGES:
        _, low, high = INT_RANGES[key_field.type]
        return re.fullmatch(r"-?\d+", key) is not None and low <= int(key) <= high
    return True
