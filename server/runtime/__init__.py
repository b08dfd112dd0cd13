"""The transport-independent core: models, their worker threads, validation, generation.

It imports nothing of :mod:`protoserve.server` outside this package: the server passes
in what it needs (a :class:`Meter` for its metrics), and the built-in models register
their sources with :mod:`.loader`.
"""

from __future__ import annotations

from protoserve.server.runtime.core import GenerateResult, ModelEntry, ModelState, Runtime
from protoserve.server.runtime.generation import Chunk, FinishReason, Usage
from protoserve.server.runtime.meter import GenerationMeter, Meter
from protoserve.server.runtime.model import (
    BatchDecoder,
    ChatMessage,
    ChatTemplate,
    GenerationParams,
    Model,
    Parameter,
    Task,
    TensorInfo,
    Token,
    TokenChoice,
)

__all__ = [
    "BatchDecoder",
    "ChatMessage",
    "ChatTemplate",
    "Chunk",
    "FinishReason",
    "GenerateResult",
    "GenerationMeter",
    "GenerationParams",
    "Meter",
    "Model",
    "ModelEntry",
    "ModelState",
    "Parameter",
    "Runtime",
    "Task",
    "TensorInfo",
    "Token",
    "TokenChoice",
    "Usage",
]
