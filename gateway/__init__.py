"""protoserve.gateway: any gRPC service as JSON over HTTP, and server streams as SSE.

The app is built at runtime from descriptors (the compiled-in API, a
descriptor-set file, or the upstream's reflection service): every method
with a ``google.api.http`` rule is served at its routes, every other one at
``POST /{package.Service}/{Method}``. The gateway talks to its upstream only
over gRPC and never imports ``protoserve.server``.

Example::

    from protoserve.gateway import build_gateway, from_reflection

    app = build_gateway("127.0.0.1:50051", descriptors=from_reflection("127.0.0.1:50051"))

Methods whose protocol has a JSON of its own get a :class:`Codec` (``codecs=``): the
Open Inference Protocol's REST format is built in, for
``inference.GRPCInferenceService``, and OpenAI's, for
``protoserve.openai.v1.OpenAIService`` (see ``docs/gateway-codecs.md``). It and the
playground are protoserve's own pieces (``gateway/inference/``), which
:func:`build_gateway` registers on the generic core (``gateway/_app.py``).
"""

from __future__ import annotations

from protoserve.gateway._app import DEFAULT_FORWARDED_HEADERS
from protoserve.gateway._assembly import build_gateway, load_codec
from protoserve.gateway._codecs import Codec, CodecRequest, CodecResponse
from protoserve.gateway._descriptors import (
    Descriptors,
    DescriptorSourceError,
    from_descriptor_set,
    from_reflection,
)
from protoserve.gateway._errors import HTTP_STATUS, ErrorInfo, GatewayError, bad_request
from protoserve.gateway._rules import Binding
from protoserve.gateway._streaming import StreamFormat
from protoserve.gateway.inference import OIP_SERVICE, from_compiled

__all__ = [
    "DEFAULT_FORWARDED_HEADERS",
    "HTTP_STATUS",
    "OIP_SERVICE",
    "Binding",
    "Codec",
    "CodecRequest",
    "CodecResponse",
    "DescriptorSourceError",
    "Descriptors",
    "ErrorInfo",
    "GatewayError",
    "StreamFormat",
    "bad_request",
    "build_gateway",
    "from_compiled",
    "from_descriptor_set",
    "from_reflection",
    "load_codec",
]
