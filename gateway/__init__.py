"""protoserve.gateway: the REST/SSE gateway built at runtime from proto descriptors.

The gateway talks to a server only over gRPC and never imports
``protoserve.server``. It is being built under issue #3; until then this package
holds nothing public.
"""

from __future__ import annotations

__all__: list[str] = []
