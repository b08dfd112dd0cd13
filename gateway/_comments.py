"""Proto source comments, read from a ``FileDescriptorSet`` compiled with source info.

Compiled-in descriptors carry no comments, so the summaries and descriptions of the
OpenAPI document come from here: a mapping from full proto names to comment text.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator

from google.protobuf import descriptor_pb2

__all__ = ["comments_from_descriptor_set"]


def comments_from_descriptor_set(data: bytes) -> dict[str, str]:
    """Leading comments by full name, from a serialized ``FileDescriptorSet``.

    Keys are ``pkg.Service``, ``pkg.Service.Method``, ``pkg.Message``,
    ``pkg.Message.field``, ``pkg.Message.oneof``, ``pkg.Enum`` and
    ``pkg.Enum.VALUE`` (nested types under their parents). An element without a
    leading comment takes its trailing one; files compiled without
    ``--include_source_info`` give nothing.

    Raises:
        google.protobuf.message.DecodeError: ``data`` is not a FileDescriptorSet.
    """
    found: dict[str, str] = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        names = dict(_element_paths(file))
        for location in file.source_code_info.location:
            name = names.get(tuple(location.path))
            text = _clean(location.leading_comments or location.trailing_comments)
            if name is not None and text:
                found[name] = text
    return found


def _element_paths(
    file: descriptor_pb2.FileDescriptorProto,
) -> Iterator[tuple[tuple[int, ...], str]]:
    """(source path, full name) of every element, numbered as in descriptor.proto."""
    scope = f"{file.package}." if file.package else ""

    def enum(
        proto: descriptor_pb2.EnumDescriptorProto,
        path: tuple[int, ...],
        scope: str,
    ) -> Iterator[tuple[tuple[int, ...], str]]:
        name = scope + proto.name
        yield path, name
        for i, value in enumerate(proto.value):
            yield (*path, 2, i), f"{name}.{value.name}"

    def message(
        proto: descriptor_pb2.DescriptorProto,
        path: tuple[int, ...],
        scope: str,
    ) -> Iterator[tuple[tuple[int, ...], str]]:
        name = scope + proto.name
        yield path, name
        for i, field in enumerate(proto.field):
            yield (*path, 2, i), f"{name}.{field.name}"
        for i, nested in enumerate(proto.nested_type):
            yield from message(nested, (*path, 3, i), f"{name}.")
        for i, nested_enum in enumerate(proto.enum_type):
            yield from enum(nested_enum, (*path, 4, i), f"{name}.")
        for i, oneof in enumerate(proto.oneof_decl):
            yield (*path, 8, i), f"{name}.{oneof.name}"

    for i, proto in enumerate(file.message_type):
        yield from message(proto, (4, i), scope)
    for i, enum_proto in enumerate(file.enum_type):
        yield from enum(enum_proto, (5, i), scope)
    for i, service in enumerate(file.service):
        yield (6, i), scope + service.name
        for j, method in enumerate(service.method):
            yield (6, i, 2, j), f"{scope}{service.name}.{method.name}"


def _clean(comment: str) -> str:
    # protoc keeps the space after `//` on every line; dedent takes it off evenly
    # and keeps deeper indentation (code samples in comments).
    return textwrap.dedent(comment).strip()
