"""``protoserve.inference.v1.InferenceService``: messages in, runtime call, messages out.

The servicer is thin (docs/architecture.md, rule 7): it converts protobuf
messages to plain values, calls :class:`~protoserve.server.runtime.core.Runtime`,
and converts back. Each method runs in its call's frame
(:mod:`protoserve.server.calls`): request id, errors as statuses, metrics, access line.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, cast

import grpc
from google.protobuf import json_format, struct_pb2

from protoserve.common import dtypes
from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from protoserve.server.calls import add_service, streaming, unary
from protoserve.server.metrics import Metrics
from protoserve.server.runtime.core import ModelEntry, ModelState, Runtime
from protoserve.server.runtime.generation import Chunk, FinishReason
from protoserve.server.runtime.model import Decoding, Parameter, Task, TensorInfo
from protoserve.server.runtime.tensors import RawTensor

__all__ = ["InferenceServicer", "add_to_server"]

_FINISH = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.END_OF_TEXT: pb.FINISH_REASON_END_OF_TEXT,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}
_TASKS = {
    Task.TEXT_GENERATION: pb.TASK_TEXT_GENERATION,
    Task.EMBEDDING: pb.TASK_EMBEDDING,
    Task.TENSOR_PREDICTION: pb.TASK_TENSOR_PREDICTION,
}
_STATES = {
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
}
_DECODINGS = {
    None: pb.DECODING_UNSPECIFIED,
    Decoding.BATCHED: pb.DECODING_BATCHED,
    Decoding.BATCHED_EXACT: pb.DECODING_BATCHED_EXACT,
    Decoding.SEQUENTIAL: pb.DECODING_SEQUENTIAL,
}
_PARAMETER_TYPES = {
    int: pb.PARAMETER_TYPE_INTEGER,
    float: pb.PARAMETER_TYPE_FLOAT,
    bool: pb.PARAMETER_TYPE_BOOLEAN,
    str: pb.PARAMETER_TYPE_STRING,
    list: pb.PARAMETER_TYPE_STRING_LIST,
}
# API dtype names <-> DataType; "string" only describes text in a TensorSpec.
_DTYPES: dict[str, pb.DataType] = {
    d.name: cast("pb.DataType", pb.DataType.Value(d.wire))
    for d in dtypes.DTYPES
    if d.wire is not None
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register every method of ``InferenceService`` (:func:`.calls.add_service`)."""
    add_service(servicer, server, pb.DESCRIPTOR.services_by_name["InferenceService"])


def _tensor_spec(info: TensorInfo) -> pb.TensorSpec:
    return pb.TensorSpec(
        name=info.name,
        data_type=_DTYPES.get(info.dtype, pb.DATA_TYPE_UNSPECIFIED),
        shape=list(info.shape),
        description=info.description,
    )


def _parameter_spec(spec: Parameter) -> pb.ParameterSpec:
    message = pb.ParameterSpec(
        name=spec.name,
        task=_TASKS[spec.task],
        type=_PARAMETER_TYPES.get(spec.type, pb.PARAMETER_TYPE_UNSPECIFIED),
        description=spec.description,
    )
    default = struct_pb2.Value()
    if spec.default is None:
        default.null_value = struct_pb2.NULL_VALUE
    else:
        json_format.ParseDict(spec.default, default)
    message.default_value.CopyFrom(default)
    if spec.minimum is not None:
        message.minimum = spec.minimum
    if spec.maximum is not None:
        message.maximum = spec.maximum
    return message


def model_message(entry: ModelEntry) -> pb.Model:
    """The ``Model`` message describing a runtime entry."""
    model = entry.model
    return pb.Model(
        name=entry.name,
        version=entry.version,
        tasks=[_TASKS[t] for t in sorted(model.tasks(), key=lambda t: _TASKS[t])],
        state=_STATES[entry.state],
        state_message=entry.state_message,
        decoding=_DECODINGS[entry.decoding],
        description=model.description,
        inputs=[_tensor_spec(i) for i in model.describe_inputs()],
        outputs=[_tensor_spec(o) for o in model.describe_outputs()],
        parameters=[_parameter_spec(p) for p in model.parameters()],
        device=entry.device_name,
        dtype=entry.dtype_name,
    )


def _get_model(entry: ModelEntry) -> pb.GetModelResponse:
    return pb.GetModelResponse(model=entry.described("v1.Model", model_message))


def _data_type(tensor: RawTensor) -> pb.DataType:
    """The DataType of an output; a dtype v1 has none for (uint16/32/64, which only the
    Open Inference Protocol carries) is the model's failure here, logged as such."""
    data_type = _DTYPES.get(tensor.dtype)
    if data_type is None:
        raise TypeError(f"output {tensor.name!r} has dtype {tensor.dtype}, which v1 cannot carry")
    return data_type


def _generation_parameters(message: pb.GenerationParameters) -> dict[str, Any]:
    """The parameters a request set; unset optional fields are left out (defaults apply)."""
    given: dict[str, Any] = {}
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed"):
        if message.HasField(name):
            given[name] = getattr(message, name)
    if message.stop_sequences:
        given["stop_sequences"] = list(message.stop_sequences)
    return given


def _usage(chunk_usage: Any) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=chunk_usage.prompt_tokens,
        completion_tokens=chunk_usage.completion_tokens,
        total_tokens=chunk_usage.total_tokens,
    )


def _stream_message(chunk: Chunk) -> pb.GenerateStreamResponse:
    message = pb.GenerateStreamResponse(text=chunk.text, token_ids=chunk.token_ids)
    if chunk.finish_reason is not None:
        message.finish_reason = _FINISH[chunk.finish_reason]
    if chunk.usage is not None:
        message.usage.CopyFrom(_usage(chunk.usage))
    return message


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """The gRPC face of a :class:`Runtime`."""

    def __init__(self, runtime: Runtime, *, metrics: Metrics | None = None) -> None:
        self.runtime = runtime
        self.metrics = metrics

    @unary
    async def ListModels(self, request: pb.ListModelsRequest) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[e.described("v1.Model", model_message) for e in self.runtime.list_models()]
        )

    @unary
    async def GetModel(self, request: pb.GetModelRequest) -> pb.GetModelResponse:
        # Built once per state of the version (ModelEntry.described), and shared.
        return self.runtime.get_model(request.name).described("v1.GetModel", _get_model)

    @unary
    async def Generate(self, request: pb.GenerateRequest) -> pb.GenerateResponse:
        result = await self.runtime.generate(
            request.model, request.inputs, _generation_parameters(request.parameters)
        )
        return pb.GenerateResponse(
            generated_text=result.text,
            token_ids=result.token_ids,
            finish_reason=_FINISH[result.finish_reason],
            usage=_usage(result.usage),
            model=request.model,
        )

    @streaming(_stream_message)
    def GenerateStream(self, request: pb.GenerateStreamRequest) -> AsyncGenerator[Chunk, None]:
        return self.runtime.generate_stream(
            request.model, request.inputs, _generation_parameters(request.parameters)
        )

    @unary
    async def Embed(self, request: pb.EmbedRequest) -> pb.EmbedResponse:
        params = request.parameters
        normalize = params.normalize if params.HasField("normalize") else True
        vectors, usage = await self.runtime.embed(
            request.model, list(request.inputs), normalize=normalize
        )
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=row) for row in vectors.tolist()],
            model=request.model,
            usage=_usage(usage),
        )

    @unary
    async def Predict(self, request: pb.PredictRequest) -> pb.PredictResponse:
        inputs = [
            RawTensor(
                t.name, _DTYPE_NAMES.get(t.data_type, "unspecified"), tuple(t.shape), t.raw_data
            )
            for t in request.inputs
        ]
        parameters = json_format.MessageToDict(request.parameters)
        outputs = await self.runtime.predict(request.model, inputs, parameters)
        return pb.PredictResponse(
            outputs=[
                pb.Tensor(name=o.name, data_type=_data_type(o), shape=o.shape, raw_data=o.data)
                for o in outputs
            ],
            model=request.model,
        )
