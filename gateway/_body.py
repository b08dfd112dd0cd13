"""Request bodies: read within the size limit, inflated when gzip- or deflate-encoded.

One limit, ``max_body_bytes``, bounds both what comes over the wire and what a
``Content-Encoding`` inflates to, so a small compressed body cannot grow into a
large one in memory (a "zip bomb"). Compressed bodies are cheap to take here and
some clients send them (``tritonclient.http``'s ``request_compression_algorithm``).
"""

from __future__ import annotations

import zlib

import grpc
from starlette.requests import Request

from protoserve.gateway._errors import GatewayError

__all__ = ["check_content_type", "read_body"]

# Content-Encoding -> zlib's wbits: gzip's header, zlib's (HTTP "deflate"), or none.
_GZIP = 16 + zlib.MAX_WBITS
_ZLIB = zlib.MAX_WBITS
_RAW_DEFLATE = -zlib.MAX_WBITS


def _too_big(limit: int) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"the request body is larger than {limit} bytes",
        http_status=413,
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, decoded from its ``Content-Encoding``, at most ``limit`` bytes.

    Raises:
        GatewayError: 413 when the body, sent or inflated, is larger than ``limit``;
            415 for a content coding other than gzip, deflate or identity; 400 for a
            compressed body that does not inflate.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_big(limit)
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise _too_big(limit)
        parts.append(part)
    body = b"".join(parts)
    coding = request.headers.get("content-encoding", "").strip().lower()
    if coding in ("", "identity") or not body:
        return body
    if coding in ("gzip", "x-gzip"):
        return _inflate(body, _GZIP, limit, coding)
    if coding == "deflate":
        # HTTP's "deflate" is the zlib format (RFC 9110 8.4.1.2); some clients send
        # raw deflate instead, which the zlib header check tells apart.
        try:
            return _inflate(body, _ZLIB, limit, coding)
        except GatewayError as error:
            if error.http_status == 413:
                raise
            return _inflate(body, _RAW_DEFLATE, limit, coding)
    raise GatewayError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"Content-Encoding {coding!r} is not supported; send gzip, deflate or identity",
        http_status=415,
    )


def _inflate(body: bytes, wbits: int, limit: int, coding: str) -> bytes:
    inflater = zlib.decompressobj(wbits)
    try:
        # At most limit + 1 bytes come out: one more than allowed proves it too big.
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise GatewayError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request body is not valid {coding} data ({exc})",
        ) from None
    if len(out) > limit:
        raise _too_big(limit)
    if not inflater.eof or inflater.unused_data:
        raise GatewayError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request body is not one complete {coding} stream",
        )
    return out


def check_content_type(header: str) -> None:
    """Bodies are read as JSON whatever the header says, except kinds that are surely not JSON.

    ``curl -d`` labels every body ``application/x-www-form-urlencoded``: refusing
    it would fail the most common way people try an API. A JSON syntax error
    still names where the body went wrong.

    Raises:
        GatewayError: 415 for multipart, protobuf and gRPC bodies.
    """
    kind = header.split(";")[0].strip().lower()
    if kind.startswith("multipart/") or "protobuf" in kind or kind.startswith("application/grpc"):
        raise GatewayError(
            grpc.StatusCode.INVALID_ARGUMENT, f"the body must be JSON, not {kind}", http_status=415
        )
