"""What travels with a call besides its message: the deadline and the metadata, both ways.

A request's deadline comes from ``Grpc-Timeout`` (gRPC's own format) or
``X-Request-Timeout`` (seconds); chosen headers go upstream as metadata; the
upstream's metadata comes back as ``Grpc-Metadata-*`` and ``Grpc-Trailer-*``
headers.
"""

from __future__ import annotations

import re
from typing import Any

import grpc
from starlette.requests import Request

from protoserve.gateway._errors import GatewayError

__all__ = ["metadata_headers", "outgoing_metadata", "request_deadline"]

_GRPC_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")
_GRPC_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
# Metadata that is gRPC's own business, never echoed as response headers.
_RESERVED_METADATA = frozenset(
    {
        "content-type",
        "grpc-status",
        "grpc-message",
        "x-request-id",
        "grpc-status-details-bin",
        "grpc-encoding",
        "grpc-accept-encoding",
    }
)


def request_deadline(request: Request) -> float | None:
    """The deadline a request asks for: ``Grpc-Timeout`` (gRPC's format) or
    ``X-Request-Timeout`` (seconds)."""
    raw = request.headers.get("grpc-timeout")
    if raw is not None:
        match = _GRPC_TIMEOUT.match(raw.strip())
        if not match:
            raise GatewayError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Grpc-Timeout {raw!r} is not like '10S' or '250m'",
            )
        return int(match[1]) * _GRPC_TIMEOUT_UNITS[match[2]]
    raw = request.headers.get("x-request-timeout")
    if raw is not None:
        try:
            seconds = float(raw)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds < 1e6:
            raise GatewayError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"X-Request-Timeout {raw!r} must be a positive number of seconds",
            )
        return seconds
    return None


def outgoing_metadata(
    request: Request, forwarded: frozenset[str], request_id: str
) -> list[tuple[str, str]]:
    """What goes upstream as metadata: the request id, ``Grpc-Metadata-*`` headers
    (prefix stripped) and the ``forwarded`` headers, less gRPC's own and binary keys.

    Raises:
        GatewayError: INVALID_ARGUMENT, a header to send has a key or a value gRPC
            cannot carry (a control character in ``Authorization``, say).
    """
    metadata = [("x-request-id", request_id)]
    for key, value in request.headers.items():
        key = key.lower()
        if key.startswith("grpc-metadata-"):
            key = key[len("grpc-metadata-") :]
        elif key not in forwarded:
            continue
        # Binary (-bin) metadata would need base64 rules of its own; it is not forwarded.
        if key and not key.endswith("-bin") and key not in _RESERVED_METADATA and value.isascii():
            _check_metadata(key, value)
            metadata.append((key, value))
    return metadata


# What gRPC takes in a metadata key, and in a text value (printable ASCII): anything
# else makes grpc refuse the whole call, which must be the client's 400, not a 500.
_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")
_METADATA_VALUE = re.compile(r"[\x20-\x7e]*")


def _check_metadata(key: str, value: str) -> None:
    """Raises INVALID_ARGUMENT unless gRPC can carry ``key: value`` as metadata."""
    if not _METADATA_KEY.fullmatch(key):
        raise GatewayError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"header {_shown(key)} cannot go upstream as gRPC metadata: "
            "a key takes only a-z, 0-9, '-', '_' and '.'",
        )
    if not _METADATA_VALUE.fullmatch(value):
        raise GatewayError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"header {_shown(key)} cannot go upstream as gRPC metadata: "
            "its value holds a control character",
        )


def _shown(key: str) -> str:
    # The key as the message names it: quoted, escaped, and bounded.
    return repr(key if len(key) <= 64 else key[:64] + "…")


def metadata_headers(metadata: Any, prefix: str) -> dict[str, str]:
    """Upstream metadata as response headers named ``prefix`` + key, less gRPC's own."""
    headers = {}
    for key, value in metadata or ():
        if isinstance(value, str) and key not in _RESERVED_METADATA and value.isascii():
            headers[f"{prefix}{key}"] = value
    return headers
