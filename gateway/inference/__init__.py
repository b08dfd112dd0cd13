"""protoserve's own pieces of the gateway, kept out of its generic core.

The Open Inference Protocol's REST format as a codec (``_oip.py``, its tensors in
``_oip_tensors.py``, its OpenAPI schemas in ``_oip_openapi.py``), OpenAI's HTTP API
as a codec (``_openai.py``, its OpenAPI in ``_openai_openapi.py``), the
text-generation playground page (``_playground.py``, ``playground.html``), and
protoserve's compiled-in descriptors. ``protoserve.gateway.build_gateway`` registers
them (``_register.py``); ``protoserve.gateway._app.build_app`` is the core without them.
"""

from __future__ import annotations

from protoserve.gateway.inference._register import (
    INFERENCE_SERVICE,
    NAMED_CODECS,
    OIP_SERVICE,
    OPENAI_SERVICE,
    from_compiled,
    oip_codec,
    openai_codec,
    register,
)

__all__ = [
    "INFERENCE_SERVICE",
    "NAMED_CODECS",
    "OIP_SERVICE",
    "OPENAI_SERVICE",
    "from_compiled",
    "oip_codec",
    "openai_codec",
    "register",
]
