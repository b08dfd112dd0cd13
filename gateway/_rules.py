"""HTTP bindings of gRPC methods, read from their ``google.api.http`` options.

The gateway serves any gRPC service, so descriptors come from two places: the
default pool (compiled-in ``*_pb2`` modules) and a separate
``descriptor_pool.DescriptorPool`` built from a ``FileDescriptorSet`` (a file, or
server reflection). In the second case ``MethodDescriptor.GetOptions()`` may hold
``google.api.http`` as an unknown field: whether the extension resolves depends on
whether ``google.api.annotations_pb2`` was imported before the options were first
parsed. So the options are always re-parsed from their bytes into the default
pool's ``MethodOptions``, where this module's import has registered the extension.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import cast

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)

from protoserve.gateway._template import PathTemplate, TemplateError

__all__ = ["Binding", "HttpRuleError", "bindings_for"]

# The wrappers that JSON maps to their scalar, so a path value can fill them.
_WRAPPERS = frozenset(
    f"google.protobuf.{name}Value"
    for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)
# An HTTP method is an RFC 9110 token; "*" is http.proto's "any method".
_HTTP_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class HttpRuleError(ValueError):
    """A ``google.api.http`` rule that http.proto does not allow for its method."""


@dataclass(frozen=True)
class Binding:
    """One way to reach a gRPC method over HTTP.

    Attributes:
        method: the gRPC method.
        verb: the HTTP method, upper case ("GET", "POST", ...; a custom rule's kind).
        template: the parsed path template.
        body: "" (no body), "*" (the whole request message) or a top-level field name.
        response_body: "" (the whole response message) or a top-level field name.
        index: 0 for the main rule, 1.. for additional_bindings (stable ordering, docs).
        generated: True for the default ``POST /{package.Service}/{Method}`` binding of a
            method that has no rule.
    """

    method: MethodDescriptor
    verb: str
    template: PathTemplate
    body: str
    response_body: str = ""
    index: int = 0
    generated: bool = False


def bindings_for(service: ServiceDescriptor) -> list[Binding]:
    """Every binding of every method of ``service`` (rule, then additional_bindings).

    Methods come in declaration order. A method without a ``google.api.http`` rule
    gets one generated binding, ``POST /{package.Service}/{Method}`` with body
    ``*``, so that every method is reachable. A ``custom`` rule's kind is
    upper-cased; ``*`` (any HTTP method) is kept as is.

    Works for descriptors of the default pool and of any separate
    ``DescriptorPool`` (see the module docstring).

    Raises:
        HttpRuleError: (a ``ValueError``) a rule breaks http.proto; the message
            names the method, the binding and the problem: no pattern, an invalid
            template, a path variable that is not a non-repeated scalar (or wrapper)
            field of the request, a ``body`` or ``response_body`` that is not a
            top-level field, or ``additional_bindings`` nested in another.
    """
    bindings: list[Binding] = []
    for method in service.methods:
        rule = _http_rule(method)
        if rule is None:
            template = PathTemplate.parse(f"/{service.full_name}/{method.name}")
            bindings.append(Binding(method, "POST", template, "*", generated=True))
            continue
        bindings.append(_binding(method, rule, 0))
        for index, extra in enumerate(rule.additional_bindings, start=1):
            if extra.additional_bindings:
                raise _error(method, index, "additional_bindings must not nest (http.proto)")
            bindings.append(_binding(method, extra, index))
    return bindings


def _http_rule(method: MethodDescriptor) -> http_pb2.HttpRule | None:
    """The method's ``google.api.http`` rule, or None, whatever pool it came from."""
    options = descriptor_pb2.MethodOptions.FromString(method.GetOptions().SerializeToString())
    if not options.HasExtension(annotations_pb2.http):
        return None
    return cast(http_pb2.HttpRule, options.Extensions[annotations_pb2.http])


def _error(method: MethodDescriptor, index: int, problem: str) -> HttpRuleError:
    where = "rule" if index == 0 else f"additional_bindings[{index - 1}]"
    return HttpRuleError(f"google.api.http {where} of {method.full_name}: {problem}")


def _binding(method: MethodDescriptor, rule: http_pb2.HttpRule, index: int) -> Binding:
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise _error(method, index, "sets no pattern (get, put, post, delete, patch or custom)")
    if kind == "custom":
        verb = rule.custom.kind.upper()
        path = rule.custom.path
        if not _HTTP_TOKEN.fullmatch(verb):
            raise _error(method, index, f"custom kind {rule.custom.kind!r} is not an HTTP method")
    else:
        verb = kind.upper()
        path = getattr(rule, kind)
    try:
        template = PathTemplate.parse(path)
    except TemplateError as exc:
        raise _error(method, index, str(exc)) from exc
    for field_path in template.fields:
        problem = _path_field_problem(method.input_type, field_path)
        if problem:
            raise _error(method, index, f"path variable {{{field_path}}}: {problem}")
    if rule.body not in ("", "*") and rule.body not in method.input_type.fields_by_name:
        raise _error(
            method,
            index,
            f"body {rule.body!r} is not '*' or a top-level field of {method.input_type.full_name}",
        )
    if rule.response_body and rule.response_body not in method.output_type.fields_by_name:
        raise _error(
            method,
            index,
            f"response_body {rule.response_body!r} is not a top-level field of "
            f"{method.output_type.full_name}",
        )
    return Binding(method, verb, template, rule.body, rule.response_body, index)


def _path_field_problem(message: Descriptor, field_path: str) -> str | None:
    """Why ``field_path`` cannot take a path value, or None where it can.

    Every step but the last must be a singular message field; the last a singular
    scalar, enum or wrapper field (http.proto: no repeated or map fields).
    """
    names = field_path.split(".")
    current = message
    for depth, name in enumerate(names):
        field: FieldDescriptor | None = current.fields_by_name.get(name)
        if field is None:
            return f"{current.full_name} has no field {name!r}"
        if field.is_repeated:
            # Maps are repeated entry messages, so this rejects them too.
            return f"{current.full_name}.{name} is repeated"
        submessage = field.message_type  # None unless a message (or group) field
        if depth < len(names) - 1:
            if submessage is None:
                return (
                    f"{current.full_name}.{name} is not a message, "
                    f"so it has no field {names[depth + 1]!r}"
                )
            current = submessage
        elif submessage is not None and submessage.full_name not in _WRAPPERS:
            return (
                f"{current.full_name}.{name} is a {submessage.full_name} message, "
                "not a scalar or wrapper"
            )
    return None
