"""``protoserve.inference.v1.InferenceService``: messages in, runtime call, messages out.

The servicer is thin (docs/architecture.md, rule 7): it converts protobuf
messages to plain values, calls :class:`~protoserve.server.runtime.core.Runtime`,
and converts back. Every call gets a request id (the caller's ``x-request-id``,
or a new one), returned as ``x-request-id`` metadata and carried by every line
logged while the call runs; each call ends with one access line
(``protoserve.server.access``). Errors become statuses with
``google.rpc`` details; an unexpected exception is logged with its traceback
and the request id, and the client gets INTERNAL with that id only.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import json_format, struct_pb2
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from protoserve.common import dtypes, logs
from protoserve.common.logs import REQUEST_ID
from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from protoserve.server.errors import Internal, InvalidArgument, ProtoserveError, to_rpc_status
from protoserve.server.metrics import Metrics
from protoserve.server.runtime.core import ModelEntry, ModelState, Runtime
from protoserve.server.runtime.generation import Chunk, FinishReason
from protoserve.server.runtime.model import Decoding, Parameter, Task, TensorInfo
from protoserve.server.runtime.tensors import RawTensor

__all__ = ["InferenceServicer", "add_service", "add_to_server", "unary"]

log = logging.getLogger("protoserve.server")
#: One line per finished call: method, code, duration_ms, request_id, peer (and error).
access_log = logging.getLogger("protoserve.server.access")

Req = TypeVar("Req")
Resp = TypeVar("Resp")

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


def request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's ``x-request-id`` when it is sane, else a new one (:func:`logs.request_id`)."""
    given = (v for k, v in context.invocation_metadata() or () if k == "x-request-id")
    return logs.request_id(next((v for v in given if isinstance(v, str)), None))


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: ProtoserveError) -> None:
    status = to_rpc_status(error)
    await context.abort(
        error.code,
        error.message,
        trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
    )


@contextlib.asynccontextmanager
async def _call(
    context: grpc.aio.ServicerContext[Any, Any], method: str, metrics: Metrics | None = None
) -> AsyncIterator[str]:
    """One call's frame: its request id (in :data:`~protoserve.common.logs.REQUEST_ID`
    while it runs, so every line logged for it carries the id), its errors as
    statuses, its metrics, and its access line when it ends (for a stream: when the
    stream does)."""
    started = time.perf_counter()
    # Anything that is neither a result nor an error of ours (the call was cancelled).
    code = grpc.StatusCode.CANCELLED
    error_message: str | None = None
    rid = request_id(context)
    # Asked now: once a call is over, grpc may have freed what peer() reads (a crash).
    peer = context.peer()
    token = REQUEST_ID.set(rid)
    try:
        await context.send_initial_metadata((("x-request-id", rid),))
        try:
            yield rid
            code = grpc.StatusCode.OK
        except ProtoserveError as error:
            code = error.code
            error_message = error.message  # on the access line
            await _abort(context, error)
        except Exception:
            code = grpc.StatusCode.INTERNAL
            # Logged here with the traceback; the client sees INTERNAL and the id only.
            log.exception("%s failed", method)
            await _abort(context, Internal(rid))
    finally:
        seconds = time.perf_counter() - started
        if metrics is not None:
            metrics.requests.labels(method, code.name).inc()
            metrics.request_seconds.labels(method).observe(seconds)
        _log_access(method, code, seconds, rid, peer, error_message)
        try:
            REQUEST_ID.reset(token)
        except ValueError:
            # A stream's generator closed late, from another context: that one never had it.
            pass


def _log_access(
    method: str,
    code: grpc.StatusCode,
    seconds: float,
    rid: str,
    peer: str,
    error_message: str | None,
) -> None:
    """The call's one access line (``protoserve.server.access``, INFO)."""
    duration_ms = round(seconds * 1000, 3)
    fields: dict[str, Any] = {
        "method": method,
        "code": code.name,
        "duration_ms": duration_ms,
        "request_id": rid,
        "peer": peer,
    }
    if error_message is None:
        access_log.info("%s %s %.1fms", method, code.name, duration_ms, extra=fields)
    else:
        fields["error"] = error_message
        access_log.info(
            "%s %s %.1fms: %s", method, code.name, duration_ms, error_message, extra=fields
        )


@dataclass(frozen=True)
class Malformed:
    """What a request that does not parse becomes, so the call can answer INVALID_ARGUMENT.

    grpc's own handling of a deserializer error is UNKNOWN and a server-side
    traceback; a client's bad bytes deserve neither.
    """

    type_name: str
    error: str


def _lenient(message_class: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def parse(data: bytes) -> Message | Malformed:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Malformed(message_class.DESCRIPTOR.full_name, str(exc))

    return parse


def _parsed(request: Req | Malformed) -> Req:
    if isinstance(request, Malformed):
        raise InvalidArgument(f"the request is not a valid {request.type_name}: {request.error}")
    return request


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register every method of ``InferenceService``, with lenient parsing."""
    add_service(servicer, server, pb.DESCRIPTOR.services_by_name["InferenceService"])


def add_service(servicer: object, server: grpc.aio.Server, service: ServiceDescriptor) -> None:
    """Register every method of ``service`` (the servicer's method of the same name),
    from its descriptor, with lenient parsing: a request that does not parse reaches
    the method as :class:`Malformed`, which :func:`unary` answers with INVALID_ARGUMENT."""
    handlers = {}
    for method in service.methods:
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_lenient(GetMessageClass(method.input_type)),
            response_serializer=lambda message: message.SerializeToString(),
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def unary(
    fn: Callable[[Any, Req, str], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    """A unary method in :func:`_call`'s frame: ``fn(self, request, request_id)`` gets a
    parsed request, and its errors become statuses. The method's name is the metrics'
    and access line's method label; ``self.metrics`` (or None) counts the call."""

    async def handler(
        self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        async with _call(context, fn.__name__, self.metrics) as rid:
            return await fn(self, _parsed(request), rid)
        raise AssertionError("unreachable: _call aborts on every error")

    handler.__name__ = fn.__name__
    return handler


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
    )


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
    async def ListModels(self, request: pb.ListModelsRequest, rid: str) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_message(e) for e in self.runtime.list_models()])

    @unary
    async def GetModel(self, request: pb.GetModelRequest, rid: str) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=model_message(self.runtime.get_model(request.name)))

    @unary
    async def Generate(self, request: pb.GenerateRequest, rid: str) -> pb.GenerateResponse:
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

    async def GenerateStream(
        self,
        request: pb.GenerateStreamRequest,
        context: grpc.aio.ServicerContext[pb.GenerateStreamRequest, pb.GenerateStreamResponse],
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async with _call(context, "GenerateStream", self.metrics):
            request = _parsed(request)
            chunks = self.runtime.generate_stream(
                request.model, request.inputs, _generation_parameters(request.parameters)
            )
            # aclosing: a cancelled call closes the generation at once, not at GC.
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield _stream_message(chunk)

    @unary
    async def Embed(self, request: pb.EmbedRequest, rid: str) -> pb.EmbedResponse:
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
    async def Predict(self, request: pb.PredictRequest, rid: str) -> pb.PredictResponse:
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
