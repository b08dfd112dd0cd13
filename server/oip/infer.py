"""ModelInfer: a request's tensors to the runtime call of its task, and the result back.

The input names pick the task (:func:`~protoserve.server.oip.signatures.choose`);
then tensor prediction calls ``Runtime.predict``, embedding ``Runtime.embed`` and
text generation ``Runtime.generate`` (once per text, all at once), so batching,
limits, metrics and errors are the runtime's, as for v1's calls. Outputs travel
as ``raw_output_contents``, only those the request names when it names any.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from protoserve.common import framing
from protoserve.common.dtypes import OIP_BYTES, oip_datatype
from protoserve.oip.v2 import grpc_service_pb2 as pb
from protoserve.server.oip.parameters import (
    embedding_parameters,
    generation_parameters,
    plain_parameters,
)
from protoserve.server.oip.signatures import (
    EMBEDDING_OUTPUT,
    GENERATION_OUTPUT,
    TASK_NAMES,
    Signature,
    choose,
    signatures,
)
from protoserve.server.oip.tensors import InferInput, read_inputs
from protoserve.server.runtime.core import GenerateResult, ModelEntry, Runtime
from protoserve.server.runtime.errors import FieldViolation, InvalidArgument
from protoserve.server.runtime.model import Task

__all__ = ["infer"]


@dataclass(frozen=True)
class _Output:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes


async def infer(runtime: Runtime, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """Run ``request`` on its model; the response echoes its id and names the version run.

    Raises:
        NotFound: no such model or version.
        InvalidArgument: bad tensors, parameters or output names (field violations say which).
        Whatever the runtime raises for the call (UNAVAILABLE, RESOURCE_EXHAUSTED ...).
    """
    if not request.model_name:
        raise InvalidArgument.field("model_name", "must name a model")
    entry = runtime.get_model(request.model_name, request.model_version)
    inputs = read_inputs(request)
    found = signatures(entry.model)
    signature = choose(entry.name, found, [i.name for i in inputs])
    wanted = _requested(request, signature, found)
    if signature.task is Task.TENSOR_PREDICTION:
        outputs = await _predict(runtime, entry, signature, inputs, request)
    elif signature.task is Task.EMBEDDING:
        outputs = await _embed(runtime, entry, inputs, request)
    else:
        outputs = await _generate(runtime, entry, inputs, request)
    chosen = _select(outputs, wanted)
    return pb.ModelInferResponse(
        model_name=entry.name,
        model_version=entry.version,
        id=request.id,
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(
                name=o.name, datatype=o.datatype, shape=list(o.shape)
            )
            for o in chosen
        ],
        raw_output_contents=[o.data for o in chosen],
    )


def _requested(
    request: pb.ModelInferRequest, signature: Signature, found: Sequence[Signature]
) -> list[str]:
    """The output names the request asks for, in order (none: all of the task's).

    Outputs of the model's other tasks are left out: load tools (perf_analyzer) ask
    for every output the configuration lists, whichever task the inputs pick. Asking
    for those alone, or for a name the model has no output of, is an error.
    """
    names: list[str] = []
    elsewhere: list[str] = []
    violations: list[FieldViolation] = []
    declared = {spec.name for spec in signature.outputs}
    other = {spec.name for s in found if s != signature for spec in s.outputs} - declared
    for i, output in enumerate(request.outputs):
        where = f"outputs[{i}]"
        if output.name in names or output.name in elsewhere:
            violations.append((f"{where}.name", f"output {output.name!r} is asked for twice"))
        elif output.name in other:
            elsewhere.append(output.name)
        elif declared and output.name not in declared:
            known = sorted(declared | other)
            violations.append(
                (f"{where}.name", f"unknown output {output.name!r}; outputs: {known}")
            )
        else:
            names.append(output.name)
        for name in output.parameters:
            if name != "binary_data":  # REST framing a gateway may pass on
                violations.append((f"{where}.parameters", f"{name!r} is not supported"))
    if elsewhere and not names and not violations:
        violations.append(
            (
                "outputs",
                f"{elsewhere[0]!r} is not an output of {TASK_NAMES[signature.task]}, "
                f"which this request's inputs run; its outputs: {sorted(declared)}",
            )
        )
    if violations:
        raise InvalidArgument(
            "invalid outputs: " + "; ".join(f"{f}: {d}" for f, d in violations), violations
        )
    return names


def _select(outputs: Sequence[_Output], wanted: Sequence[str]) -> list[_Output]:
    """The outputs asked for, in the order asked; all of them when none are."""
    if not wanted:
        return list(outputs)
    by_name = {o.name: o for o in outputs}
    missing = [name for name in wanted if name not in by_name]
    if missing:
        # Only a model that declares no outputs gets here: known once it has run.
        raise InvalidArgument.field(
            "outputs", f"unknown output {missing[0]!r}; the model returned {sorted(by_name)}"
        )
    return [by_name[name] for name in wanted]


async def _predict(
    runtime: Runtime,
    entry: ModelEntry,
    signature: Signature,
    inputs: Sequence[InferInput],
    request: pb.ModelInferRequest,
) -> list[_Output]:
    violations: list[FieldViolation] = []
    for tensor in inputs:
        spec = signature.input(tensor.name)
        if tensor.datatype == OIP_BYTES:
            violations.append((f"{tensor.field}.datatype", "tensor prediction takes no BYTES"))
        elif spec is not None and spec.datatype != tensor.datatype:
            violations.append(
                (f"{tensor.field}.datatype", f"must be {spec.datatype}, got {tensor.datatype}")
            )
    if violations:
        raise InvalidArgument(
            "invalid inputs: " + "; ".join(f"{f}: {d}" for f, d in violations), violations
        )
    parameters = plain_parameters(request.parameters)
    results = await runtime.predict(
        entry.name, [t.raw() for t in inputs], parameters, version=entry.version
    )
    return [_Output(r.name, oip_datatype(r.dtype), r.shape, r.data) for r in results]


def _texts(tensor: InferInput) -> list[str]:
    """A text input's elements as strings: BYTES of shape [N] or [N, 1], N >= 1, UTF-8."""
    if tensor.datatype != OIP_BYTES:
        raise InvalidArgument.field(
            f"{tensor.field}.datatype", f"{tensor.name} must be BYTES, got {tensor.datatype}"
        )
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise InvalidArgument.field(
            f"{tensor.field}.shape", f"must be [N] or [N, 1] with N >= 1, got {list(shape)}"
        )
    texts = []
    for i, element in enumerate(tensor.elements):
        try:
            texts.append(element.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidArgument.field(tensor.field, f"element {i} is not UTF-8 text") from None
    return texts


async def _embed(
    runtime: Runtime, entry: ModelEntry, inputs: Sequence[InferInput], request: pb.ModelInferRequest
) -> list[_Output]:
    (tensor,) = inputs  # choose() picked the one input of embedding
    texts = _texts(tensor)
    normalize = embedding_parameters(request.parameters)
    vectors, _ = await runtime.embed(entry.name, texts, normalize=normalize, version=entry.version)
    rows = vectors.detach().to("cpu").float().contiguous()
    return [_Output(EMBEDDING_OUTPUT, "FP32", tuple(rows.shape), rows.numpy().tobytes())]


async def _generate(
    runtime: Runtime, entry: ModelEntry, inputs: Sequence[InferInput], request: pb.ModelInferRequest
) -> list[_Output]:
    (tensor,) = inputs  # choose() picked the one input of generation
    texts = _texts(tensor)
    parameters = generation_parameters(request.parameters)
    calls = [
        runtime.generate(entry.name, text, parameters, version=entry.version) for text in texts
    ]
    results = await _all(calls)
    data = framing.frame([r.text.encode("utf-8") for r in results])
    return [_Output(GENERATION_OUTPUT, OIP_BYTES, tensor.shape, data)]


async def _all(calls: Sequence[Coroutine[Any, Any, GenerateResult]]) -> list[GenerateResult]:
    """Every generation's result, run concurrently; the first error cancels the rest."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
