"""Request ids: the caller's ``X-Request-Id`` when it is sane, else a new one, on every response.

The id is decided once per request, here, and held in
:data:`~protoserve.common.logs.REQUEST_ID` while the request is served: the
endpoints send it upstream (so the server logs the same id), every log line of
the request carries it, and the request's access line ends with it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from protoserve.common.logs import REQUEST_ID, request_id

__all__ = ["RequestIdMiddleware", "current_request_id"]

#: One line per finished request: method, path, status, duration_ms, request_id,
#: grpc_method (when a route matched), client.
access_log = logging.getLogger("protoserve.gateway.access")
#: Probes and scrapes: their access lines are DEBUG, not to drown the rest.
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
#: The status logged for a request that ended before any response (nginx's "client closed").
_NO_RESPONSE = 499


def current_request_id() -> str | None:
    """The id of the request being served (None outside :class:`RequestIdMiddleware`)."""
    return REQUEST_ID.get()


class RequestIdMiddleware:
    """Decides every request's id, gives every response an ``X-Request-Id``, and logs
    one access line per request when its response has ended (a stream's too).

    The gateway's endpoints set the header themselves (with the id decided here,
    see :func:`current_request_id`); this covers the rest (health, OpenAPI, docs,
    errors from Starlette itself).
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
                headers = list(message.get("headers", []))
                if not any(key.lower() == b"x-request-id" for key, _ in headers):
                    message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        token = REQUEST_ID.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status = status or 500  # what Starlette's ServerErrorMiddleware answers
            raise
        finally:
            _log_access(scope, state, status or _NO_RESPONSE, started, rid)
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
    grpc_method = state.get("grpc_method")
    if grpc_method is not None:
        fields["grpc_method"] = grpc_method
    fields["client"] = f"{client[0]}:{client[1]}" if client else None
    level = logging.DEBUG if path in _QUIET_PATHS else logging.INFO
    access_log.log(
        level, "%s %s %d %.1fms", scope["method"], path, status, duration_ms, extra=fields
    )
