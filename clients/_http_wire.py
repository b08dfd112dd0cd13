"""What a call to the REST gateway puts on the wire, for both HTTP clients.

Requests from the methods' routes (:mod:`protoserve.clients._routes`), headers
and deadlines, proto3 JSON to and from messages, and the typed exception for an
HTTP failure: the same class the gRPC clients raise for it.
:class:`HttpClientBase` is the constructor :class:`~protoserve.clients.HttpClient`
and :class:`~protoserve.clients.AsyncHttpClient` share; :class:`Settings` is
what it derives from their arguments, and builds each request.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import httpx
from google.protobuf import json_format
from google.protobuf.message import Message

from ._api import AsyncTransport, BaseClient, Metadata, Transport
from ._errors import DeadlineExceeded, ProtoserveError, Unavailable, from_http_error
from ._routes import ROUTES

__all__ = [
    "DEFAULT_URL",
    "SSE",
    "HttpClientBase",
    "Settings",
    "client_headers",
    "deadline_headers",
    "error_of",
    "httpx_timeout",
    "parse_json",
    "read_response",
    "ssl_verify",
    "transport_error",
]

DEFAULT_URL = "http://127.0.0.1:8080"
#: The ``Accept`` of a stream: Server-Sent Events (the gateway's other format is NDJSON).
SSE = "text/event-stream"

# The client waits this much longer than the deadline it sends, so that the
# server's DEADLINE_EXCEEDED (with its request id) arrives before httpx gives up.
_DEADLINE_MARGIN = 1.0
# Refused connections fail at once; this bounds a connect that hangs (a dropped SYN).
_CONNECT_TIMEOUT = 10.0

M = TypeVar("M", bound=Message)


def parse_json(data: Any, message: M) -> M:
    # Unknown fields are ignored so that a newer server does not break an older client.
    return json_format.ParseDict(data, message, ignore_unknown_fields=True)


def httpx_timeout(seconds: float | None) -> httpx.Timeout:
    if seconds is None:
        return httpx.Timeout(None, connect=_CONNECT_TIMEOUT)
    return httpx.Timeout(seconds + _DEADLINE_MARGIN, connect=min(seconds, _CONNECT_TIMEOUT))


def deadline_headers(seconds: float | None) -> dict[str, str]:
    if seconds is None:
        return {}
    if seconds <= 0:
        raise ValueError(f"timeout must be positive, got {seconds}")
    return {"X-Request-Timeout": repr(float(seconds))}


def client_headers(token: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    merged = {"Accept": "application/json", **(headers or {})}
    if token is not None:
        merged["Authorization"] = f"Bearer {token}"
    return merged


def ssl_verify(verify: bool | str) -> ssl.SSLContext | bool:
    # httpx 0.28 deprecates a CA path as `verify`; build the context it asks for.
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    return verify


def transport_error(error: httpx.TransportError, base_url: str) -> ProtoserveError:
    """The typed error for a failure below HTTP: the same class gRPC gives for it."""
    if isinstance(error, httpx.TimeoutException) and not isinstance(error, httpx.ConnectTimeout):
        return DeadlineExceeded(f"no answer from {base_url} in time: {error!r}")
    return Unavailable(f"cannot reach {base_url}: {error!r}")


def error_of(response: httpx.Response) -> ProtoserveError:
    """The typed exception for a non-2xx response whose body has been read."""
    try:
        body: Any = response.json()
    except ValueError:  # not JSON: a proxy's HTML page, say
        body = response.text
    return from_http_error(response.status_code, body, response.headers)


def read_response(method: str, response: httpx.Response) -> Message:
    """The response message of a unary call, or the typed error of its HTTP failure."""
    if not response.is_success:
        raise error_of(response)
    return parse_json(response.json(), ROUTES[method].response_type())


class Settings:
    """What both clients derive from their constructor arguments."""

    def __init__(
        self,
        base_url: str,
        timeout: float | None,
        token: str | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        deadline_headers(timeout)  # a bad default timeout fails here, not at the first call
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.headers = client_headers(token, headers)

    def client_options(self, verify: bool | str) -> dict[str, Any]:
        """The arguments of the ``httpx.Client`` (or ``AsyncClient``) the calls go through."""
        return {
            "base_url": self.base_url,
            "headers": self.headers,
            "verify": ssl_verify(verify),
            "timeout": httpx_timeout(self.timeout),
        }

    def request(
        self,
        http: httpx.Client | httpx.AsyncClient,
        method: str,
        message: Message,
        timeout: float | None,
        metadata: Metadata,
        accept: str = "application/json",
    ) -> httpx.Request:
        """The HTTP request of a call, on the route of the method's ``google.api.http`` rule.

        The path carries its fields; the rest of the message is the JSON body
        (a rule with ``body: "*"``) or else the query string.
        """
        route = ROUTES[method]
        seconds = self.timeout if timeout is None else timeout
        headers = {**deadline_headers(seconds), "Accept": accept}
        # The gateway passes Grpc-Metadata-<key> headers upstream as <key> metadata.
        headers.update((f"Grpc-Metadata-{key}", value) for key, value in metadata)
        fields = route.fields(message)
        return http.build_request(
            route.verb,
            route.path(message),
            json=fields if route.body else None,
            params=None if route.body or not fields else fields,
            headers=headers,
            timeout=httpx_timeout(seconds),
        )


class HttpClientBase(BaseClient):
    """The constructor of both HTTP clients; each names the transport it builds."""

    _transport_type: Callable[[Settings, bool | str], Transport | AsyncTransport]

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        model: str | None = None,
        timeout: float | None = None,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        verify: bool | str = True,
    ) -> None:
        settings = Settings(base_url, timeout, token, headers)
        self.base_url = settings.base_url
        super().__init__(self._transport_type(settings, verify), model)
