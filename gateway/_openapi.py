"""OpenAPI 3.1 documents for the gateway's HTTP bindings, built from proto descriptors.

The document describes what the gateway puts on the wire, not the proto as
written: protobuf's JSON mapping (int64 as strings, enums as names, bytes as
base64, well-known types in their special forms), requests split into path,
query and body as ``google.api.http`` says, Server-Sent Events or NDJSON for
server streaming, and ``google.rpc.Status`` for every error.

Compiled-in descriptors carry no source comments, so comments come separately,
as a mapping from full names to text; ``comments_from_descriptor_set`` (from
:mod:`protoserve.gateway._comments`, re-exported here) reads one from a
``FileDescriptorSet`` compiled with ``--include_source_info``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

from google.api import field_behavior_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
)

from protoserve.gateway._call import grpc_path
from protoserve.gateway._codecs import Codec
from protoserve.gateway._comments import comments_from_descriptor_set
from protoserve.gateway._errors import HTTP_STATUS
from protoserve.gateway._mapping_schemas import SCALAR_LIKE as _SCALAR_LIKE
from protoserve.gateway._mapping_schemas import SCALARS as _SCALARS
from protoserve.gateway._mapping_schemas import STATUS as _STATUS
from protoserve.gateway._mapping_schemas import STATUS_NAME as _STATUS_NAME
from protoserve.gateway._mapping_schemas import WELL_KNOWN as _WELL_KNOWN
from protoserve.gateway._rules import Binding
from protoserve.gateway._streaming import STREAM_FORMATS

__all__ = ["build_openapi", "comments_from_descriptor_set"]

Schema = dict[str, Any]

_F = FieldDescriptor

_INFO = """\
Generated from the gRPC service definitions. Every operation calls one gRPC method.

JSON follows protobuf's JSON mapping. Responses use the proto field names \
(`snake_case`); requests accept those or the lowerCamelCase JSON names. Fields \
left unset are still written, with their default value, except fields with \
explicit presence (`optional`, messages, oneof members). 64-bit integers are \
strings; enums are their value names (requests also take the numbers); bytes are \
base64; floats that are not finite are the strings `"NaN"`, `"Infinity"` and \
`"-Infinity"`.

Errors are `google.rpc.Status` JSON with an HTTP status derived from the gRPC \
code: {statuses}; 405 for a method not allowed on a path and 413 \
for a body that is too large.

Operations marked `x-codec` speak another protocol's format instead of protobuf's \
JSON mapping, bodies and errors alike: their schemas are the codec's."""


def _statuses() -> str:
    """``HTTP_STATUS`` in words: "INVALID_ARGUMENT, ... and OUT_OF_RANGE 400, ..., others 500"."""
    by_status: dict[int, list[str]] = {}
    for code in sorted(HTTP_STATUS, key=lambda code: code.value[0]):
        by_status.setdefault(HTTP_STATUS[code], []).append(code.name)
    parts = []
    for status, names in sorted(by_status.items()):
        if status not in (200, 500):
            listed = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
            parts.append(f"{listed} {status}")
    return ", ".join([*parts, "others 500"])


_DESCRIPTION = _INFO.format(statuses=_statuses())
# OpenAPI path items have no room for other HTTP methods (a rule's `custom` kind).
_VERBS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_VARIABLE = re.compile(r"\{\s*([\w.]+)\s*(?:=([^}]*))?\}")


def build_openapi(
    bindings: Sequence[Binding],
    *,
    title: str,
    version: str,
    comments: Mapping[str, str] | None = None,
    use_proto_names: bool = True,
    codecs: Mapping[str, Codec] | None = None,
) -> dict[str, Any]:
    """An OpenAPI 3.1.0 document describing ``bindings`` as the gateway serves them.

    One operation per binding; ``components.schemas`` holds every message and enum
    the operations reach, named by full proto name, plus ``google.rpc.Status``.

    Args:
        bindings: the HTTP bindings, in the order the gateway matches them; a later
            binding with the same verb and OpenAPI path as an earlier one is left out
            (where it is another method on the same template, a route methods share,
            the operation lists both in ``x-grpc-methods``).
        title: ``info.title``.
        version: ``info.version``.
        comments: full proto name -> comment, for summaries and descriptions
            (see ``comments_from_descriptor_set``).
        use_proto_names: whether responses use proto field names (the gateway's
            default) or lowerCamelCase JSON names; schemas name properties to match.
        codecs: full method name -> its codec: the codec, not protobuf's JSON mapping,
            describes the bodies of those methods' operations (``x-codec``).

    Returns:
        The document as JSON-ready dicts and lists.
    """
    schemas = _Schemas(comments or {}, use_proto_names)
    codecs = codecs or {}
    codec_schemas: dict[str, Schema] = {}
    services = _short_names({b.method.containing_service.full_name for b in bindings})
    paths: dict[str, dict[str, Any]] = {}
    tags: dict[str, Schema] = {}
    operation_ids: set[str] = set()
    #: (OpenAPI path, verb) -> the binding its operation describes.
    described: dict[tuple[str, str], Binding] = {}
    for binding in bindings:
        method = binding.method
        verb = binding.verb.lower()
        # The gateway calls non-server-streaming methods as unary ones: a
        # client-streaming method has no HTTP form to document.
        if method.client_streaming or verb not in _VERBS:
            continue
        item = paths.setdefault(binding.template.openapi_path(), {})
        if verb in item:
            earlier = described[binding.template.openapi_path(), verb]
            if earlier.template == binding.template and earlier.method is not method:
                # A route methods share (their codec chooses per request): one operation,
                # which names every method.
                shared = item[verb].setdefault("x-grpc-methods", [item[verb]["x-grpc-method"]])
                shared.append(grpc_path(method))
            continue
        described[binding.template.openapi_path(), verb] = binding
        service = method.containing_service
        tag = services[service.full_name]
        if tag not in tags:
            tags[tag] = {"name": tag, **_described(schemas.comment(service.full_name))}
        operation_id = f"{tag.replace('.', '_')}_{method.name}"
        if binding.index:
            operation_id += f"_{binding.index}"
        while operation_id in operation_ids:
            operation_id += "_"
        operation_ids.add(operation_id)
        codec = codecs.get(method.full_name)
        if codec is None:
            item[verb] = _operation(binding, operation_id, tag, schemas)
        else:
            item[verb] = _codec_operation(binding, operation_id, tag, schemas, codec)
            codec_schemas.update(copy.deepcopy(codec.openapi_schemas()))
    schemas.fill()
    # A codec's schemas are its own; a name the descriptors also use stays the descriptors'.
    for name, schema in codec_schemas.items():
        schemas.components.setdefault(name, schema)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": _DESCRIPTION},
        "tags": list(tags.values()),
        "paths": paths,
        "components": {"schemas": dict(sorted(schemas.components.items()))},
    }


def _summary(comment: str) -> str:
    """The first sentence of a comment's first paragraph."""
    paragraph = " ".join(comment.split("\n\n", 1)[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]


def _described(text: str, **extra: Any) -> Schema:
    return {"description": text, **extra} if text else dict(extra)


def _short_names(full_names: set[str]) -> dict[str, str]:
    """Service tags: the short name, or the full name where two packages share one."""
    short = [name.rsplit(".", 1)[-1] for name in full_names]
    return {
        name: name.rsplit(".", 1)[-1] if short.count(name.rsplit(".", 1)[-1]) == 1 else name
        for name in full_names
    }


class _Schemas:
    """JSON Schemas of messages and enums; components are filled lazily (recursion-safe)."""

    def __init__(self, comments: Mapping[str, str], use_proto_names: bool) -> None:
        self.comments = comments
        self.use_proto_names = use_proto_names
        self.components: dict[str, Schema] = {_STATUS_NAME: copy.deepcopy(_STATUS)}
        self._todo: list[Descriptor | EnumDescriptor] = []

    def comment(self, full_name: str) -> str:
        return self.comments.get(full_name, "")

    def ref(self, descriptor: Descriptor | EnumDescriptor) -> Schema:
        """A ``$ref`` to the component for ``descriptor``, queued for ``fill``.

        A well-known type is written inline instead.
        """
        known = _WELL_KNOWN.get(descriptor.full_name)
        if known is not None:
            return copy.deepcopy(known)
        if descriptor.full_name not in self.components:
            # The name is taken now, so a message that contains itself (directly or
            # not) refers to the component instead of expanding forever.
            self.components[descriptor.full_name] = {}
            self._todo.append(descriptor)
        return {"$ref": f"#/components/schemas/{descriptor.full_name}"}

    def fill(self) -> None:
        """Build every component ``ref`` has handed out a reference to."""
        while self._todo:
            descriptor = self._todo.pop()
            built = (
                self.message(descriptor)
                if isinstance(descriptor, Descriptor)
                else self._enum(descriptor)
            )
            self.components[descriptor.full_name].update(built)

    def name(self, field: FieldDescriptor) -> str:
        return field.name if self.use_proto_names else field.json_name

    def message(self, message: Descriptor, omit: frozenset[str] = frozenset()) -> Schema:
        """A message's object schema, without the fields named in ``omit``."""
        properties: dict[str, Schema] = {}
        required: list[str] = []
        notes: list[str] = []
        synthetic = _synthetic_oneofs(message)
        for oneof in message.oneofs:
            if oneof.name in synthetic:
                continue
            members = ", ".join(f"`{self.name(f)}`" for f in oneof.fields)
            notes.append(f"At most one of {members} is set (oneof `{oneof.name}`).")
        for field in message.fields:
            if field.name in omit:
                continue
            property_schema = self.field(field)
            member_of = field.containing_oneof
            if member_of is not None and member_of.name not in synthetic:
                note = f"Member of oneof `{member_of.name}`."
                property_schema["description"] = " ".join(
                    filter(None, [property_schema.get("description"), note])
                )
            properties[self.name(field)] = property_schema
            if field.is_required or field_behavior_pb2.REQUIRED in _behaviors(field):
                required.append(self.name(field))
        text = "\n\n".join(filter(None, [self.comment(message.full_name), *notes]))
        schema: Schema = {"type": "object", **_described(text), "properties": properties}
        if required:
            schema["required"] = required
        return schema

    def _enum(self, enum: EnumDescriptor) -> Schema:
        if enum.full_name == "google.protobuf.NullValue":
            return {"type": "null"}
        lines = [self.comment(enum.full_name)]
        values = [
            f"- `{value.name}`: {' '.join(text.split())}"
            for value in enum.values
            if (text := self.comment(f"{enum.full_name}.{value.name}"))
        ]
        text = "\n\n".join(filter(None, [*lines, "\n".join(values)]))
        return {"type": "string", **_described(text), "enum": [v.name for v in enum.values]}

    def value(self, field: FieldDescriptor) -> Schema:
        """The schema of one value of ``field`` (an element, for a repeated field)."""
        enum, message = field.enum_type, field.message_type
        if enum is not None:
            if enum.full_name == "google.protobuf.NullValue":
                return {"type": "null"}
            return self.ref(enum)
        if message is not None:
            return self.ref(message)
        return dict(_SCALARS[field.type])

    def field(self, field: FieldDescriptor) -> Schema:
        """A field's schema, with its comment and behaviour (repeated, map, deprecated)."""
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
            schema: Schema = {"type": "object", "additionalProperties": self.value(value)}
            # JSON object keys are strings: integer and bool keys are written as text.
            if key.type == _F.TYPE_BOOL:
                schema["propertyNames"] = {"enum": ["true", "false"]}
            elif key.type != _F.TYPE_STRING:
                schema["propertyNames"] = {"pattern": "^-?[0-9]+$"}
        elif field.is_repeated:
            schema = {"type": "array", "items": self.value(field)}
        else:
            schema = self.value(field)
        text = self.comment(field.full_name)
        if text:
            # On a $ref, OpenAPI 3.1 lets `description` stand beside it and win.
            schema["description"] = text
        behaviors = _behaviors(field)
        if field_behavior_pb2.OUTPUT_ONLY in behaviors:
            schema["readOnly"] = True
        if field_behavior_pb2.INPUT_ONLY in behaviors:
            schema["writeOnly"] = True
        if field.GetOptions().deprecated:
            schema["deprecated"] = True
        return schema


def _synthetic_oneofs(message: Descriptor) -> set[str]:
    """Names of the oneofs protoc made up for proto3 ``optional`` fields."""
    # The Python descriptor does not say which oneofs are synthetic; the proto does.
    proto = descriptor_pb2.DescriptorProto()
    message.CopyToProto(proto)
    return {
        proto.oneof_decl[field.oneof_index].name
        for field in proto.field
        if field.proto3_optional and field.HasField("oneof_index")
    }


def _behaviors(field: FieldDescriptor) -> list[int]:
    """The field's ``google.api.field_behavior`` values; none if the option is absent."""
    if not field.has_options:
        return []
    # Options of a descriptor from another pool (a descriptor set, reflection) may
    # not know the extension: reparsed here, they do, as field_behavior_pb2 is loaded.
    options = descriptor_pb2.FieldOptions.FromString(field.GetOptions().SerializeToString())
    return list(options.Extensions[field_behavior_pb2.field_behavior])


def _operation_head(binding: Binding, operation_id: str, tag: str, schemas: _Schemas) -> Schema:
    """What every operation has, whatever its bodies: ids, tags, comments, the gRPC method."""
    method = binding.method
    comment = schemas.comment(method.full_name)
    operation: Schema = {"operationId": operation_id, "tags": [tag]}
    if comment:
        operation["summary"] = _summary(comment)
        operation["description"] = comment
    if binding.generated:
        note = "The method has no `google.api.http` rule; this is its default binding."
        operation["description"] = "\n\n".join(filter(None, [comment, note]))
    if method.GetOptions().deprecated:
        operation["deprecated"] = True
    operation["x-grpc-method"] = grpc_path(method)
    return operation


def _operation(binding: Binding, operation_id: str, tag: str, schemas: _Schemas) -> Schema:
    method = binding.method
    operation = _operation_head(binding, operation_id, tag, schemas)
    parameters = _path_parameters(binding, schemas)
    bound = set(binding.template.fields)
    if binding.body != "*":
        skip = bound | ({binding.body} if binding.body else set())
        parameters += _query_parameters(method.input_type, skip, "", schemas, ())
    if parameters:
        operation["parameters"] = parameters

    if binding.body:
        operation["requestBody"] = _request_body(binding, bound, schemas)
    operation["responses"] = {
        "200": _success(binding, schemas),
        "default": {
            "description": "An error, as google.rpc.Status JSON.",
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{_STATUS_NAME}"}}
            },
        },
    }
    return operation


def _codec_operation(
    binding: Binding, operation_id: str, tag: str, schemas: _Schemas, codec: Codec
) -> Schema:
    """An operation whose bodies a codec defines: the codec's fields over the gateway's.

    The path parameters are still the template's; no query parameters or protobuf
    schemas are guessed. A codec that describes nothing gets bodies marked as its own.
    """
    operation = _operation_head(binding, operation_id, tag, schemas)
    operation["x-codec"] = codec.name
    parameters = _path_parameters(binding, schemas)
    if parameters:
        operation["parameters"] = parameters
    given = copy.deepcopy(codec.openapi_operation(binding))
    if given is None:
        note = (
            f"Bodies are in the format of the gateway's `{codec.name}` codec, "
            "not protobuf's JSON mapping."
        )
        operation["description"] = "\n\n".join(filter(None, [operation.get("description"), note]))
        if binding.body:
            operation["requestBody"] = {
                "description": f"Defined by the `{codec.name}` codec.",
                "content": {"application/json": {"schema": {}}},
            }
        given = {}
    for key, value in given.items():
        operation[key] = [*parameters, *value] if key == "parameters" else value
    operation.setdefault(
        "responses",
        {
            "200": {"description": f"The response, as the `{codec.name}` codec writes it."},
            "default": {"description": f"An error, as the `{codec.name}` codec writes it."},
        },
    )
    return operation


def _resolve(message: Descriptor, dotted: str) -> FieldDescriptor | None:
    """The field a dotted path names, or None if the path leads nowhere."""
    field: FieldDescriptor | None = None
    current: Descriptor | None = message
    for part in dotted.split("."):
        if current is None or part not in current.fields_by_name:
            return None
        field = current.fields_by_name[part]
        current = field.message_type
    return field


def _path_parameters(binding: Binding, schemas: _Schemas) -> list[Schema]:
    # The template's own text says which variables take more than one segment.
    patterns = {m[1]: (m[2] or "*").strip() for m in _VARIABLE.finditer(binding.template.pattern)}
    parameters: list[Schema] = []
    for dotted in binding.template.fields:
        field = _resolve(binding.method.input_type, dotted)
        schema = schemas.value(field) if field is not None else {"type": "string"}
        text = schemas.comment(field.full_name) if field is not None else ""
        pattern = patterns.get(dotted, "*")
        if pattern != "*":
            # OpenAPI has no multi-segment parameter: say what the value looks like,
            # in words and as a regular expression.
            note = f"The value has the form `{pattern}`; its `/` are sent as they are."
            text = "\n\n".join(filter(None, [text, note]))
            schema["pattern"] = _segments_regex(pattern)
        parameters.append(
            {"name": dotted, "in": "path", "required": True, **_described(text), "schema": schema}
        )
    return parameters


def _segments_regex(segments: str) -> str:
    """A template variable's segments (``models/*``) as an ECMA-262 regular expression."""
    wildcards = {"*": "[^/]+", "**": ".*"}
    parts = [
        wildcards.get(part) or re.sub(r"[.^$|?*+()\[\]{}\\]", r"\\\g<0>", part)
        for part in segments.split("/")
    ]
    return "^" + "/".join(parts) + "$"


def _query_parameters(
    message: Descriptor, skip: set[str], prefix: str, schemas: _Schemas, seen: tuple[str, ...]
) -> list[Schema]:
    """Query parameters for the fields of ``message`` that neither path nor body binds."""
    parameters: list[Schema] = []
    path = (*seen, message.full_name)
    for field in message.fields:
        dotted = prefix + field.name
        if dotted in skip:
            continue
        nested = field.message_type
        if nested is not None and nested.full_name not in _SCALAR_LIKE:
            # Nested messages flatten into dotted names; maps, repeated messages,
            # free-form JSON and cycles have no query form.
            if (
                nested.GetOptions().map_entry
                or field.is_repeated
                or nested.full_name in _WELL_KNOWN
                or nested.full_name in path
            ):
                continue
            parameters += _query_parameters(nested, skip, dotted + ".", schemas, path)
            continue
        schema = schemas.field(field)
        text = schema.pop("description", "")
        deprecated = schema.pop("deprecated", False)
        parameter: Schema = {"name": dotted, "in": "query", **_described(text), "schema": schema}
        if deprecated:
            parameter["deprecated"] = True
        parameters.append(parameter)
    return parameters


def _request_body(binding: Binding, bound: set[str], schemas: _Schemas) -> Schema:
    message = binding.method.input_type
    if binding.body == "*":
        # The body is the message without the fields the path binds; where the path
        # binds none of its top-level fields, it is the message itself.
        omit = frozenset(f for f in bound if "." not in f)
        if omit:
            schema = schemas.message(message, omit)
            names = ", ".join(f"`{f}`" for f in sorted(omit))
            note = f"Path parameters ({names}) are not part of the body."
            schema["description"] = "\n\n".join(filter(None, [schema.get("description"), note]))
            schemas.ref(message)  # the full message is still documented as a component
        else:
            schema = schemas.ref(message)
        text = schemas.comment(message.full_name)
    else:
        field = message.fields_by_name[binding.body]
        schema = schemas.field(field)
        text = schema.get("description", "")
    return {**_described(text), "content": {"application/json": {"schema": schema}}}


def _success(binding: Binding, schemas: _Schemas) -> Schema:
    message = binding.method.output_type
    if binding.response_body:
        schema = schemas.field(message.fields_by_name[binding.response_body])
    else:
        schema = schemas.ref(message)
    if not binding.method.server_streaming:
        return {
            "description": schemas.comment(message.full_name) or "The response message.",
            "content": {"application/json": {"schema": schema}},
        }
    status = {"$ref": f"#/components/schemas/{_STATUS_NAME}"}
    return {
        "description": "\n\n".join(
            ["A stream of response messages.", *(f.description for f in STREAM_FORMATS)]
        ),
        "content": {
            f.media_type: {"schema": f.openapi_schema(schema, status)} for f in STREAM_FORMATS
        },
    }
