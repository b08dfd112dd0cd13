"""Request ids: the caller's ``X-Request-Id`` when it is sane, else a new one, on every response."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["RequestIdMiddleware", "request_id"]

# Ids end up in logs and upstream metadata: only short, plain ones are taken as given.
_SANE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id(given: str) -> str:
    """``given`` when it is a sane id, else a new one."""
    return given if _SANE.match(given) else uuid.uuid4().hex


class RequestIdMiddleware:
    """Gives every response an ``X-Request-Id``.

    The gateway's endpoints set it themselves (and send it upstream); this covers
    the rest (health, OpenAPI, docs, errors from Starlette itself).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(key.lower() == b"x-request-id" for key, _ in headers):
                    given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
                    rid = request_id(given).encode()
                    message = {**message, "headers": [*headers, (b"x-request-id", rid)]}
            await send(message)

        await self.app(scope, receive, send_with_id)
