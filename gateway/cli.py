"""``protoserve gateway``: serve a gRPC server's methods as JSON over HTTP, and SSE."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import uvicorn

__all__ = ["build_parser", "main"]


def _env(name: str, default: str) -> str:
    return os.environ.get(f"PROTOSERVE_GATEWAY_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protoserve gateway",
        description="Serve every method of a gRPC server over HTTP: JSON for unary calls, "
        "Server-Sent Events or NDJSON for server streaming, OpenAPI at /openapi.json, docs "
        "at /docs. Flags also read PROTOSERVE_GATEWAY_<FLAG> environment variables.",
    )
    parser.add_argument(
        "--upstream",
        default=_env("UPSTREAM", "127.0.0.1:50051"),
        help="the gRPC server, HOST:PORT (default %(default)s)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--from-reflection",
        action="store_true",
        default=_env("FROM_REFLECTION", "") in ("1", "true", "yes"),
        help="read the services from the upstream's reflection service",
    )
    source.add_argument(
        "--descriptor-set",
        metavar="FILE",
        default=_env("DESCRIPTOR_SET", "") or None,
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
    parser.add_argument(
        "--host",
        default=_env("HOST", "127.0.0.1"),
        help="address to listen on (default %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(_env("PORT", "8080")),
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
        default=int(_env("MAX_BODY_BYTES", str(4 * 1024 * 1024))),
        help="larger request bodies get 413 (default %(default)s)",
    )
    parser.add_argument(
        "--port-file",
        default=None,
        help="write the bound port to this file once listening (with --port 0)",
    )
    parser.add_argument(
        "--camel-case",
        action="store_true",
        help="answer with lowerCamelCase JSON names instead of the .proto names",
    )
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the gateway until SIGTERM/SIGINT; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from protoserve.gateway._app import build_gateway
    from protoserve.gateway._descriptors import (
        DescriptorSourceError,
        from_compiled,
        from_descriptor_set,
        from_reflection,
    )

    try:
        if args.from_reflection:
            descriptors = from_reflection(args.upstream, services=args.service)
        elif args.descriptor_set:
            path = Path(args.descriptor_set)
            descriptors = from_descriptor_set(
                path.read_bytes(), source=str(path), services=args.service
            )
        else:
            descriptors = from_compiled()
        app = build_gateway(
            args.upstream,
            descriptors=descriptors,
            cors_origins=args.cors_origin,
            max_body_bytes=args.max_body_bytes,
            use_proto_names=not args.camel_case,
        )
    except (DescriptorSourceError, OSError, ValueError) as exc:
        print(f"protoserve gateway: {exc}", file=sys.stderr)
        return 2
    # The socket is bound here, not by uvicorn, so that --port 0 can report its port.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host.strip("[]"), args.port))
    except OSError as exc:
        print(
            f"protoserve gateway: cannot listen on {args.host}:{args.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1
    sock.listen(2048)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level=args.log_level.lower(),
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    server = _Server(config)
    if args.port_file:
        original_startup = server.startup

        async def startup(sockets: list[socket.socket] | None = None) -> None:
            await original_startup(sockets)
            Path(args.port_file).write_text(f"{port}\n")  # noqa: ASYNC240 - once, tiny

        server.startup = startup  # type: ignore[method-assign]
    logging.getLogger("protoserve.gateway").info("serving HTTP on %s:%d", args.host, port)

    async def serve() -> None:
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            # The first signal drains (uvicorn's graceful shutdown); a second one hurries.
            if server.should_exit:
                server.force_exit = True
            server.should_exit = True

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal)
        await server.serve(sockets=[sock])

    asyncio.run(serve())
    return 0 if server.started else 1


class _Server(uvicorn.Server):
    """uvicorn's server, minus its signal capture.

    uvicorn re-raises SIGTERM/SIGINT once its graceful shutdown is done, so the
    process would die by the signal (exit status -15) instead of exiting 0; the
    gateway installs its own handlers (see ``main``) and exits 0 after draining.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
