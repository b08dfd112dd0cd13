"""The one proto ⇄ Python layer of the clients, shared by the gRPC and HTTP clients.

Requests are built as ``protoserve.inference.v1`` messages and responses are
read from them, whatever the transport: the HTTP client sends the same
messages as JSON (``json_format.MessageToDict``) and parses its responses back
into them (``json_format.ParseDict``) before calling these functions. So a
model answers with the same Python values over either transport.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt
from google.protobuf import json_format
from google.rpc import error_details_pb2

from protoserve.common import dtypes
from protoserve.inference.v1 import inference_service_pb2 as pb

from ._errors import InvalidArgument
from ._types import FinishReason, Generation, ModelInfo, ParameterInfo, Usage

if TYPE_CHECKING:
    import torch

__all__ = [
    "GENERATION_PARAMETERS",
    "StreamPart",
    "embed_request",
    "embeddings",
    "generate_request",
    "generation",
    "model_info",
    "predict_outputs",
    "predict_request",
    "stream_part",
    "stream_request",
    "usage",
]

#: One step of a stream, as every stream records it: text, token ids, and on the
#: last step the finish reason and usage.
StreamPart = tuple[str, tuple[int, ...], FinishReason | None, Usage | None]

#: The keyword arguments ``generate()`` and ``generate_stream()`` take as parameters.
GENERATION_PARAMETERS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "stop_sequences",
)

#: The API's tensor types that v1 carries (:mod:`protoserve.common.dtypes`), as
#: (name, wire type); "string" only describes text.
_WIRE_TYPES = [
    (d.name, cast("pb.DataType", pb.DataType.Value(d.wire)))
    for d in dtypes.DTYPES
    if d.wire is not None and d.storage is not None
]
# wire type -> the numpy dtype whose bytes carry it. bfloat16 has no numpy
# dtype: its bits travel as int16, which has the same size and order.
_WIRE_NUMPY: dict[pb.DataType, np.dtype[Any]] = {
    wire: np.dtype("<i2" if name == "bfloat16" else dtypes.BY_NAME[name].storage)
    for name, wire in _WIRE_TYPES
}
_NUMPY_WIRE = {
    np_dtype.newbyteorder("="): wire
    for wire, np_dtype in _WIRE_NUMPY.items()
    if wire != pb.DATA_TYPE_BFLOAT16
}


# torch is imported only by the calls that need it (embed, predict): a client that
# only generates text, and the command line, start in a tenth of the time.
def _torch() -> Any:
    import torch

    return torch


@functools.cache
def _torch_wire() -> dict[Any, pb.DataType]:
    """torch dtype -> wire type."""
    torch = _torch()
    return {getattr(torch, name): wire for name, wire in _WIRE_TYPES}


def _is_torch(value: object) -> bool:
    """A torch tensor? (If torch was never imported, the value cannot be one.)"""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _enum_name(prefix: str, name: str) -> str:
    """``TASK_TEXT_GENERATION`` -> ``text_generation``: the names ModelInfo uses."""
    return name.removeprefix(prefix).lower()


def _bad_parameter(name: str, value: Any, error: Exception) -> InvalidArgument:
    """The error the server would give for a value the wire cannot even carry.

    A negative ``max_new_tokens`` cannot be put in a ``uint32``; raising the same
    ``InvalidArgument`` the server raises for a value out of its bounds keeps
    local checks and remote checks indistinguishable to the caller.
    """
    description = f"{value!r} is not a valid value: {error}"
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=f"parameters.{name}", description=description
            )
        ]
    )
    return InvalidArgument(f"parameters.{name}: {description}", details=[bad])


def _generation_parameters(
    parameters: Mapping[str, Any], message: pb.GenerationParameters, caller: str
) -> None:
    for name, value in parameters.items():
        if name not in GENERATION_PARAMETERS:
            # The message a local function gives, so that moving the model
            # behind the network changes nothing for a misspelt keyword.
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}")
        if value is None:
            continue  # unset: the model's default applies
        try:
            if name == "stop_sequences":
                if isinstance(value, str):
                    # A lone string would be split into characters: never what was meant.
                    value = [value]
                message.stop_sequences.extend(value)
            else:
                setattr(message, name, value)
        except (TypeError, ValueError) as error:
            raise _bad_parameter(name, value, error) from None


def generate_request(model: str, text: str, parameters: Mapping[str, Any]) -> pb.GenerateRequest:
    """A ``GenerateRequest`` for ``generate(text, **parameters)``.

    Args:
        model: the model's name.
        text: the text to continue.
        parameters: any of :data:`GENERATION_PARAMETERS`; a None value is left unset.

    Raises:
        TypeError: a parameter name is not one of :data:`GENERATION_PARAMETERS`.
        InvalidArgument: a value the wire cannot carry (a negative count, a wrong type).
    """
    request = pb.GenerateRequest(model=model, inputs=text)
    _generation_parameters(parameters, request.parameters, "generate")
    return request


def stream_request(
    model: str, text: str, parameters: Mapping[str, Any]
) -> pb.GenerateStreamRequest:
    """A ``GenerateStreamRequest``; the same contract as :func:`generate_request`."""
    request = pb.GenerateStreamRequest(model=model, inputs=text)
    _generation_parameters(parameters, request.parameters, "generate_stream")
    return request


def usage(message: pb.Usage) -> Usage:
    """The :class:`Usage` of a ``Usage`` message (total is derived, not copied)."""
    return Usage(prompt_tokens=message.prompt_tokens, completion_tokens=message.completion_tokens)


def _finish_reason(value: int) -> FinishReason | None:
    return FinishReason.from_wire(pb.FinishReason.Name(value))


def generation(response: pb.GenerateResponse) -> Generation:
    """The :class:`Generation` (a ``str``) of a ``GenerateResponse``."""
    return Generation(
        response.generated_text,
        finish_reason=_finish_reason(response.finish_reason),
        usage=usage(response.usage),
        token_ids=response.token_ids,
        model=response.model,
    )


def stream_part(message: pb.GenerateStreamResponse) -> StreamPart:
    """One streamed step: ``(text, token_ids, finish_reason, usage)``.

    ``finish_reason`` and ``usage`` are None except on the last message.
    """
    return (
        message.text,
        tuple(message.token_ids),
        _finish_reason(message.finish_reason),
        usage(message.usage) if message.HasField("usage") else None,
    )


def _parameter_info(spec: pb.ParameterSpec) -> ParameterInfo:
    return ParameterInfo(
        name=spec.name,
        task=_enum_name("TASK_", pb.Task.Name(spec.task)),
        type=_enum_name("PARAMETER_TYPE_", pb.ParameterType.Name(spec.type)),
        default=json_format.MessageToDict(spec.default_value)
        if spec.HasField("default_value")
        else None,
        minimum=spec.minimum if spec.HasField("minimum") else None,
        maximum=spec.maximum if spec.HasField("maximum") else None,
        description=spec.description,
    )


def model_info(model: pb.Model) -> ModelInfo:
    """The :class:`ModelInfo` of a ``Model`` message.

    Enum values become short lower-case names: tasks ``text_generation``,
    ``embedding``, ``tensor_prediction``; states ``loading``, ``ready``,
    ``failed``; parameter types ``integer``, ``float``, ``boolean``,
    ``string``, ``string_list``.
    """
    return ModelInfo(
        name=model.name,
        version=model.version,
        tasks=tuple(_enum_name("TASK_", pb.Task.Name(t)) for t in model.tasks),
        state=_enum_name("MODEL_STATE_", pb.ModelState.Name(model.state)),
        description=model.description,
        parameters=tuple(_parameter_info(p) for p in model.parameters),
        state_message=model.state_message,
    )


def embed_request(model: str, texts: str | Sequence[str], normalize: bool) -> pb.EmbedRequest:
    """An ``EmbedRequest`` for one text (a ``str``) or a batch of texts."""
    inputs = [texts] if isinstance(texts, str) else list(texts)
    return pb.EmbedRequest(
        model=model, inputs=inputs, parameters=pb.EmbedParameters(normalize=normalize)
    )


def embeddings(response: pb.EmbedResponse, single: bool) -> torch.Tensor:
    """The vectors of an ``EmbedResponse`` as float32: ``[N, D]``, or ``[D]`` if ``single``.

    Raises:
        ValueError: the vectors do not all have the same length.
    """
    rows = [np.asarray(e.values, dtype=np.float32) for e in response.embeddings]
    if not rows:
        matrix = np.zeros((0, 0), dtype=np.float32)
    else:
        if len({row.shape[0] for row in rows}) != 1:
            raise ValueError("the server returned vectors of different lengths")
        matrix = np.stack(rows)
    tensor: torch.Tensor = _torch().from_numpy(matrix)
    return tensor[0] if single and len(rows) == 1 else tensor


def _tensor_message(name: str, value: torch.Tensor | npt.NDArray[Any]) -> pb.Tensor:
    if _is_torch(value):
        assert not isinstance(value, np.ndarray)
        torch = _torch()
        if value.dtype not in _torch_wire():
            raise TypeError(f"tensor {name!r}: dtype {value.dtype} is not supported")
        wire = _torch_wire()[value.dtype]
        carrier = _WIRE_NUMPY[wire]
        source = value.detach().contiguous().cpu()
        if source.dtype is torch.bfloat16:
            source = source.view(torch.int16)
        array: npt.NDArray[Any] = source.numpy()
        shape = tuple(value.shape)
    else:
        array = np.asarray(value)
        native = array.dtype.newbyteorder("=")
        if native not in _NUMPY_WIRE:
            raise TypeError(f"tensor {name!r}: dtype {array.dtype} is not supported")
        wire = _NUMPY_WIRE[native]
        carrier = _WIRE_NUMPY[wire]
        shape = array.shape
    # The wire is little-endian; on a little-endian machine this is no copy.
    array = array.astype(carrier, copy=False)
    return pb.Tensor(
        name=name, data_type=wire, shape=shape, raw_data=np.ascontiguousarray(array).tobytes()
    )


def predict_request(
    model: str,
    tensors: Mapping[str, torch.Tensor | npt.NDArray[Any]],
    parameters: Mapping[str, Any] | None,
) -> tuple[pb.PredictRequest, bool]:
    """A ``PredictRequest`` carrying each tensor as raw little-endian bytes.

    Returns:
        The request, and whether the inputs were numpy arrays (so that the
        outputs can be given back as numpy too). Mixed inputs count as torch.

    Raises:
        TypeError: a dtype the API has no type for (complex, uint16, ...).
    """
    request = pb.PredictRequest(model=model)
    all_numpy = bool(tensors)
    for name, value in tensors.items():
        all_numpy = all_numpy and not _is_torch(value)
        request.inputs.append(_tensor_message(name, value))
    if parameters:
        json_format.ParseDict(dict(parameters), request.parameters)
    return request, all_numpy


def _tensor_value(tensor: pb.Tensor, as_numpy: bool) -> torch.Tensor | npt.NDArray[Any]:
    if tensor.data_type not in _WIRE_NUMPY:
        name = pb.DataType.Name(tensor.data_type)
        raise ValueError(f"output {tensor.name!r} has data type {name}")
    carrier = _WIRE_NUMPY[tensor.data_type]
    shape = tuple(tensor.shape)
    count = int(np.prod(shape, dtype=np.int64))
    if len(tensor.raw_data) != count * carrier.itemsize:
        raise ValueError(
            f"output {tensor.name!r}: {len(tensor.raw_data)} bytes do not fit shape {list(shape)}"
        )
    # bytearray: one copy that makes the array writable, as a model's own
    # output is (torch warns on non-writable numpy arrays).
    array = np.frombuffer(bytearray(tensor.raw_data), dtype=carrier).reshape(shape)
    array = array.astype(carrier.newbyteorder("="), copy=False)
    if as_numpy and tensor.data_type != pb.DATA_TYPE_BFLOAT16:
        return array
    module = _torch()
    value: torch.Tensor = module.from_numpy(array)
    return value.view(module.bfloat16) if tensor.data_type == pb.DATA_TYPE_BFLOAT16 else value


def predict_outputs(
    response: pb.PredictResponse, as_numpy: bool
) -> dict[str, torch.Tensor | npt.NDArray[Any]]:
    """The named outputs of a ``PredictResponse``, as torch tensors or numpy arrays.

    bfloat16 outputs are always torch tensors, even when ``as_numpy``: numpy has
    no bfloat16 type.

    Raises:
        ValueError: an output's bytes do not match its shape and type.
    """
    return {t.name: _tensor_value(t, as_numpy) for t in response.outputs}
