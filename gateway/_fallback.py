"""What Starlette itself would answer, answered the gateway's way: a ``google.rpc.Status``.

The gateway has one route (``gateway/_app.py``), but Starlette still answers on its
own in two cases, in plain text: a path its path convertor does not match (one
holding a newline, ``%0A``, which ``.*`` stops at) gets a 404, and a verb the route
does not list gets a 405. ``build_app`` makes the one route the router's default,
so that the first is answered like any other path; :func:`starlette_error` renders
whatever HTTPException Starlette still raises as the Status JSON every other error
of the gateway is (docs/architecture.md, rule 4), under ``RequestIdMiddleware``, so
with its ``X-Request-Id``.
"""

from __future__ import annotations

import grpc
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from protoserve.gateway._errors import GatewayError, error_info

__all__ = ["starlette_error"]

#: The code of the HTTP statuses Starlette answers by itself; others are by class.
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,  # as the gateway's own 405
}


async def starlette_error(request: Request, exc: Exception) -> Response:
    """An ``HTTPException`` raised by Starlette, as ``google.rpc.Status`` JSON."""
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    fallback = grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.INVALID_ARGUMENT
    code = _CODES.get(status, fallback)
    error = GatewayError(code, exc.detail, headers=exc.headers, http_status=status)
    info, headers = error_info(error)
    return JSONResponse(info.status_json, status_code=info.status, headers=headers)
