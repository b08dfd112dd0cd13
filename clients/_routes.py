"""Where each method of our API is on the gateway: its ``google.api.http`` rule, read here.

The rules in ``inference_service.proto`` are the one definition of the HTTP API
(docs/architecture.md, rule 1); the gateway routes by them, and the HTTP clients
build their requests from the same rules, read from the compiled-in descriptors,
so that no path is typed out twice. The gateway's own reader
(``gateway/_rules.py``) is not imported: a client installs no gateway.

Only what our rules use is read: the main rule of each method (a stream is
posted, not fetched with its ``additional_bindings`` GET), path variables that
are top-level fields, and a body of ``*`` or none. A rule beyond that fails at
import, so a change to the API that this reader cannot follow is seen at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from google.api import annotations_pb2
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from protoserve.inference.v1 import inference_service_pb2 as pb

__all__ = ["ROUTES", "Route"]

_VARIABLE = re.compile(r"\{([^}=]+)(?:=([^}]*))?\}")


@dataclass(frozen=True)
class Route:
    """One method's HTTP binding: the verb, the path template, where fields go, the response.

    Attributes:
        verb: the HTTP method, upper case.
        template: the path template, e.g. ``/v1/models/{model}:generate``.
        body: ``*`` (every field not in the path, as JSON) or "" (no body: the
            query string carries them).
        response_type: the method's response message.
    """

    verb: str
    template: str
    body: str
    response_type: type[Message]

    @property
    def path_fields(self) -> tuple[str, ...]:
        return tuple(match[1] for match in _VARIABLE.finditer(self.template))

    def path(self, request: Message) -> str:
        """The template with the request's fields in it, each quoted as one path segment."""
        # A model name is one segment: "/" is quoted too, as the route's {model} expects.
        return _VARIABLE.sub(lambda m: quote(str(getattr(request, m[1])), safe=""), self.template)

    def fields(self, request: Message) -> dict[str, Any]:
        """The request's fields that the path does not carry, as proto3 JSON."""
        data = json_format.MessageToDict(request, preserving_proto_field_name=True)
        for name in self.path_fields:
            data.pop(name, None)
        return data


def _route(method: MethodDescriptor) -> Route:
    # The _pb2 module imports google.api.annotations_pb2 before it builds its
    # descriptors, so the rule is a known extension of the options here.
    rule = method.GetOptions().Extensions[annotations_pb2.http]
    verb = rule.WhichOneof("pattern") or "custom"
    template = "" if verb == "custom" else str(getattr(rule, verb))
    variables = [(m[1], m[2] or "*") for m in _VARIABLE.finditer(template)]
    fields = method.input_type.fields_by_name
    if (
        not template
        or rule.body not in ("", "*")
        or rule.response_body
        or any(name not in fields or pattern != "*" for name, pattern in variables)
    ):
        raise ValueError(f"{method.full_name}: a google.api.http rule the clients cannot follow")
    response_type = message_factory.GetMessageClass(method.output_type)
    return Route(verb.upper(), template, rule.body, response_type)


#: The route of each method of ``InferenceService``, by the method's name.
ROUTES: dict[str, Route] = {
    method.name: _route(method)
    for method in pb.DESCRIPTOR.services_by_name["InferenceService"].methods
}
