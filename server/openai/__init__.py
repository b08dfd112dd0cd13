"""OpenAI's API (``protoserve.openai.v1.OpenAIService``) over the runtime.

Every model that serves text generation or embedding is served through it as well
as through ``protoserve.inference.v1`` and the Open Inference Protocol; the
gateway gives it OpenAI's JSON under ``/openai/v1`` (docs/adr/0018-openai-api.md).
"""

from __future__ import annotations

from protoserve.server.openai.servicer import (
    OWNED_BY,
    SERVICE_NAME,
    OpenAIServicer,
    add_to_server,
    fingerprint,
)

__all__ = ["OWNED_BY", "SERVICE_NAME", "OpenAIServicer", "add_to_server", "fingerprint"]
