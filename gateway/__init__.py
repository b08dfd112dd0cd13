"""protoserve.gateway: any gRPC service as JSON over HTTP, and server streams as SSE.

The app is built at runtime from descriptors (the compiled-in API, a
descriptor-set file, or the upstream's reflection service): every method
with a ``google.api.http`` rule is served at its routes, every other one at
``POST /{package.Service}/{Method}``. The gateway talks to its upstream only
over gRPC and never imports ``protoserve.server``.

Example::

    from protoserve.gateway import build_gateway, from_reflection

    app = build_gateway("127.0.0.1:50051", descriptors=from_reflection("127.0.0.1:50051"))
"""

from __future__ import annotations

from protoserve.gateway._app import DEFAULT_FORWARDED_HEADERS, build_gateway
from protoserve.gateway._descriptors import (
    Descriptors,
    DescriptorSourceError,
    from_compiled,
    from_descriptor_set,
    from_reflection,
)
from protoserve.gateway._errors import HTTP_STATUS, GatewayError

__all__ = [
    "DEFAULT_FORWARDED_HEADERS",
    "HTTP_STATUS",
    "DescriptorSourceError",
    "Descriptors",
    "GatewayError",
    "build_gateway",
    "from_compiled",
    "from_descriptor_set",
    "from_reflection",
]
