"""How each model looks through the Open Inference Protocol: its tensors per task.

The protocol knows only tensors, so every task gets a tensor signature:

- tensor prediction: the model's declared inputs and outputs (``Model.inputs``,
  ``Model.outputs``); a model that declares none takes any named tensors;
- embedding: ``text`` (BYTES ``[N]``) in, ``embedding`` (FP32 ``[N, dim]``) out;
- text generation: ``text_input`` (BYTES ``[N]``) in, ``text_output`` (BYTES ``[N]``) out.

A model serving several tasks lists all their tensors; a request's input names
pick the task (:func:`choose`). ModelMetadata and ModelConfig are built here
from the signatures, so the two always agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from protoserve.common.dtypes import BY_OIP, OIP_BYTES, oip_datatype
from protoserve.oip.v2 import grpc_service_pb2 as pb
from protoserve.server.runtime.core import ModelEntry
from protoserve.server.runtime.errors import InvalidArgument
from protoserve.server.runtime.model import Model, Task, TensorInfo

__all__ = [
    "EMBEDDING_INPUT",
    "EMBEDDING_OUTPUT",
    "GENERATION_INPUT",
    "GENERATION_OUTPUT",
    "PLATFORM",
    "TASK_NAMES",
    "Signature",
    "TensorSpec",
    "choose",
    "model_config",
    "model_metadata",
    "signatures",
]

#: The platform ModelMetadata and ModelConfig report for every model.
PLATFORM = "pytorch"
#: The backend ModelConfig reports.
BACKEND = "protoserve"

EMBEDDING_INPUT = "text"
EMBEDDING_OUTPUT = "embedding"
GENERATION_INPUT = "text_input"
GENERATION_OUTPUT = "text_output"

#: Each task's name in error messages.
TASK_NAMES = {
    Task.TENSOR_PREDICTION: "tensor prediction",
    Task.TEXT_GENERATION: "text generation",
    Task.EMBEDDING: "embedding",
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a signature: name, protocol datatype, shape (-1: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Signature:
    """The tensors of one task of a model.

    ``open`` marks tensor prediction on a model that declares no inputs: any
    input names go to it, and its outputs are whatever the model returns.
    """

    task: Task
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    open: bool = False

    def input(self, name: str) -> TensorSpec | None:
        """The declared input of that name, if any."""
        return next((spec for spec in self.inputs if spec.name == name), None)


def _spec(info: TensorInfo) -> TensorSpec:
    return TensorSpec(info.name, oip_datatype(info.dtype), tuple(info.shape))


def signatures(model: Model) -> list[Signature]:
    """The model's signatures, one per task it serves: prediction, generation, embedding."""
    tasks = model.tasks()
    found: list[Signature] = []
    if Task.TENSOR_PREDICTION in tasks:
        found.append(
            Signature(
                Task.TENSOR_PREDICTION,
                tuple(_spec(i) for i in model.inputs),
                tuple(_spec(o) for o in model.outputs),
                open=not model.inputs,
            )
        )
    if Task.TEXT_GENERATION in tasks:
        found.append(
            Signature(
                Task.TEXT_GENERATION,
                (TensorSpec(GENERATION_INPUT, OIP_BYTES, (-1,)),),
                (TensorSpec(GENERATION_OUTPUT, OIP_BYTES, (-1,)),),
            )
        )
    if Task.EMBEDDING in tasks:
        found.append(
            Signature(
                Task.EMBEDDING,
                (TensorSpec(EMBEDDING_INPUT, OIP_BYTES, (-1,)),),
                (TensorSpec(EMBEDDING_OUTPUT, "FP32", (-1, -1)),),
            )
        )
    return found


def choose(model_name: str, found: Sequence[Signature], names: Sequence[str]) -> Signature:
    """The signature a request's input names pick.

    Each name must be an input of some signature (or go to open tensor prediction);
    all names must belong to one signature. No names at all pick tensor prediction
    when the model serves it (the runtime then names what is missing).

    Raises:
        InvalidArgument: an unknown input, or inputs of two tasks in one request.
    """
    opened = next((s for s in found if s.open), None)
    if not names:
        predict = next((s for s in found if s.task is Task.TENSOR_PREDICTION), None)
        if predict is not None:
            return predict
        raise InvalidArgument.field("inputs", f"must not be empty; {_takes(model_name, found)}")
    candidates = list(found)
    first: dict[Task, str] = {}  # the first input name that belongs to each task
    for i, name in enumerate(names):
        owners = [s for s in found if s.input(name) is not None] or ([opened] if opened else [])
        if not owners:
            raise InvalidArgument.field(
                f"inputs[{i}].name", f"unknown input {name!r}; {_takes(model_name, found)}"
            )
        for owner in owners:
            first.setdefault(owner.task, name)
        candidates = [s for s in candidates if s in owners]
        if not candidates:
            tasks = ", ".join(f"{n!r} is an input of {TASK_NAMES[t]}" for t, n in first.items())
            raise InvalidArgument.field(
                f"inputs[{i}].name",
                f"{tasks}; one request runs one task, so send the inputs of one",
            )
    return candidates[0]


def _takes(model_name: str, found: Sequence[Signature]) -> str:
    """What the model takes, for error messages."""
    parts = []
    for s in found:
        if s.open:
            parts.append(f"any named tensors ({TASK_NAMES[s.task]})")
        else:
            names = ", ".join(f"{i.name} ({i.datatype})" for i in s.inputs)
            parts.append(f"{names} ({TASK_NAMES[s.task]})")
    return f"model {model_name!r} takes " + ("; or ".join(parts) or "nothing")


def _metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=list(spec.shape)
    )


def model_metadata(entry: ModelEntry, versions: Sequence[str]) -> pb.ModelMetadataResponse:
    """ModelMetadata: every task's inputs and outputs."""
    found = signatures(entry.model)
    return pb.ModelMetadataResponse(
        name=entry.name,
        versions=list(versions),
        platform=PLATFORM,
        inputs=[_metadata(spec) for s in found for spec in s.inputs],
        outputs=[_metadata(spec) for s in found for spec in s.outputs],
    )


def batch_size(entry: ModelEntry) -> int:
    """ModelConfig's ``max_batch_size``: the scheduler's batch for a tensor model that
    batches rows (every declared tensor has the batch as dimension 0); else 0."""
    model = entry.model
    rows = entry.scheduler.max_batch_size
    if Task.TENSOR_PREDICTION not in model.tasks() or not model.predict_batches or rows <= 1:
        return 0
    tensors = [*model.inputs, *model.outputs]
    if not model.inputs or any(not t.shape or t.shape[0] != -1 for t in tensors):
        return 0
    return rows


def _dynamic_batching(entry: ModelEntry) -> pb.ModelDynamicBatching | None:
    """How the runtime batches the model's requests, or None when it does not."""
    model, scheduler = entry.model, entry.scheduler
    tasks = model.tasks()
    rows = scheduler.max_batch_size > 1 and (
        Task.EMBEDDING in tasks or (Task.TENSOR_PREDICTION in tasks and model.predict_batches)
    )
    if rows:
        delay = round(scheduler.max_batch_delay * 1e6)
        return pb.ModelDynamicBatching(max_queue_delay_microseconds=delay)
    if scheduler.decoder is not None:
        # Continuous batching: a generation joins the running batch at its next step.
        return pb.ModelDynamicBatching(max_queue_delay_microseconds=0)
    return None


def _instance_group(entry: ModelEntry) -> pb.ModelInstanceGroup | None:
    """Where the version runs, as Triton says it: its copies (``instances``) on the CPU,
    or ``count`` on each of the GPUs ``gpus``; None before it is placed."""
    if entry.device is None:
        return None
    # The first copy's placement is the entry's; the others' are their models' own.
    devices = [entry.device]
    for other in entry.others:
        device = getattr(other.model, "device", None)
        devices.append(device if isinstance(device, torch.device) else entry.device)
    copies = len(devices)
    gpus = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    if entry.device.type != "cuda" or not gpus:
        return pb.ModelInstanceGroup(
            name=entry.name, count=copies, kind=pb.ModelInstanceGroup.KIND_CPU
        )
    return pb.ModelInstanceGroup(
        name=entry.name,
        count=max(1, copies // len(gpus)),
        kind=pb.ModelInstanceGroup.KIND_GPU,
        gpus=gpus,
    )


def model_config(entry: ModelEntry) -> pb.ModelConfig:
    """ModelConfig in Triton's terms, consistent with :func:`model_metadata`.

    With ``max_batch_size`` above 0 the dims leave out the batch dimension. Every
    input of a model with several tasks is optional: a request sends one task's.
    """
    found = signatures(entry.model)
    batch = batch_size(entry)
    optional = len(found) > 1

    def dims(spec: TensorSpec) -> list[int]:
        return list(spec.shape[1:] if batch else spec.shape)

    config = pb.ModelConfig(
        name=entry.name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=batch,
        input=[
            pb.ModelInput(
                name=spec.name,
                data_type=_config_type(spec.datatype),
                dims=dims(spec),
                optional=optional,
            )
            for s in found
            for spec in s.inputs
        ],
        output=[
            pb.ModelOutput(
                name=spec.name,
                data_type=_config_type(spec.datatype),
                dims=dims(spec),
            )
            for s in found
            for spec in s.outputs
        ],
        model_transaction_policy=pb.ModelTransactionPolicy(decoupled=False),
    )
    group = _instance_group(entry)
    if group is not None:
        config.instance_group.append(group)
    batching = _dynamic_batching(entry)
    if batching is not None:
        config.dynamic_batching.CopyFrom(batching)
    if entry.decoding is not None:
        config.parameters["decoding"].string_value = entry.decoding.value
    return config


def _config_type(datatype: str) -> pb.DataType:
    """Triton's model configuration type for a protocol datatype (TYPE_INVALID: unknown)."""
    found = BY_OIP.get(datatype)
    return cast("pb.DataType", pb.DataType.Value(found.config)) if found else pb.TYPE_INVALID
