"""The Open Inference Protocol's REST format (KServe V2), as a gateway codec.

The protocol binds its gRPC methods to REST paths (the ``google.api.http`` rules
of ``inference.GRPCInferenceService``) but its JSON is its own: tensors as
``{"name", "shape", "datatype", "data"}`` with row-major elements, parameters as
bare JSON values, health as 200 (true) or 400 (false), errors as
``{"error": "..."}``, and Triton's binary data extension, which puts tensor bytes
after the JSON in one body (``Inference-Header-Content-Length`` says where the
JSON ends). This codec speaks it as ``tritonclient.http`` and KServe clients do.

It reads and writes messages by field name only, so it serves descriptors read
from a server's reflection as well as compiled ones; it never imports the
protocol's stubs. Methods it does not know (another server's extensions) keep
protobuf's JSON mapping, with the protocol's error body.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from protoserve.gateway._codecs import Codec, CodecRequest, CodecResponse, ErrorInfo
from protoserve.gateway._errors import GatewayError, bad_request
from protoserve.gateway._rules import Binding
from protoserve.gateway._transcode import build_request
from protoserve.gateway.inference._oip_openapi import OIP_SCHEMAS, oip_operation
from protoserve.gateway.inference._oip_tensors import (
    DATATYPES,
    NotUtf8Error,
    TensorError,
    check_raw,
    contents_to_raw,
    json_to_raw,
    raw_to_json,
)

__all__ = ["OipCodec"]

#: The extension the gateway itself provides, whatever the upstream says.
BINARY_EXTENSION = "binary_tensor_data"
#: The request header that says how long the JSON part of a body is.
HEADER_LENGTH = "Inference-Header-Content-Length"
_INT64 = (-(2**63), 2**63 - 1)
_UINT64_MAX = 2**64 - 1
_STATE_BINARY = "oip.binary_outputs"
_STATE_BINARY_ALL = "oip.binary_data_output"


class OipCodec(Codec):
    """The Open Inference Protocol's REST JSON and binary tensor data, for its gRPC methods."""

    @property
    def name(self) -> str:
        return "oip"

    def decode_request(self, request: CodecRequest, message_class: type[Message]) -> Message:
        method = request.binding.method.name
        if method == "ModelInfer":
            return _decode_infer(request, message_class)
        if method in ("RepositoryModelLoad", "RepositoryModelUnload"):
            return _decode_repository_change(request, message_class)
        if method == "RepositoryIndex":
            return _decode_index(request, message_class)
        if method in _DECODES_PATH_ONLY:
            # GET methods: the path says everything; the query is ignored, as Triton does.
            return build_request(request.binding, request.path_params, (), b"", message_class)
        return super().decode_request(request, message_class)

    def encode_response(self, request: CodecRequest, message: Message) -> CodecResponse:
        method = request.binding.method.name
        encode = _ENCODERS.get(method)
        if encode is None:
            return super().encode_response(request, message)
        return encode(request, message)

    def encode_error(self, binding: Binding, error: ErrorInfo) -> CodecResponse:
        # tritonclient.http reads exactly this key; google.rpc details have no place here.
        return CodecResponse.json({"error": error.message}, status=error.status)

    def openapi_operation(self, binding: Binding) -> dict[str, Any] | None:
        return oip_operation(binding)

    def openapi_schemas(self) -> dict[str, Any]:
        return OIP_SCHEMAS


_DECODES_PATH_ONLY = frozenset(
    {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig"}
)


# Requests ----------------------------------------------------------------------------


def _load(body: bytes, what: str) -> Any:
    """A JSON body (NaN and Infinity allowed, as numbers of tensors may be)."""
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _bad(f"{what} is not valid UTF-8 (byte {exc.start})", "") from None
    except json.JSONDecodeError as exc:
        raise _bad(f"{what} is not valid JSON: {exc.msg} at byte {exc.pos}", "") from None
    except RecursionError:
        raise _bad(f"{what} is nested too deeply", "") from None


def _bad(message: str, field: str) -> GatewayError:
    return bad_request(message, field, message)


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"{where} must be a JSON object", where)
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{where} must be a string", where)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"{where} holds a lone UTF-16 surrogate", where) from None
    return value


def _parameters(value: Any, where: str) -> list[tuple[str, Any]]:
    """A parameters object's (name, value) pairs; names must be text a proto map can key."""
    pairs = list(_object(value, where).items())
    for key, _ in pairs:
        _text(key, f"{where} name {key[:40]!r}")
    return pairs


def _body_object(request: CodecRequest) -> dict[str, Any]:
    """The body as a JSON object; an empty body is ``{}``."""
    if not request.body.strip():
        return {}
    return _object(_load(request.body, "the request body"), "the request body")


def _set_parameter(parameter: Any, value: Any, where: str) -> None:
    """An InferParameter from a bare JSON value: bool, integer, number or string."""
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        if _INT64[0] <= value <= _INT64[1]:
            parameter.int64_param = value
        elif 0 <= value <= _UINT64_MAX:
            parameter.uint64_param = value
        else:
            raise _bad(f"{where} ({value}) does not fit a 64-bit integer", where)
    elif isinstance(value, float):
        parameter.double_param = value
    elif isinstance(value, str):
        parameter.string_param = _text(value, where)
    else:
        raise _bad(f"{where} must be a boolean, a number or a string", where)


def _split_body(request: CodecRequest) -> tuple[bytes, bytes]:
    """(JSON, binary data) of an infer body, split where the header says."""
    raw = request.headers.get(HEADER_LENGTH.lower())
    if raw is None:
        return request.body, b""
    raw = raw.strip()
    if not raw.isdigit() or int(raw) > len(request.body):
        raise _bad(
            f"{HEADER_LENGTH} {raw!r} must be a byte count of at most the body's "
            f"{len(request.body)} bytes",
            "",
        )
    length = int(raw)
    return request.body[:length], request.body[length:]


def _decode_infer(request: CodecRequest, message_class: type[Message]) -> Message:
    head, binary = _split_body(request)
    if not head.strip():
        raise _bad('an infer request needs a JSON body with "inputs"', "")
    document = _object(_load(head, "the inference request"), "the inference request")
    message: Any = build_request(request.binding, request.path_params, (), b"", message_class)
    if "id" in document:
        message.id = _text(document["id"], "id")
    binary_all = False
    for key, value in _parameters(document.get("parameters", {}), "parameters"):
        if key == "binary_data_output":
            binary_all = _flag(value, "parameters.binary_data_output")
        else:
            _set_parameter(message.parameters[key], value, f"parameters.{key}")
    inputs = document.get("inputs")
    if not isinstance(inputs, list):
        raise _bad('"inputs" must be a JSON array of input tensors', "inputs")
    offset = 0
    for index, item in enumerate(inputs):
        offset = _decode_input(message, item, index, binary, offset)
    if offset != len(binary):
        raise _bad(
            f"the body has {len(binary) - offset} bytes of binary data that no input's "
            "binary_data_size claims",
            "",
        )
    outputs = document.get("outputs", [])
    if not isinstance(outputs, list):
        raise _bad('"outputs" must be a JSON array', "outputs")
    binary_outputs: dict[str, bool] = {}
    for index, item in enumerate(outputs):
        where = f"outputs[{index}]"
        item = _object(item, where)
        output = message.outputs.add()
        output.name = _text(item.get("name"), f"{where}.name")
        for key, value in _parameters(item.get("parameters", {}), f"{where}.parameters"):
            if key == "binary_data":
                binary_outputs[output.name] = _flag(value, f"output {output.name!r} binary_data")
            elif key.startswith("shared_memory_"):
                raise _no_shared_memory(f"output {output.name!r}")
            else:
                _set_parameter(output.parameters[key], value, f"{where}.parameters.{key}")
    request.state[_STATE_BINARY] = binary_outputs
    request.state[_STATE_BINARY_ALL] = binary_all
    result: Message = message
    return result


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(f"{where} must be true or false", where)
    return value


def _no_shared_memory(what: str) -> GatewayError:
    return _bad(
        f"{what}: shared memory is not supported over the gateway; send the data in the "
        "body (JSON or binary_data_size)",
        "",
    )


def _decode_input(message: Any, item: Any, index: int, binary: bytes, offset: int) -> int:
    """Add input ``index`` to ``message``; returns the offset of the next binary data."""
    where = f"inputs[{index}]"
    item = _object(item, where)
    name = _text(item.get("name"), f"{where}.name")
    what = f"input {name!r}"
    datatype = _text(item.get("datatype"), f"{where}.datatype")
    if datatype not in DATATYPES:
        raise _bad(f"{what}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}", where)
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(
        type(d) is int and 0 <= d <= _INT64[1] for d in shape
    ):
        raise _bad(f"{what}: shape must be an array of non-negative integers", f"{where}.shape")
    tensor = message.inputs.add()
    tensor.name, tensor.datatype = name, datatype
    tensor.shape.extend(shape)
    size: int | None = None
    for key, value in _parameters(item.get("parameters", {}), f"{where}.parameters"):
        if key == "binary_data_size":
            if type(value) is not int or value < 0:
                raise _bad(f"{what}: binary_data_size must be a non-negative integer", where)
            size = value
        elif key.startswith("shared_memory_"):
            raise _no_shared_memory(what)
        else:
            _set_parameter(tensor.parameters[key], value, f"{where}.parameters.{key}")
    try:
        if size is not None:
            if "data" in item:
                raise _bad(f"{what} has both data and binary_data_size", where)
            if offset + size > len(binary):
                raise _bad(
                    f"{what}: binary_data_size {size} goes past the end of the binary data "
                    f"({len(binary) - offset} bytes left)",
                    where,
                )
            raw = binary[offset : offset + size]
            offset += size
            check_raw(datatype, shape, raw)
        elif "data" in item:
            raw = json_to_raw(datatype, shape, item["data"])
        else:
            raise _bad(f"{what} has no data: give data or binary_data_size", where)
    except TensorError as exc:
        raise _bad(f"{what}: {exc}", where) from None
    message.raw_input_contents.append(raw)
    return offset


def _decode_index(request: CodecRequest, message_class: type[Message]) -> Message:
    message: Any = build_request(request.binding, request.path_params, (), b"", message_class)
    document = _body_object(request)
    if "ready" in document:
        message.ready = _flag(document["ready"], "ready")
    result: Message = message
    return result


def _decode_repository_change(request: CodecRequest, message_class: type[Message]) -> Message:
    """Load or unload: ``{"parameters": {"config": "...", "file:1/model.pt": "<base64>"}}``."""
    message: Any = build_request(request.binding, request.path_params, (), b"", message_class)
    document = _body_object(request)
    for key, value in _parameters(document.get("parameters", {}), "parameters"):
        where = f"parameters.{key}"
        parameter = message.parameters[key]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int) and _INT64[0] <= value <= _INT64[1]:
            parameter.int64_param = value
        elif isinstance(value, str) and key.startswith("file:"):
            # Triton's load API: a model file's content, base64-encoded.
            try:
                parameter.bytes_param = base64.b64decode(value, validate=True)
            except binascii.Error:
                raise _bad(f"{where} must be base64", where) from None
        elif isinstance(value, str):
            parameter.string_param = _text(value, where)
        else:
            raise _bad(f"{where} must be a boolean, an integer or a string", where)
    result: Message = message
    return result


# Responses ---------------------------------------------------------------------------


def _parameters_json(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """A parameters map as bare JSON values (the oneof member that is set)."""
    result: dict[str, Any] = {}
    for key, parameter in parameters.items():
        oneofs = parameter.DESCRIPTOR.oneofs
        which = parameter.WhichOneof(oneofs[0].name) if oneofs else None
        if which is not None:
            value = getattr(parameter, which)
            result[key] = base64.b64encode(value).decode() if isinstance(value, bytes) else value
    return result


def _encode_live(request: CodecRequest, message: Any) -> CodecResponse:
    # The protocol: 200 when true, a 4xx when false (tritonclient reads only the status).
    return CodecResponse.json({"live": message.live}, status=200 if message.live else 400)


def _encode_ready(request: CodecRequest, message: Any) -> CodecResponse:
    return CodecResponse.json({"ready": message.ready}, status=200 if message.ready else 400)


def _encode_server_metadata(request: CodecRequest, message: Any) -> CodecResponse:
    extensions = list(message.extensions)
    if BINARY_EXTENSION not in extensions:
        extensions.append(BINARY_EXTENSION)
    return CodecResponse.json(
        {"name": message.name, "version": message.version, "extensions": extensions}
    )


def _tensor_metadata(tensors: Any) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]


def _encode_model_metadata(request: CodecRequest, message: Any) -> CodecResponse:
    return CodecResponse.json(
        {
            "name": message.name,
            "versions": list(message.versions),
            "platform": message.platform,
            "inputs": _tensor_metadata(message.inputs),
            "outputs": _tensor_metadata(message.outputs),
        }
    )


def _encode_model_config(request: CodecRequest, message: Any) -> CodecResponse:
    # Triton answers the configuration itself, not {"config": ...}.
    return CodecResponse.json(plain_json(message.config))


def _encode_index(request: CodecRequest, message: Any) -> CodecResponse:
    models = []
    for model in message.models:
        entry = {"name": model.name}
        if model.version:
            entry["version"] = model.version
        entry["state"] = model.state
        if model.reason:
            entry["reason"] = model.reason
        models.append(entry)
    return CodecResponse.json(models)


def _encode_empty(request: CodecRequest, message: Any) -> CodecResponse:
    return CodecResponse.json({})


def _encode_infer(request: CodecRequest, message: Any) -> CodecResponse:
    binary_outputs: dict[str, bool] = request.state.get(_STATE_BINARY, {})
    binary_all: bool = request.state.get(_STATE_BINARY_ALL, False)
    raws = list(message.raw_output_contents)
    if raws and len(raws) != len(message.outputs):
        raise _upstream(
            f"the upstream answered {len(message.outputs)} outputs "
            f"but {len(raws)} raw_output_contents"
        )
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    any_binary = False
    for index, output in enumerate(message.outputs):
        shape = list(output.shape)
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": shape}
        parameters = _parameters_json(output.parameters)
        try:
            raw = raws[index] if raws else contents_to_raw(output.datatype, shape, output.contents)
            if binary_outputs.get(output.name, binary_all):
                check_raw(output.datatype, shape, raw)
                any_binary = True
                blobs.append(raw)
                entry["parameters"] = {**parameters, "binary_data_size": len(raw)}
            else:
                if parameters:
                    entry["parameters"] = parameters
                entry["data"] = raw_to_json(output.datatype, shape, raw)
        except NotUtf8Error as exc:
            # Not the upstream's fault: the request can ask for the output as binary data.
            raise _bad(f"output {output.name!r} {exc}", "") from None
        except TensorError as exc:
            raise _upstream(f"output {output.name!r} from the upstream: {exc}") from None
        outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": message.model_name,
        "model_version": message.model_version,
    }
    if message.id:
        document["id"] = message.id
    parameters = _parameters_json(message.parameters)
    if parameters:
        document["parameters"] = parameters
    document["outputs"] = outputs
    head = CodecResponse.json(document)
    if not any_binary:
        return head
    return CodecResponse(
        head.body + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head.body))},
    )


def _upstream(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.INTERNAL, message)


_ENCODERS: dict[str, Callable[[CodecRequest, Any], CodecResponse]] = {
    "ServerLive": _encode_live,
    "ServerReady": _encode_ready,
    "ModelReady": _encode_ready,
    "ServerMetadata": _encode_server_metadata,
    "ModelMetadata": _encode_model_metadata,
    "ModelConfig": _encode_model_config,
    "ModelInfer": _encode_infer,
    "RepositoryIndex": _encode_index,
    "RepositoryModelLoad": _encode_empty,
    "RepositoryModelUnload": _encode_empty,
}


def plain_json(message: Any) -> dict[str, Any]:
    """A message as Triton writes its model configuration: proto names, enum names,
    integers as JSON numbers, every field without presence even at its default.

    Fields with presence (oneof members, ``optional`` scalars) appear only when set;
    other message fields always, so that ``model_transaction_policy.decoupled`` is
    there to read. Bytes are base64.
    """
    result: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.containing_oneof is not None and not message.HasField(field.name):
            continue
        value = getattr(message, field.name)
        if _is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            result[field.name] = {str(k): _plain_value(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            result[field.name] = [_plain_value(field, v) for v in value]
        else:
            result[field.name] = _plain_value(field, value)
    return result


def _is_map(field: FieldDescriptor) -> bool:
    entry = field.message_type
    return field.is_repeated and entry is not None and entry.GetOptions().map_entry


def _plain_value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return plain_json(value)
    if field.enum_type is not None:
        found = field.enum_type.values_by_number.get(value)
        return found.name if found is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value
