"""Request ids: the caller's ``X-Request-Id`` when it is sane, else a new one, on every response.

The id is decided once per request, here, by the rule both processes share
(:func:`protoserve.common.logs.request_id`), and held in
:data:`~protoserve.common.logs.REQUEST_ID` while the request is served: the call
sends it upstream (so the server logs the same id), every log line of the request
carries it, every response carries it, and the request's access line ends with it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from protoserve.common.logs import REQUEST_ID, request_id
from protoserve.gateway._cancel import CLIENT_CLOSED

__all__ = ["GRPC_METHOD", "RequestIdMiddleware", "current_request_id"]

#: One line per finished request: method, path, status, duration_ms, request_id,
#: grpc_method (when a route matched), client.
access_log = logging.getLogger("protoserve.gateway.access")
#: Probes and scrapes: their access lines are DEBUG, not to drown the rest.
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_HEADER = b"x-request-id"


#: What an endpoint leaves in ``request.state`` for the access line: the gRPC method
#: (``/package.Service/Method``) once a route matched.
GRPC_METHOD = "grpc_method"


def current_request_id() -> str:
    """The id :class:`RequestIdMiddleware` decided for the request being served.

    Raises:
        LookupError: outside the middleware, where no request is being served.
    """
    rid = REQUEST_ID.get()
    if rid is None:
        raise LookupError("no request id: the app is not behind RequestIdMiddleware")
    return rid


class RequestIdMiddleware:
    """Decides every request's id, gives every response its ``X-Request-Id``, and logs
    one access line per request when its response has ended (a stream's too).

    The header is set here and only here, over any an endpoint or a codec set.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = request_id(given)
        status: int | None = None
        # The endpoints leave what the access line wants to know here (request.state).
        state: dict[str, Any] = scope.setdefault("state", {})

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != _HEADER]
                message = {**message, "headers": [*headers, (_HEADER, rid.encode())]}
            await send(message)

        token = REQUEST_ID.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status = status or 500  # what Starlette's ServerErrorMiddleware answers
            raise
        finally:
            _log_access(scope, state, status or CLIENT_CLOSED, started, rid)
            REQUEST_ID.reset(token)


def _log_access(scope: Scope, state: dict[str, Any], status: int, started: float, rid: str) -> None:
    duration_ms = round((time.perf_counter() - started) * 1000, 3)
    path = scope["path"]
    client = scope.get("client")
    fields: dict[str, Any] = {
        "method": scope["method"],
        "path": path,
        "status": status,
        "duration_ms": duration_ms,
        "request_id": rid,
    }
    grpc_method = state.get(GRPC_METHOD)
    if grpc_method is not None:
        fields["grpc_method"] = grpc_method
    fields["client"] = f"{client[0]}:{client[1]}" if client else None
    level = logging.DEBUG if path in _QUIET_PATHS else logging.INFO
    access_log.log(
        level, "%s %s %d %.1fms", scope["method"], path, status, duration_ms, extra=fields
    )
