"""What a call to the REST gateway puts on the wire, for both HTTP clients.

URLs, headers and deadlines, proto3 JSON to and from messages, and the typed
exception for an HTTP failure: the same class the gRPC clients raise for it.
:class:`Settings` is what :class:`~protoserve.clients.HttpClient` and
:class:`~protoserve.clients.AsyncHttpClient` both derive from their
constructor arguments, and builds each request.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from google.protobuf import json_format
from google.protobuf.message import Message

from ._errors import DeadlineExceeded, ProtoserveError, Unavailable, from_http_error

__all__ = [
    "DEFAULT_URL",
    "Metadata",
    "Settings",
    "client_headers",
    "deadline_headers",
    "error_of",
    "httpx_timeout",
    "json_body",
    "parse_json",
    "ssl_verify",
    "transport_error",
    "url_path",
]

DEFAULT_URL = "http://127.0.0.1:8080"

# The client waits this much longer than the deadline it sends, so that the
# server's DEADLINE_EXCEEDED (with its request id) arrives before httpx gives up.
_DEADLINE_MARGIN = 1.0
# Refused connections fail at once; this bounds a connect that hangs (a dropped SYN).
_CONNECT_TIMEOUT = 10.0

M = TypeVar("M", bound=Message)
Metadata = Sequence[tuple[str, str]]


def url_path(model: str, verb: str) -> str:
    # A model name is one path segment: quote "/" too, as the route's {model} expects.
    return f"/v1/models/{quote(model, safe='')}:{verb}"


def json_body(message: Message) -> dict[str, Any]:
    """The request as proto3 JSON, without ``model``: the URL path carries it."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    data.pop("model", None)
    return data


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


class Settings:
    """What both clients derive from their constructor arguments."""

    def __init__(
        self,
        base_url: str,
        model: str | None,
        timeout: float | None,
        token: str | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        deadline_headers(timeout)  # a bad default timeout fails here, not at the first call
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.headers = client_headers(token, headers)

    def request(
        self,
        http: httpx.Client | httpx.AsyncClient,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        timeout: float | None,
        metadata: Metadata,
        accept: str = "application/json",
    ) -> httpx.Request:
        seconds = self.timeout if timeout is None else timeout
        headers = {**deadline_headers(seconds), "Accept": accept}
        # The gateway passes Grpc-Metadata-<key> headers upstream as <key> metadata.
        headers.update((f"Grpc-Metadata-{key}", value) for key, value in metadata)
        return http.build_request(
            method, path, json=body, headers=headers, timeout=httpx_timeout(seconds)
        )
