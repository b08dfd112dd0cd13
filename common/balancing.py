"""Balancing in a gRPC channel, for the gateway and the Python clients alike: the
target for one server or several, and gRPC's service config (docs/adr/0021).

gRPC's client does the work: the ``round_robin`` policy over every address of the
target, client-side health checking (``healthCheckConfig``: each connection watches
``grpc.health.v1.Health/Watch`` and a server not SERVING gets no calls), and a retry
policy on UNAVAILABLE. gRPC retries a call only while it has no response headers
(gRFC A6): what a server answers when it refused a call before running it
(protoserve while draining, grpc core for a call it never handed on).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

__all__ = ["MAX_RETRIES", "balances", "is_ip", "service_config", "target_of"]

#: gRPC caps a retry policy's ``maxAttempts`` at 5: the first attempt and 4 retries.
MAX_RETRIES = 4


def is_ip(host: str) -> bool:
    """Whether ``host`` (brackets allowed) is an IP address, not a name."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def balances(target: str) -> bool:
    """Whether a gRPC target may name several servers: ``dns:`` (every address of the
    name) or an ``ipv4:``/``ipv6:`` list of more than one."""
    if target.startswith("dns:"):
        return True
    return target.startswith(("ipv4:", "ipv6:")) and "," in target


def target_of(endpoints: str | Sequence[str]) -> tuple[str, bool]:
    """The channel target for one endpoint or several, and whether it balances.

    Several ``host:port`` endpoints become one ``ipv4:`` (or ``ipv6:``) target,
    gRPC's static address list, so round robin sees each as a backend. Names
    cannot be listed that way: one ``dns:///name:port`` target with several
    addresses does the same.
    """
    if isinstance(endpoints, str):
        return endpoints, balances(endpoints)
    listed = list(endpoints)
    if not listed:
        raise ValueError("target: give at least one endpoint")
    if len(listed) == 1:
        return listed[0], balances(listed[0])
    hosts = [endpoint.rpartition(":")[0] for endpoint in listed]
    if not all(is_ip(host) for host in hosts):
        raise ValueError(
            "several endpoints must be IP addresses ('10.0.0.1:50051'); "
            "for names use one 'dns:///name:port' target"
        )
    scheme = "ipv6" if all(host.startswith("[") for host in hosts) else "ipv4"
    return f"{scheme}:{','.join(listed)}", True


def service_config(
    *,
    retries: int,
    balance: bool,
    health_check: bool = False,
    services: Sequence[str] = (),
) -> dict[str, Any]:
    """gRPC's service config: round robin when ``balance``; client-side health checking
    on health ``""`` when ``health_check`` (with round robin only: gRPC checks the
    connections of a balancing policy); calls that end UNAVAILABLE retried up to
    ``retries`` times (gRPC makes at most ``MAX_RETRIES``) with exponential backoff,
    for the methods of ``services`` (none named: every method). A stream is retried only
    until its first response, so it is never replayed after text reached the caller."""
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, not {retries}")
    config: dict[str, Any] = {}
    if balance:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        if health_check:
            config["healthCheckConfig"] = {"serviceName": ""}
    if retries > 0:
        config["methodConfig"] = [
            {
                "name": [{"service": s} for s in services] or [{}],
                "retryPolicy": {
                    "maxAttempts": retries + 1,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return config
