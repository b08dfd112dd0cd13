"""Which listening addresses reach beyond this machine: both processes say so at start-up
when they listen there without authentication of their own (docs/security.md)."""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback"]


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` (``127.0.0.1``, ``[::1]``, ``localhost``) reaches
    this machine only; a host name other than localhost counts as reaching further."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
