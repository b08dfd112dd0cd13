"""Bearer tokens: who may make which call, decided once for every call of every service.

:class:`AuthInterceptor` is a grpc.aio server interceptor, so one check covers
every method the server has: InferenceService, the Open Inference Protocol,
health and reflection (grpcio's own servicers, which never pass through
:mod:`protoserve.server.calls`' frame), and method names the server does not
have (refused as UNAUTHENTICATED like any other, not UNIMPLEMENTED: a caller
without a token learns nothing of what is served). docs/adr/0016 says why here.

What a call needs (:meth:`Auth.needs`):

- health (``grpc.health.v1.Health``'s ``Check`` and ``Watch``, the protocol's
  ``ServerLive`` and ``ServerReady``) nothing, unless ``public_health`` is off;
  reflection nothing when ``public_reflection`` is on;
- model control (``RepositoryModelLoad``, ``RepositoryModelUnload``) an admin
  token when admin tokens are configured;
- everything else an inference token (or an admin one) when inference tokens
  are configured.

A call carrying the ``x-protoserve-sibling`` metadata is a sibling worker's of
``protoserve serve --workers`` (:mod:`protoserve.server.siblings`) and is judged by
that alone: the secret of this server's supervisor lets it make ServerReady,
RepositoryIndex, RepositoryModelLoad and RepositoryModelUnload, with no token, on
the worker's unix socket only; any other secret is UNAUTHENTICATED, logged (the secret never is).

A token is sent as ``authorization: Bearer TOKEN`` metadata (the ``Authorization``
header through the gateway). A call without an accepted token gets
UNAUTHENTICATED, an inference token asking for model control PERMISSION_DENIED;
either way in the call's frame (:func:`~protoserve.server.calls.refusal`: request
id, access line, metrics) and without its request being parsed or any servicer,
runtime or model reached. Tokens are compared with :func:`hmac.compare_digest`,
against every configured token, and never logged or put in a message.
"""

from __future__ import annotations

import enum
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
from grpc_health.v1 import health

from protoserve.common.hosts import is_loopback
from protoserve.server.calls import method_label, refusal
from protoserve.server.config import ServerConfig
from protoserve.server.metrics import Metrics
from protoserve.server.oip import SERVICE_NAME as OIP_SERVICE
from protoserve.server.runtime.errors import (
    PermissionDenied,
    ProtoserveError,
    Unauthenticated,
    bounded,
)
from protoserve.server.siblings import SIBLING_HEADER, over_unix_socket, secret_matches, sent_secret

__all__ = [
    "Access",
    "Auth",
    "AuthInterceptor",
    "SiblingSecretError",
    "TokenFileError",
    "read_tokens",
    "warn_if_exposed",
]

log = logging.getLogger("protoserve.server")

#: Methods that load and unload models: an admin token's, when there are admin tokens.
MODEL_CONTROL_METHODS = frozenset(
    f"/{OIP_SERVICE}/{name}" for name in ("RepositoryModelLoad", "RepositoryModelUnload")
)
#: Health for probes and load balancers; public unless ``public_health`` is off. Not
#: Health's ``List``, which no probe calls and which names every model.
HEALTH_METHODS = frozenset(
    [f"/{health.SERVICE_NAME}/{name}" for name in ("Check", "Watch")]
    + [f"/{OIP_SERVICE}/{name}" for name in ("ServerLive", "ServerReady")]
)
#: Server reflection, both versions of it; public only with ``public_reflection``.
REFLECTION_SERVICES = frozenset(
    {"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)
#: What the sibling workers of --workers may call each other for, with their secret.
SIBLING_METHODS = MODEL_CONTROL_METHODS | {
    f"/{OIP_SERVICE}/{name}" for name in ("RepositoryIndex", "ServerReady")
}
#: What a token may hold: printable ASCII without spaces, as gRPC metadata carries it.
_TOKEN = re.compile(r"[\x21-\x7e]+")
#: A sibling secret: 128 bits at least, in hex.
_SECRET = re.compile(r"[0-9a-fA-F]{32,}")


class TokenFileError(ValueError):
    """A token file that cannot be used: unreadable, empty, or holding a bad token.

    The message names the file and the line, never a token.
    """


class SiblingSecretError(TokenFileError):
    """``PROTOSERVE_SIBLING_SECRET`` cannot be used, or is missing where it is needed.

    The message never holds the secret.
    """


class Access(enum.IntEnum):
    """What a call needs, and what a caller's token gives; each includes those below it."""

    ANYONE = 0
    INFERENCE = 1
    ADMIN = 2


def read_tokens(path: str, flag: str) -> tuple[bytes, ...]:
    """The tokens in ``path``: one a line, spaces around it dropped; blank lines and
    lines starting with ``#`` are skipped.

    Raises:
        TokenFileError: the file cannot be read, holds no token, or a line is not a
            token (printable ASCII without spaces); ``flag`` names it in the message.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TokenFileError(f"{flag} {path}: cannot read it: {reason}") from None
    tokens: dict[bytes, None] = {}
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not _TOKEN.fullmatch(token):
            raise TokenFileError(
                f"{flag} {path}, line {number}: a token is printable ASCII without spaces"
            )
        tokens[token.encode("ascii")] = None
    if not tokens:
        raise TokenFileError(f"{flag} {path} holds no token (one a line)")
    return tuple(tokens)


def _matches(token: bytes, keys: Sequence[bytes]) -> bool:
    """Whether ``token`` is one of ``keys``, comparing with every one of them, in constant time."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key)
    return found


def _bearer(metadata: Sequence[tuple[str, Any]] | None) -> bytes | None:
    """The token of the call's first ``authorization`` metadata, when it is ``Bearer TOKEN``."""
    value = next((v for k, v in metadata or () if k == "authorization"), None)
    if not isinstance(value, str):
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    # The scheme is case-insensitive (RFC 9110, 11.1); a token is ASCII (read_tokens).
    if scheme.lower() != "bearer" or not token or not token.isascii():
        return None
    return token.encode("ascii")


@dataclass(frozen=True)
class Auth:
    """The tokens a server accepts, and which calls need which (the module docstring).

    No tokens at all: every call is open (:attr:`enabled` is False).
    """

    #: Tokens for every call but model control; none: those calls need no token.
    inference_tokens: tuple[bytes, ...] = field(default=(), repr=False)
    #: Tokens for every call, model control included; none: model control needs
    #: what other calls need (and the runtime decides whether it is on).
    admin_tokens: tuple[bytes, ...] = field(default=(), repr=False)
    public_health: bool = True
    public_reflection: bool = False
    #: The secret the workers of one supervisor send each other (hex); None: no
    #: call is a sibling's.
    sibling_secret: str | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, config: ServerConfig) -> Auth:
        """The tokens of ``config``'s token files, read now.

        Raises:
            TokenFileError: a file cannot be used (:func:`read_tokens`), or a token is
                in both files (an admin token must be distinct from the inference ones).
            SiblingSecretError: the sibling secret is not 32 hex digits or more, or
                sibling sockets are given without one.
        """
        inference = (
            read_tokens(config.auth_token_file, "--auth-token-file")
            if config.auth_token_file
            else ()
        )
        admin = (
            read_tokens(config.admin_token_file, "--admin-token-file")
            if config.admin_token_file
            else ()
        )
        if set(inference) & set(admin):
            raise TokenFileError(
                f"--admin-token-file {config.admin_token_file} holds a token of "
                f"--auth-token-file {config.auth_token_file}: admin tokens must be distinct"
            )
        return cls(
            inference,
            admin,
            config.public_health,
            config.public_reflection,
            _sibling_secret(config),
        )

    @property
    def enabled(self) -> bool:
        """Whether any call needs a token."""
        return bool(self.inference_tokens or self.admin_tokens)

    @property
    def intercepts(self) -> bool:
        """Whether calls need checking at all: some need a token, or sibling workers
        vouch for theirs with a secret (whose wrong ones are refused)."""
        return self.enabled or self.sibling_secret is not None

    def needs(self, method: str) -> Access:
        """What a call of ``method`` (``/package.Service/Method``) needs."""
        service = method[1:].rpartition("/")[0]
        if self.public_health and method in HEALTH_METHODS:
            return Access.ANYONE
        if self.public_reflection and service in REFLECTION_SERVICES:
            return Access.ANYONE
        if method in MODEL_CONTROL_METHODS and self.admin_tokens:
            return Access.ADMIN
        return Access.INFERENCE if self.inference_tokens else Access.ANYONE

    def access(self, token: bytes | None) -> Access:
        """What a bearer token gives: ANYONE for none, or one the server does not accept."""
        if token is None:
            return Access.ANYONE
        # Both compared always: the time taken does not tell which kind a token is.
        admin = _matches(token, self.admin_tokens)
        inference = _matches(token, self.inference_tokens)
        if admin:
            return Access.ADMIN
        return Access.INFERENCE if inference else Access.ANYONE

    def check(
        self, method: str, metadata: Sequence[tuple[str, Any]] | None
    ) -> ProtoserveError | None:
        """None when a call of ``method`` with ``metadata`` may go on, else what it gets.

        A sibling worker's call (:data:`SIBLING_HEADER`) is judged by its secret alone
        (:meth:`check_sibling`); the interceptor then lets it in on a unix socket only.
        """
        secret = sent_secret(metadata)
        if secret is not None:
            return self.check_sibling(method, secret)
        needed = self.needs(method)
        if needed is Access.ANYONE:
            return None
        token = _bearer(metadata)
        given = self.access(token)
        if given >= needed:
            return None
        name = bounded(method_label(method))  # the caller's to choose
        if given is Access.INFERENCE:
            return PermissionDenied(
                f"{name} needs an admin token (the server's --admin-token-file); "
                "this token may make inference calls only",
                reason="ADMIN_TOKEN_REQUIRED",
            )
        kind = "an admin bearer token" if needed is Access.ADMIN else "a bearer token"
        if token is None:
            return Unauthenticated(
                f"{name} needs {kind}: send the metadata 'authorization: Bearer TOKEN' "
                "(over HTTP, the header 'Authorization: Bearer TOKEN')",
                reason="TOKEN_MISSING",
            )
        return Unauthenticated(
            f"{name} needs {kind}; this one is not accepted", reason="TOKEN_INVALID"
        )

    def check_sibling(self, method: str, given: str) -> ProtoserveError | None:
        """None when ``given`` is this server's sibling secret and ``method`` one a
        sibling makes (:data:`SIBLING_METHODS`), else what the call gets. A wrong
        secret is logged, without it: someone on this machine is trying."""
        name = bounded(method_label(method))
        if not secret_matches(given, self.sibling_secret):
            log.warning(
                "refused %s: its %s metadata is not this server's sibling secret",
                name,
                SIBLING_HEADER,
            )
            return Unauthenticated(
                f"{name}: the {SIBLING_HEADER} secret is not accepted (it is for the workers "
                "of one 'protoserve serve --workers' among themselves)",
                reason="SIBLING_SECRET_INVALID",
            )
        if method not in SIBLING_METHODS:
            return PermissionDenied(
                f"{name}: a sibling worker's secret is good for ServerReady, RepositoryIndex, "
                "RepositoryModelLoad and RepositoryModelUnload only",
                reason="NOT_A_SIBLING_METHOD",
            )
        return None


def _sibling_secret(config: ServerConfig) -> str | None:
    """``config``'s sibling secret, checked (see :meth:`Auth.from_config`)."""
    secret = config.sibling_secret
    if secret is not None and not _SECRET.fullmatch(secret):
        raise SiblingSecretError("PROTOSERVE_SIBLING_SECRET must be 32 hex digits or more")
    if config.sibling_sockets and secret is None:
        raise SiblingSecretError(
            "PROTOSERVE_SIBLING_SOCKETS needs PROTOSERVE_SIBLING_SECRET: the workers prove "
            "themselves to each other with it"
        )
    return secret


if TYPE_CHECKING:  # generic in grpc-stubs only
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


class AuthInterceptor(_ServerInterceptor):
    """Lets through the calls :meth:`Auth.check` allows; answers the others with its error,
    in the call's frame, counted in ``metrics`` under the method's name (a method the
    server has; one it has not is logged but not counted)."""

    def __init__(self, auth: Auth, metrics: Metrics | None = None) -> None:
        self.auth = auth
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method
        metadata = handler_call_details.invocation_metadata
        error = self.auth.check(method, metadata)
        # None for a method the server does not have (the stubs do not say so).
        handler = await continuation(handler_call_details)
        if error is None:
            if handler is not None and sent_secret(metadata) is not None:
                return self._on_unix_socket_only(handler, method)
            return handler
        # The refusal takes the method's kind; None: a method the server does not have,
        # whose name (the caller's to choose) is not a metrics label.
        name = bounded(method_label(method))
        return refusal(handler, name, error, self.metrics if handler is not None else None)

    def _on_unix_socket_only(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` (a sibling method's: unary) for calls on a unix socket, the worker
        socket; over TCP a sibling's secret gives nothing, since the peer is not
        known to run as this user. The interceptor cannot tell: the call's peer is
        known only once it runs."""
        name = bounded(method_label(method))
        refused = refusal(
            handler,
            name,
            Unauthenticated(
                f"{name}: a sibling worker's call is taken on its worker socket only",
                reason="SIBLING_NOT_ON_WORKER_SOCKET",
            ),
            self.metrics,
        )
        inner = cast(Callable[..., Awaitable[Any]], handler.unary_unary)
        outer = cast(Callable[..., Awaitable[Any]], refused.unary_unary)

        async def behavior(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if over_unix_socket(context):
                return await inner(request, context)
            return await outer(request, context)

        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def warn_if_exposed(host: str, auth: Auth, *, model_control: bool) -> None:
    """Log a WARNING when the server listens beyond loopback and calls need no token;
    then say at INFO what needs a token, when anything does."""
    if auth.enabled:
        log.info(
            "bearer tokens: %d for inference, %d admin; health %s, reflection %s",
            len(auth.inference_tokens),
            len(auth.admin_tokens),
            "public" if auth.public_health else "needs a token",
            "public" if auth.public_reflection else "needs a token",
        )
    if is_loopback(host):
        return
    if not auth.inference_tokens:
        log.warning(
            "serving gRPC on %s without authentication: anyone who can reach this port can "
            "call every model; give --auth-token-file (docs/security.md)",
            host,
        )
    if model_control and not auth.admin_tokens:
        log.warning(
            "model control is on without --admin-token-file: any caller %s can load and "
            "unload models (docs/security.md)",
            "with an inference token" if auth.inference_tokens else "who can reach this port",
        )
