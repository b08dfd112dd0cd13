"""``protoserve gateway``: serve a gRPC server's methods as JSON over HTTP, and SSE."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import uvicorn

from protoserve.common import workers
from protoserve.common.balancing import MAX_RETRIES
from protoserve.common.hosts import is_loopback
from protoserve.common.logs import FORMATS
from protoserve.common.logs import configure as configure_logging

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["build_parser", "listening_socket", "main"]


def _env(name: str, default: str) -> str:
    """A flag's default from ``PROTOSERVE_GATEWAY_<NAME>``, as a string.

    Numeric flags keep it a string and let argparse apply the flag's type: a bad
    value is then a usage error naming the flag, and only when the flag is not
    given. (Kubernetes' service links set ``PROTOSERVE_GATEWAY_PORT=tcp://...``
    for a Service named protoserve-gateway; ``--port`` must still win over it.)
    """
    return os.environ.get(f"PROTOSERVE_GATEWAY_{name}", default)


def _grace(text: str) -> float:
    """--shutdown-grace: a finite number of seconds, 0 or more."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more: {text!r}")
    return value


def _flag(flag: str, default: str) -> str:
    """``--flag``'s default from its variable: ``--max-body-bytes`` reads
    ``PROTOSERVE_GATEWAY_MAX_BODY_BYTES`` (see :func:`_env`)."""
    return _env(flag.removeprefix("--").upper().replace("-", "_"), default)


def _switch(flag: str) -> bool:
    """A switch's default: on when its variable is 1, true or yes."""
    return _flag(flag, "") in ("1", "true", "yes")


def _undecided(flag: str) -> bool | None:
    """A switch whose default something else decides: its variable (on: 1, true, yes or
    on; anything else off), or None where it is unset."""
    value = _flag(flag, "").strip().lower()
    return None if not value else value in ("1", "true", "yes", "on")


def _maybe(flag: str) -> str | None:
    """An optional value's default: its variable, or None."""
    return _flag(flag, "") or None


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``protoserve gateway``, each defaulting to its ``PROTOSERVE_GATEWAY_*``."""
    parser = argparse.ArgumentParser(
        prog="protoserve gateway",
        description="Serve every method of a gRPC server over HTTP: JSON for unary calls, "
        "Server-Sent Events or NDJSON for server streaming, OpenAPI at /openapi.json, docs "
        "at /docs. Flags also read PROTOSERVE_GATEWAY_<FLAG> environment variables.",
    )
    _upstream_flags(parser)
    _upstream_tls_flags(parser)
    _http_flags(parser)
    _behaviour_flags(parser)
    _exposure_flags(parser)
    return parser


def _upstream_flags(parser: argparse.ArgumentParser) -> None:
    """What to call and what it serves."""
    parser.add_argument(
        "--upstream",
        default=_flag("--upstream", "127.0.0.1:50051"),
        help="the gRPC server: HOST:PORT, or any gRPC target for many servers "
        "(dns:///NAME:PORT, ipv4:HOST:PORT,HOST:PORT), balanced round robin "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--upstream-retries",
        type=int,
        metavar="N",
        default=_flag("--upstream-retries", "2"),
        help="retries, on another server, of a call an upstream refused with UNAVAILABLE "
        f"before any header, as a draining server does; 0 to {MAX_RETRIES} "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--upstream-health-check",
        action=argparse.BooleanOptionalAction,
        default=_undecided("--upstream-health-check"),
        help='send calls only to upstream servers whose health "" is SERVING (gRPC '
        "client-side health checking; default: when --upstream may name several servers: "
        "dns:, or an address list)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--from-reflection",
        action="store_true",
        default=_switch("--from-reflection"),
        help="read the services from the upstream's reflection service",
    )
    source.add_argument(
        "--descriptor-set",
        metavar="FILE",
        default=_maybe("--descriptor-set"),
        help="read the services from a FileDescriptorSet file "
        "(protoc --include_imports [--include_source_info] --descriptor_set_out)",
    )
    parser.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME",
        help="serve only this service (repeatable; default: all)",
    )


def _upstream_tls_flags(parser: argparse.ArgumentParser) -> None:
    """TLS to the upstream gRPC server (gateway/_tls.py); plaintext without any of them."""
    parser.add_argument(
        "--upstream-tls",
        action="store_true",
        default=_switch("--upstream-tls"),
        help="call the upstream over TLS, trusting the system's CA certificates (implied by "
        "the flags below)",
    )
    parser.add_argument(
        "--upstream-ca",
        metavar="PEM",
        default=_maybe("--upstream-ca"),
        help="call the upstream over TLS, trusting these CA certificates (PEM) for its "
        "certificate, which must name the host of --upstream",
    )
    parser.add_argument(
        "--upstream-certfile",
        metavar="PEM",
        default=_maybe("--upstream-certfile"),
        help="mTLS: the gateway's client certificate chain for the upstream (needs "
        "--upstream-keyfile)",
    )
    parser.add_argument(
        "--upstream-keyfile",
        metavar="PEM",
        default=_maybe("--upstream-keyfile"),
        help="the private key of --upstream-certfile (unencrypted PEM)",
    )


def _http_flags(parser: argparse.ArgumentParser) -> None:
    """Where and how it listens, and what it takes."""
    parser.add_argument(
        "--host",
        default=_flag("--host", "127.0.0.1"),
        help="address to listen on (default %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=_flag("--port", "8080"),
        help="port to listen on (default %(default)s)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow this origin (repeatable; CORS is off by default)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=_flag("--max-body-bytes", str(4 * 1024 * 1024)),
        help="larger request bodies get 413 (default %(default)s)",
    )
    parser.add_argument(
        "--port-file",
        default=None,
        help="write the bound port to this file once listening (with --port 0)",
    )
    parser.add_argument(
        "--workers",
        type=workers.worker_count,
        metavar="N",
        default=_flag("--workers", "1"),
        help="gateway processes on the one port (SO_REUSEPORT); each counts its own "
        "/metrics (default %(default)s)",
    )
    parser.add_argument(
        "--http2",
        action="store_true",
        default=_switch("--http2"),
        help="serve with hypercorn instead of uvicorn: HTTP/2 and HTTP/1.1 on the same port "
        "(cleartext HTTP/2 by prior knowledge or h2c upgrade; over TLS, ALPN offers h2 and "
        "http/1.1)",
    )
    parser.add_argument(
        "--certfile",
        metavar="PEM",
        default=_maybe("--certfile"),
        help="serve HTTPS with this certificate chain (needs --keyfile); works with or without "
        "--http2, but only --http2 negotiates HTTP/2 over TLS",
    )
    parser.add_argument(
        "--keyfile",
        metavar="PEM",
        default=_maybe("--keyfile"),
        help="the private key of --certfile (unencrypted PEM)",
    )


def _on_unless_off(flag: str) -> bool:
    """A page's default: on, unless its variable is 0, false, no or off."""
    return _flag(flag, "").strip().lower() not in ("0", "false", "no", "off")


def _exposure_flags(parser: argparse.ArgumentParser) -> None:
    """Which of the gateway's own pages it serves (docs/security.md, what is exposed)."""
    parser.add_argument(
        "--docs",
        action=argparse.BooleanOptionalAction,
        default=_on_unless_off("--docs"),
        help="serve the OpenAPI document at /openapi.json and the docs page at /docs "
        "(default: on; --no-docs: both answer 404)",
    )
    parser.add_argument(
        "--playground",
        action=argparse.BooleanOptionalAction,
        default=_undecided("--playground"),
        help="serve the text-generation playground page at / (default: when "
        "protoserve.inference.v1.InferenceService is served; --no-playground: / answers 404)",
    )
    parser.add_argument(
        "--metrics",
        action=argparse.BooleanOptionalAction,
        default=_on_unless_off("--metrics"),
        help="serve the gateway's Prometheus metrics at /metrics (default: on; "
        "--no-metrics: it answers 404)",
    )


def _behaviour_flags(parser: argparse.ArgumentParser) -> None:
    """How it answers, stops and logs."""
    parser.add_argument(
        "--codec",
        action="append",
        default=[],
        metavar="NAME=CODEC",
        help="serve a service or method (full name) in another HTTP format: CODEC is 'oip', "
        "'protobuf' (protobuf's JSON mapping; turns a codec off) or package.module:attribute "
        "(a protoserve.gateway.Codec, or what makes one). Repeatable. "
        "inference.GRPCInferenceService gets 'oip' by default",
    )
    parser.add_argument(
        "--camel-case",
        action="store_true",
        help="answer with lowerCamelCase JSON names instead of the .proto names",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=_grace,
        default=_flag("--shutdown-grace", str(DEFAULT_GRACE_SECONDS)),
        metavar="SECONDS",
        help="after the first SIGTERM/SIGINT, requests in flight (streams included) get "
        "this long to finish; a second signal ends them at once (default %(default)s)",
    )
    parser.add_argument("--log-level", default=_flag("--log-level", "INFO"))
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default=_flag("--log-format", "text"),
        help="text, or json for one JSON object per line (default %(default)s)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the gateway until SIGTERM/SIGINT; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.certfile is None) != (args.keyfile is None):
        parser.error("--certfile and --keyfile go together")
    if args.log_format not in FORMATS:  # argparse checks a flag's value, not its default
        parser.error(
            f"PROTOSERVE_GATEWAY_LOG_FORMAT={args.log_format!r} is not one of {', '.join(FORMATS)}"
        )
    configure_logging(args.log_level, args.log_format)
    if args.workers > 1:  # each worker builds its own app, reflection included
        return _supervise(args, argv)
    from protoserve.gateway._assembly import build_gateway, parse_codec_option
    from protoserve.gateway._descriptors import (
        DescriptorSourceError,
        from_descriptor_set,
        from_reflection,
    )
    from protoserve.gateway._tls import upstream_credentials
    from protoserve.gateway.inference import from_compiled

    try:
        # A bad TLS file is a TLSFileError (a ValueError): one line, exit 2.
        credentials = upstream_credentials(
            tls=args.upstream_tls,
            ca=args.upstream_ca,
            certfile=args.upstream_certfile,
            keyfile=args.upstream_keyfile,
        )
        if args.from_reflection:
            descriptors = from_reflection(
                args.upstream, services=args.service, credentials=credentials
            )
        elif args.descriptor_set:
            path = Path(args.descriptor_set)
            descriptors = from_descriptor_set(
                path.read_bytes(), source=str(path), services=args.service
            )
        else:
            descriptors = from_compiled()
        codecs = dict(parse_codec_option(option) for option in args.codec)
        app = build_gateway(
            args.upstream,
            channel_credentials=credentials,
            descriptors=descriptors,
            cors_origins=args.cors_origin,
            max_body_bytes=args.max_body_bytes,
            use_proto_names=not args.camel_case,
            codecs=codecs,
            docs=args.docs,
            playground=args.playground,
            metrics=args.metrics,
            upstream_retries=args.upstream_retries,
            upstream_health_check=args.upstream_health_check,
        )
        if args.certfile:
            # Load the pair now so that a bad file is a one-line error (exit 2), not a
            # traceback from inside the server after it has started; ssl.SSLError is an OSError.
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                args.certfile, args.keyfile
            )
    except (DescriptorSourceError, OSError, ValueError) as exc:
        _fail(args.log_format, str(exc))
        return 2
    # The socket is bound here, not by the server, so that --port 0 can report its port.
    try:
        sock = listening_socket(args.host, args.port, reuse_port=workers.worker_index() is not None)
    except OSError as exc:
        _fail(args.log_format, f"cannot listen on {args.host}:{args.port}: {exc.strerror}")
        return 1
    port = sock.getsockname()[1]
    port_file = Path(args.port_file) if args.port_file else None
    scheme = "HTTPS" if args.certfile else "HTTP"
    protocols = "HTTP/2 and HTTP/1.1" if args.http2 else "HTTP/1.1"
    log = logging.getLogger("protoserve.gateway")
    log.info("serving %s (%s) on %s:%d", scheme, protocols, args.host, port)
    if not is_loopback(args.host):
        # It checks no credential itself: it passes Authorization on (docs/security.md).
        log.warning(
            "serving on %s with no authentication of its own: every call is the "
            "upstream's to authenticate (serve --auth-token-file)",
            args.host,
        )
    if args.http2:
        return _serve_hypercorn(app, sock, args, port_file)
    return _serve_uvicorn(app, sock, args, port_file)


def listening_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening. Raises OSError.

    Made with proto IPPROTO_TCP, not the default 0: asyncio turns Nagle off
    (TCP_NODELAY) only on connections accepted from a socket whose proto says TCP.
    With Nagle on, a response's body waits for the ACK of its headers, which the
    client delays by about 40 ms, on every keep-alive request after the first.
    ``reuse_port``: a worker of ``--workers``, sharing the port (common/workers.py).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _supervise(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``--workers N``: N gateways on one port (common/workers.py). The gateway keeps no
    state between requests, so any worker answers any request; each has its own metrics."""
    plan = workers.Plan(
        command="gateway",
        argv=argv,
        host=args.host,
        port=args.port,
        workers=args.workers,
        port_file=args.port_file,
    )
    try:
        return workers.supervise(plan)
    except OSError as exc:
        _fail(args.log_format, str(exc))
        return 1


def _fail(log_format: str, message: str) -> None:
    """Report why the gateway cannot run: one plain line, or a JSON one in a JSON log."""
    if log_format == "json":
        logging.getLogger("protoserve.gateway").error("%s", message)
    else:
        print(f"protoserve gateway: {message}", file=sys.stderr)


def _serve_uvicorn(
    app: Starlette, sock: socket.socket, args: argparse.Namespace, port_file: Path | None
) -> int:
    """Serve HTTP/1.1 (HTTPS with --certfile) on ``sock`` with uvicorn until signalled.

    As on hypercorn's path, requests still running when the grace is over (or at a
    second signal) are ended by ``_Drain``, as if their clients had left; uvicorn's own
    cancelling, a traceback per request, is only a backstop.
    """
    port = sock.getsockname()[1]
    drain = _Drain(app, args.shutdown_grace)
    config = uvicorn.Config(
        drain,
        log_level=args.log_level.lower(),
        access_log=False,  # the gateway logs its own (RequestIdMiddleware)
        # uvicorn's loggers go through the root handler, in the gateway's format.
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=math.ceil(drain.backstop),
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
    )
    server = _Server(config)
    if port_file is not None:
        original_startup = server.startup

        async def startup(sockets: list[socket.socket] | None = None) -> None:
            await original_startup(sockets)
            port_file.write_text(f"{port}\n")  # noqa: ASYNC240 - once, tiny

        server.startup = startup  # type: ignore[method-assign]

    async def serve() -> None:
        def begin() -> None:  # uvicorn's graceful shutdown: stop accepting, wait
            server.should_exit = True

        drain.on_signals(begin)
        await server.serve(sockets=[sock])

    asyncio.run(serve())
    return 0 if server.started else 1


def _serve_hypercorn(
    app: Starlette, sock: socket.socket, args: argparse.Namespace, port_file: Path | None
) -> int:
    """Serve HTTP/2 and HTTP/1.1 on ``sock`` with hypercorn until signalled.

    Same contract as uvicorn's path: the port file is written once requests are
    accepted; the first SIGTERM/SIGINT stops accepting and lets requests in flight
    finish (up to ``--shutdown-grace``), a second one ends them now; both exit 0.
    Returns 1 when the app's startup fails.
    """
    # Imported here: only --http2 pays for hypercorn (and h2) at startup.
    import hypercorn.asyncio
    import hypercorn.config
    import hypercorn.typing
    import hypercorn.utils

    port = sock.getsockname()[1]
    config = hypercorn.config.Config()
    # hypercorn takes an inherited descriptor as "fd://N" and wraps it in a socket of
    # its own; detach() hands the descriptor over, so it has one owner that closes it
    # (two socket objects on one number would close it twice).
    config.bind = [f"fd://{sock.detach()}"]
    config.backlog = 2048  # asyncio listen()s again with this backlog; keep uvicorn's
    config.certfile = args.certfile
    config.keyfile = args.keyfile
    # _Drain ends requests at the grace; hypercorn's own cancelling is only a backstop.
    drain = _Drain(app, args.shutdown_grace)
    config.graceful_timeout = drain.backstop
    config.accesslog = None  # as uvicorn's access_log=False
    # A Logger object is used as is, so hypercorn's lines go through the gateway's format
    # (given "-", hypercorn would install a handler and format of its own).
    config.errorlog = logging.getLogger("hypercorn.error")
    started = False

    async def serve() -> None:
        stop = asyncio.Event()

        async def shutdown_trigger() -> None:
            # hypercorn awaits the trigger once its listeners accept, after the app's
            # lifespan startup: the moment uvicorn's path writes the port file too.
            nonlocal started
            started = True
            if port_file is not None:
                port_file.write_text(f"{port}\n")  # noqa: ASYNC240 - once, tiny
            await stop.wait()

        drain.on_signals(stop.set)  # hypercorn stops accepting and waits for requests
        # The cast: hypercorn types the ASGI callable with its TypedDict events, Starlette
        # with plain mappings; the two describe the same protocol but do not unify.
        asgi = cast("hypercorn.typing.ASGIFramework", drain)
        await hypercorn.asyncio.serve(asgi, config, shutdown_trigger=shutdown_trigger, mode="asgi")

    try:
        asyncio.run(serve())
    except (hypercorn.utils.LifespanFailureError, hypercorn.utils.LifespanTimeoutError) as exc:
        logging.getLogger("protoserve.gateway").error("startup failed: %s", exc)
        return 1
    return 0 if started else 1


#: Seconds requests in flight get to finish after the first SIGTERM/SIGINT, unless
#: --shutdown-grace says otherwise.
DEFAULT_GRACE_SECONDS = 10.0
#: Seconds after the grace before uvicorn or hypercorn cancels what still runs (see _Drain).
_BACKSTOP_SECONDS = 5


class _Drain:
    """ASGI glue between the HTTP server and the gateway: ends requests when the grace is over.

    Both servers end a drain by cancelling what still runs. hypercorn 0.18 waits
    ``graceful_timeout`` for its connections and then cancels them; a connection
    cancelled while a response streams makes hypercorn raise "TaskGroup ... is
    shutting down" out of ``serve`` (a traceback, exit 1, and no lifespan shutdown).
    uvicorn cancels each request's task after ``timeout_graceful_shutdown`` and logs
    the CancelledError as "Exception in ASGI application", a traceback per request.
    So requests are ended here instead: once
    ``hurry`` is set (the grace is over, or a second signal came), ``receive``
    answers ``http.disconnect``, and the gateway does what it does when a client
    leaves: it cancels the upstream call and returns.
    """

    def __init__(self, app: ASGIApp, grace: float) -> None:
        self.app = app
        self.grace = grace
        #: When the HTTP server's own cancelling should come: only for what this misses.
        self.backstop = grace + _BACKSTOP_SECONDS
        self.hurry = asyncio.Event()
        self._draining = False
        #: The requests' tasks now waiting in ``receive()``, which :meth:`end_now` cancels.
        self._receiving: set[asyncio.Task[object]] = set()
        #: Those :meth:`end_now` cancelled: their ``receive`` answers ``http.disconnect``.
        self._ended: set[asyncio.Task[object]] = set()

    def on_signals(self, begin: Callable[[], None]) -> None:
        """Handle SIGTERM and SIGINT on the running loop: the first calls ``begin`` (the
        server stops accepting) and ends what still runs once the grace is over; a second
        ends it now. Both exit 0 once the server is done."""
        loop = asyncio.get_running_loop()

        def signalled() -> None:
            if self._draining:
                self.end_now()
                return
            self._draining = True
            begin()
            loop.call_later(self.grace, self.end_now)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, signalled)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def receive_until_hurry() -> Message:
            if self.hurry.is_set():
                return {"type": "http.disconnect"}
            # receive() is awaited in the caller's task, not raced in tasks of its own
            # (two tasks per receive, on every request): end_now() cancels the tasks
            # waiting here, and the cancel it sent is taken back and answered as a
            # disconnect. Any other cancel goes on, and cancels receive() as it would.
            task = asyncio.current_task()
            assert task is not None
            self._receiving.add(task)
            try:
                return await receive()
            except asyncio.CancelledError:
                if task not in self._ended:
                    raise
                self._ended.discard(task)
                if task.uncancel() > 0:  # cancelled by someone else too
                    raise
                return {"type": "http.disconnect"}
            finally:
                self._receiving.discard(task)
                self._ended.discard(task)

        await self.app(scope, receive_until_hurry, send)

    def end_now(self) -> None:
        """The grace is over (or a second signal came): every request's ``receive``
        answers ``http.disconnect`` from now on, those waiting in one at once."""
        if self.hurry.is_set():
            return
        self.hurry.set()
        for task in self._receiving:
            self._ended.add(task)
            task.cancel()


class _Server(uvicorn.Server):
    """uvicorn's server, minus its signal capture.

    uvicorn re-raises SIGTERM/SIGINT once its graceful shutdown is done, so the
    process would die by the signal (exit status -15) instead of exiting 0; the
    gateway installs its own handlers (``_Drain.on_signals``) and exits 0 after draining.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
