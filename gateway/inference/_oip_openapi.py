"""OpenAPI for the Open Inference Protocol's REST format: the V2 schemas, not protobuf's.

The OIP codec (:mod:`protoserve.gateway.inference._oip`) hands these to the OpenAPI
document for the methods it serves, so ``/openapi.json`` and ``/docs`` show the
bodies the gateway really sends: ``{"inputs": [{"name", "shape", "datatype",
"data"}]}`` and the binary data extension, not ``raw_input_contents`` as base64.
"""

from __future__ import annotations

from typing import Any

from protoserve.gateway._rules import Binding
from protoserve.gateway.inference._oip_tensors import DATATYPES

__all__ = ["OIP_SCHEMAS", "oip_operation"]

Schema = dict[str, Any]
_P = "oip.v2."


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{_P}{name}"}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_SHAPE: Schema = {"type": "array", "items": {"type": "integer", "minimum": -1}}
_DATATYPE: Schema = {"type": "string", "enum": list(DATATYPES)}
_BINARY_NOTE = (
    "With the binary data extension the body is this JSON followed by the tensors' bytes: "
    "the `Inference-Header-Content-Length` header gives the JSON's length, and each tensor "
    "with a `binary_data_size` parameter takes that many bytes, in order (little-endian; "
    "BYTES elements each a 4-byte little-endian length and the bytes)."
)

#: The V2 schemas, by component name.
OIP_SCHEMAS: dict[str, Schema] = {
    f"{_P}Parameters": {
        "type": "object",
        "description": "Parameters as bare JSON values.",
        "additionalProperties": {"type": ["boolean", "integer", "number", "string"]},
    },
    f"{_P}Error": {
        "type": "object",
        "description": "An error, as the Open Inference Protocol writes it.",
        "properties": {"error": {"type": "string", "description": "What went wrong."}},
        "required": ["error"],
    },
    f"{_P}Live": {
        "type": "object",
        "properties": {"live": {"type": "boolean"}},
        "required": ["live"],
    },
    f"{_P}Ready": {
        "type": "object",
        "properties": {"ready": {"type": "boolean"}},
        "required": ["ready"],
    },
    f"{_P}ServerMetadataResponse": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "version", "extensions"],
    },
    f"{_P}MetadataTensor": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "datatype": _DATATYPE, "shape": _SHAPE},
        "required": ["name", "datatype", "shape"],
    },
    f"{_P}ModelMetadataResponse": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _ref("MetadataTensor")},
            "outputs": {"type": "array", "items": _ref("MetadataTensor")},
        },
        "required": ["name", "platform", "inputs", "outputs"],
    },
    f"{_P}ModelConfig": {
        "type": "object",
        "description": "The model's configuration in Triton's model-config JSON: proto "
        "field names, enum names (`TYPE_FP32`), integers as numbers.",
        "additionalProperties": True,
    },
    f"{_P}RequestInput": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": _DATATYPE,
            "parameters": {
                **_ref("Parameters"),
                "description": "`binary_data_size`: the input's bytes follow the JSON.",
            },
            "data": {
                "type": "array",
                "description": "The elements, row-major, flat or nested: booleans for BOOL, "
                "numbers for integer and float types, strings for BYTES.",
            },
        },
        "required": ["name", "shape", "datatype"],
    },
    f"{_P}RequestOutput": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "parameters": {
                **_ref("Parameters"),
                "description": "`binary_data`: true to get the output as binary data.",
            },
        },
        "required": ["name"],
    },
    f"{_P}InferenceRequest": {
        "type": "object",
        "description": _BINARY_NOTE,
        "properties": {
            "id": {"type": "string"},
            "parameters": {
                **_ref("Parameters"),
                "description": "`binary_data_output`: true for every output as binary data.",
            },
            "inputs": {"type": "array", "items": _ref("RequestInput")},
            "outputs": {"type": "array", "items": _ref("RequestOutput")},
        },
        "required": ["inputs"],
    },
    f"{_P}ResponseOutput": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "shape": _SHAPE,
            "datatype": _DATATYPE,
            "parameters": {
                **_ref("Parameters"),
                "description": "`binary_data_size` when the output's bytes follow the JSON.",
            },
            "data": {"type": "array", "description": "The elements, flat, row-major."},
        },
        "required": ["name", "shape", "datatype"],
    },
    f"{_P}InferenceResponse": {
        "type": "object",
        "description": _BINARY_NOTE,
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": _ref("Parameters"),
            "outputs": {"type": "array", "items": _ref("ResponseOutput")},
        },
        "required": ["model_name", "outputs"],
    },
    f"{_P}RepositoryIndexRequest": {
        "type": "object",
        "properties": {"ready": {"type": "boolean", "description": "Only models ready."}},
    },
    f"{_P}RepositoryIndexResponse": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "state": {"type": "string"},
                "reason": {"type": "string"},
            },
            "required": ["name", "state"],
        },
    },
    f"{_P}RepositoryModelRequest": {
        "type": "object",
        "properties": {
            "parameters": {
                "type": "object",
                "description": "`config` (JSON text), `file:<path>` (base64), and others.",
                "additionalProperties": {"type": ["boolean", "integer", "string"]},
            }
        },
    },
    f"{_P}Empty": {"type": "object", "description": "An empty object."},
}

_ERROR = _json(_ref("Error"), 'An error, as `{"error": "..."}`.')
_HEADER_LENGTH: Schema = {
    "name": "Inference-Header-Content-Length",
    "in": "header",
    "required": False,
    "description": "The length of the body's JSON part, when binary data follows it.",
    "schema": {"type": "integer", "minimum": 0},
}


def _health(name: str, what: str) -> Schema:
    return {
        "responses": {
            "200": _json(_ref(name), f"{what}: true."),
            "400": _json(_ref(name), f"{what}: false."),
            "default": _ERROR,
        }
    }


def _plain(response: str, description: str, request: str | None = None) -> Schema:
    operation: Schema = {
        "responses": {"200": _json(_ref(response), description), "default": _ERROR}
    }
    if request is not None:
        operation["requestBody"] = {
            "required": False,
            **_json(_ref(request), "May be empty."),
        }
    return operation


def _infer() -> Schema:
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        "parameters": [_HEADER_LENGTH],
        "requestBody": {
            "required": True,
            "description": _BINARY_NOTE,
            "content": {
                "application/json": {"schema": _ref("InferenceRequest")},
                "application/octet-stream": binary,
            },
        },
        "responses": {
            "200": {
                "description": "The outputs: JSON, or JSON and binary data "
                "(application/octet-stream) when any output was asked for as binary data.",
                "headers": {
                    "Inference-Header-Content-Length": {
                        "description": "The JSON part's length, with binary data.",
                        "schema": {"type": "integer"},
                    }
                },
                "content": {
                    "application/json": {"schema": _ref("InferenceResponse")},
                    "application/octet-stream": binary,
                },
            },
            "default": _ERROR,
        },
    }


def oip_operation(binding: Binding) -> Schema | None:
    """The V2 request and response of ``binding``'s method; None for a method it does not know."""
    name = binding.method.name
    if name == "ServerLive":
        return _health("Live", "Live")
    if name in ("ServerReady", "ModelReady"):
        return _health("Ready", "Ready")
    if name == "ModelInfer":
        return _infer()
    simple = {
        "ServerMetadata": ("ServerMetadataResponse", "The server's metadata.", None),
        "ModelMetadata": ("ModelMetadataResponse", "The model's metadata.", None),
        "ModelConfig": ("ModelConfig", "The model's configuration.", None),
        "RepositoryIndex": (
            "RepositoryIndexResponse",
            "The repository's models.",
            "RepositoryIndexRequest",
        ),
        "RepositoryModelLoad": ("Empty", "The model is loaded.", "RepositoryModelRequest"),
        "RepositoryModelUnload": ("Empty", "The model is unloaded.", "RepositoryModelRequest"),
    }
    if name in simple:
        return _plain(*simple[name])
    return None
