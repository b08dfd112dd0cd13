"""protoserve.server: the gRPC inference server and the model runtime behind it.

To serve your own model, subclass :class:`Model` and run
``protoserve serve --model package.module:YourModel``.
"""

from __future__ import annotations

# Imported for what it does: the built-in model sources register with the runtime's loader.
from protoserve.server import models  # noqa: F401
from protoserve.server.app import InferenceServer
from protoserve.server.config import ServerConfig
from protoserve.server.runtime.core import Runtime
from protoserve.server.runtime.errors import (
    Cancelled,
    Internal,
    InvalidArgument,
    NotFound,
    ProtoserveError,
    ResourceExhausted,
    Unavailable,
)
from protoserve.server.runtime.model import (
    BatchDecoder,
    ChatMessage,
    ChatTemplate,
    Decoding,
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
    "Cancelled",
    "ChatMessage",
    "ChatTemplate",
    "Decoding",
    "GenerationParams",
    "InferenceServer",
    "Internal",
    "InvalidArgument",
    "Model",
    "NotFound",
    "Parameter",
    "ProtoserveError",
    "ResourceExhausted",
    "Runtime",
    "ServerConfig",
    "Task",
    "TensorInfo",
    "Token",
    "TokenChoice",
    "Unavailable",
]
