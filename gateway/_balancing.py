"""How the gateway's channel spreads calls over its upstream's servers.

``--upstream`` is any gRPC target: ``host:port``, ``dns:///name:port`` (every address
the name resolves to, followed as it changes), ``ipv4:a:p,b:q``, ``unix:path``. The
channel the gateway opens to it gets gRPC's service config from
:func:`protoserve.common.balancing.service_config` (docs/adr/0021):

- **round robin** over every address, one connection (subchannel) each, not
  gRPC's default ``pick_first`` (all calls to one server);
- **client-side health checking**, for a target that may name several servers
  (:func:`~protoserve.common.balancing.balances`): each connection watches the
  server's health ``""``, and a server that turns NOT_SERVING (draining, models not
  loaded) gets no new calls. A server without the Health service counts as healthy.
  With one server there is nowhere else to go: its calls are sent, and answered, as
  they always were;
- **a retry policy** for UNAVAILABLE: a call refused before any response header (a
  draining protoserve, or grpc core for a call it never handed to the server) is
  sent again, by then to another server once the gateway has seen the refusing one
  turn NOT_SERVING. Retried calls' requests are kept, up to ``max_message_bytes``
  each and ``RETRY_BUFFER_BYTES`` in all; a call past that is not retried. A call
  with headers is never retried;
- **TLS** checks each server of an address list (``ipv4:``/``ipv6:``) against the
  first address's host, as it checks a name's servers against the name;
- **reconnects** to a server that went away at most ``MAX_RECONNECT_BACKOFF``
  seconds apart, so that a restarted server gets calls again soon.
"""

from __future__ import annotations

import json
from typing import Any

from protoserve.common.balancing import MAX_RETRIES, balances, service_config

__all__ = ["MAX_RECONNECT_BACKOFF", "RETRY_BUFFER_BYTES", "channel_options"]

#: Seconds between attempts to reconnect to a server, at most (grpc core's default: 120).
MAX_RECONNECT_BACKOFF = 5.0
#: Bytes of requests kept for retries across the channel's calls in flight.
RETRY_BUFFER_BYTES = 64 * 1024 * 1024


def _authority(target: str) -> list[tuple[str, Any]]:
    """An address list's authority: its first address's host, which TLS checks each
    server's certificate against (grpc core would take the whole list for it, which no
    certificate names). Names (``dns:``) are their own authority."""
    if not target.startswith(("ipv4:", "ipv6:")):
        return []
    first = target.partition(":")[2].split(",")[0]
    return [("grpc.default_authority", first.rpartition(":")[0])]


def channel_options(
    target: str, *, retries: int, health_check: bool | None, max_message_bytes: int
) -> list[tuple[str, Any]]:
    """grpc channel arguments for the gateway's channel to ``target``.

    Args:
        target: the gRPC target (``--upstream``).
        retries: retries of a call refused with UNAVAILABLE before any header, 0 to
            ``MAX_RETRIES``; 0: none (grpc core's transparent retries still happen).
        health_check: route calls only to servers whose health ``""`` is SERVING; None:
            when ``target`` may name several servers.
        max_message_bytes: the largest request, and so the largest one kept for a retry.
    """
    if not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"upstream retries must be 0 to {MAX_RETRIES}, not {retries}")
    several = balances(target)
    config = service_config(
        retries=retries,
        balance=True,
        health_check=several if health_check is None else health_check,
    )
    return [
        *_authority(target),
        ("grpc.service_config", json.dumps(config)),
        # The service config above is the gateway's: none a DNS TXT record may carry.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.max_reconnect_backoff_ms", round(MAX_RECONNECT_BACKOFF * 1000)),
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ("grpc.retry_buffer_size", max(RETRY_BUFFER_BYTES, max_message_bytes)),
    ]
