"""The Open Inference Protocol (KServe V2, ``inference.GRPCInferenceService``) over the runtime.

Every model the runtime holds is served through it as well as through
``protoserve.inference.v1``; :mod:`.signatures` says how each task looks as tensors.
"""

from __future__ import annotations

from protoserve.server.oip.servicer import (
    EXTENSIONS,
    SERVICE_NAME,
    OpenInferenceServicer,
    add_to_server,
)

__all__ = ["EXTENSIONS", "SERVICE_NAME", "OpenInferenceServicer", "add_to_server"]
