"""The transport-independent core: models, their worker threads, validation, generation."""

from __future__ import annotations

from protoserve.server.runtime.core import GenerateResult, ModelEntry, ModelState, Runtime
from protoserve.server.runtime.generation import Chunk, FinishReason, Usage
from protoserve.server.runtime.model import (
    BatchDecoder,
    GenerationParams,
    Model,
    Parameter,
    Task,
    TensorInfo,
    Token,
)

__all__ = [
    "BatchDecoder",
    "Chunk",
    "FinishReason",
    "GenerateResult",
    "GenerationParams",
    "Model",
    "ModelEntry",
    "ModelState",
    "Parameter",
    "Runtime",
    "Task",
    "TensorInfo",
    "Token",
    "Usage",
]
