"""How the gateway's channel spreads calls over its upstream's servers.

``--upstream`` is any gRPC target: ``host:port``, ``dns:///name:port`` (every address
the name resolves to, followed as it changes), ``ipv4:a:p,b:q``, ``unix:path``. The
channel the gateway opens to it is configured here, in gRPC's own service config
(docs/adr/0021):

- **round robin** over every address, one connection (subchannel) each, not
  gRPC's default ``pick_first`` (all calls to one server);
- **client-side health checking** (``healthCheckConfig``): each connection watches
  the server's health ``""`` (``grpc.health.v1.Health/Watch``), and a server that
  turns NOT_SERVING (draining, models not loaded) gets no new calls. A server
  without the Health service counts as healthy;
- **a retry policy** for UNAVAILABLE: gRPC retries a call only while it has no
  response headers (gRFC A6), which is how protoserve refuses a call during a drain
  (before any work on it), and how grpc core refuses one it never handed to the
  server; the retry goes to another server. A call with headers is never retried;
- **reconnects** to a server that went away at most ``MAX_RECONNECT_BACKOFF``
  seconds apart, so that a restarted server gets calls again soon.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_RECONNECT_BACKOFF", "MAX_RETRIES", "channel_options"]

#: gRPC caps a retry policy's ``maxAttempts`` at 5: the first attempt and 4 retries.
MAX_RETRIES = 4
#: Seconds between attempts to reconnect to a server, at most (grpc core's default: 120).
MAX_RECONNECT_BACKOFF = 5.0


def channel_options(*, retries: int, health_check: bool) -> list[tuple[str, Any]]:
    """grpc channel arguments for the gateway's upstream channel.

    Args:
        retries: retries of a call refused with UNAVAILABLE before any header, 0 to
            ``MAX_RETRIES``; 0: none (grpc core's transparent retries still happen).
        health_check: route calls only to servers whose health ``""`` is SERVING.
    """
    if not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"upstream retries must be 0 to {MAX_RETRIES}, not {retries}")
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health_check:
        config["healthCheckConfig"] = {"serviceName": ""}
    if retries:
        config["methodConfig"] = [
            {
                "name": [{}],  # every method of every service
                "retryPolicy": {
                    "maxAttempts": retries + 1,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return [
        ("grpc.service_config", json.dumps(config)),
        # The service config above is the gateway's: none a DNS TXT record may carry.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.max_reconnect_backoff_ms", round(MAX_RECONNECT_BACKOFF * 1000)),
    ]
