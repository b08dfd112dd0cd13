"""``protoserve up``: the gRPC server and the gateway in front of it, as two processes.

Two processes, as they would run in production: a gateway problem cannot take
the models down, and each can be restarted alone. ``up`` starts the server,
waits until it is listening, starts the gateway against it, and forwards
SIGTERM/SIGINT to both. If either exits, the other is stopped too.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from protoserve.common.workers import die_with_parent, prepare_die_with_parent, worker_count

__all__ = ["main"]


def _wait_for_port(
    process: subprocess.Popen[bytes], port_file: Path, what: str, timeout: float
) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            print(f"protoserve up: the {what} exited with {process.returncode}", file=sys.stderr)
            return None
        text = port_file.read_text().strip() if port_file.exists() else ""
        if text:
            return int(text)
        time.sleep(0.05)
    print(f"protoserve up: the {what} did not start within {timeout:g}s", file=sys.stderr)
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protoserve up",
        description="Run the gRPC server (built-in model unless --model or --model-repository) "
        "and the HTTP gateway "
        "in front of it. Extra arguments after -- go to `protoserve serve`.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address both listen on")
    parser.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (default 50051)")
    parser.add_argument("--http-port", type=int, default=8080, help="HTTP port (default 8080)")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="SPEC",
        help="model to serve (repeatable), as for `protoserve serve`",
    )
    parser.add_argument(
        "--model-repository",
        metavar="DIR",
        help="serve every model folder of DIR, as for `protoserve serve` (then no "
        "built-in model unless --model bytelm)",
    )
    _worker_arguments(parser)
    _tls_arguments(parser)
    parser.add_argument("serve_args", nargs="*", help=argparse.SUPPRESS)
    return parser


def _worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Processes of each on its one port (common/workers.py). Two flags, not one: a
    server worker holds a copy of every model, a gateway worker next to nothing, so
    the right numbers differ. Unset, each reads its own variable, as without ``up``."""
    parser.add_argument(
        "--workers",
        type=worker_count,
        metavar="N",
        default=None,
        help="gRPC server processes on the gRPC port, each with its own copy of the models "
        "(`serve --workers`; default: PROTOSERVE_WORKERS, else 1)",
    )
    parser.add_argument(
        "--gateway-workers",
        type=worker_count,
        metavar="N",
        default=None,
        help="gateway processes on the HTTP port (`gateway --workers`; default: "
        "PROTOSERVE_GATEWAY_WORKERS, else 1)",
    )


def _tls_arguments(parser: argparse.ArgumentParser) -> None:
    """TLS on the gRPC port, and the gateway's side of it. Each flag defaults to the
    variable ``serve`` or ``gateway`` would read anyway (both inherit ``up``'s)."""
    env = os.environ.get
    parser.add_argument(
        "--certfile",
        metavar="PEM",
        default=env("PROTOSERVE_CERTFILE") or None,
        help="serve gRPC over TLS with this certificate chain (needs --keyfile); the gateway "
        "then calls it over TLS [env PROTOSERVE_CERTFILE]",
    )
    parser.add_argument(
        "--keyfile",
        metavar="PEM",
        default=env("PROTOSERVE_KEYFILE") or None,
        help="the private key of --certfile [env PROTOSERVE_KEYFILE]",
    )
    parser.add_argument(
        "--client-ca",
        metavar="PEM",
        default=env("PROTOSERVE_CLIENT_CA") or None,
        help="mTLS: the gRPC port requires client certificates signed by these CAs; the "
        "gateway presents --upstream-certfile [env PROTOSERVE_CLIENT_CA]",
    )
    parser.add_argument(
        "--upstream-ca",
        metavar="PEM",
        default=env("PROTOSERVE_GATEWAY_UPSTREAM_CA") or None,
        help="what the gateway trusts for the server's certificate (default: --certfile "
        "itself, right for a self-signed certificate or a file holding the whole chain)",
    )
    parser.add_argument(
        "--upstream-certfile",
        metavar="PEM",
        default=env("PROTOSERVE_GATEWAY_UPSTREAM_CERTFILE") or None,
        help="the gateway's client certificate, signed by a CA of --client-ca",
    )
    parser.add_argument(
        "--upstream-keyfile",
        metavar="PEM",
        default=env("PROTOSERVE_GATEWAY_UPSTREAM_KEYFILE") or None,
        help="the private key of --upstream-certfile",
    )


def _check_tls(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse TLS flags that cannot work together, before anything starts."""
    if (args.certfile is None) != (args.keyfile is None):
        parser.error("--certfile and --keyfile go together")
    if (args.upstream_certfile is None) != (args.upstream_keyfile is None):
        parser.error("--upstream-certfile and --upstream-keyfile go together")
    if args.client_ca and not args.certfile:
        parser.error("--client-ca needs --certfile and --keyfile (mTLS is TLS)")
    if args.client_ca and not args.upstream_certfile:
        parser.error(
            "--client-ca refuses clients without a certificate, the gateway too: "
            "give it one with --upstream-certfile and --upstream-keyfile"
        )


def _serve_tls(args: argparse.Namespace) -> list[str]:
    files = (("--certfile", args.certfile), ("--keyfile", args.keyfile))
    return [f"{flag}={path}" for flag, path in (*files, ("--client-ca", args.client_ca)) if path]


def _gateway_tls(args: argparse.Namespace) -> list[str]:
    if not args.certfile:
        return []
    flags = [f"--upstream-ca={args.upstream_ca or args.certfile}"]
    if args.upstream_certfile:
        flags += [
            f"--upstream-certfile={args.upstream_certfile}",
            f"--upstream-keyfile={args.upstream_keyfile}",
        ]
    return flags


def _dial_host(host: str) -> str:
    """Where the gateway reaches a server listening on ``host``: a wildcard address
    (every interface) is dialled on loopback, which a certificate can name."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return host


def _command(name: str, *args: str) -> list[str]:
    """A ``protoserve`` subcommand run by this Python."""
    return [sys.executable, "-m", "protoserve.clients.cli", name, *args]


def _serve(args: argparse.Namespace, port_file: Path) -> list[str]:
    return _command(
        "serve",
        *("--host", args.host, "--port", str(args.grpc_port), "--port-file", str(port_file)),
        *(f"--model={m}" for m in args.model),
        *([f"--model-repository={args.model_repository}"] if args.model_repository else []),
        *_serve_tls(args),
        *([f"--workers={args.workers}"] if args.workers else []),
        *args.serve_args,
    )


def _gateway(args: argparse.Namespace, grpc_port: int, port_file: Path) -> list[str]:
    return _command(
        "gateway",
        *("--upstream", f"{_dial_host(args.host)}:{grpc_port}", "--host", args.host),
        *_gateway_tls(args),
        *("--port", str(args.http_port), "--port-file", str(port_file)),
        *([f"--workers={args.gateway_workers}"] if args.gateway_workers else []),
    )


def _start(command: list[str]) -> subprocess.Popen[bytes]:
    """A child in a process group of its own, so that a terminal's Ctrl-C reaches `up`
    alone, which passes it on once (reaching the child too, it would be its second: no
    drain); and it gets SIGTERM if `up` dies (on Linux)."""
    prepare_die_with_parent()
    return subprocess.Popen(command, process_group=0, preexec_fn=die_with_parent)


def main(argv: Sequence[str] | None = None) -> int:
    """Run both until a signal, or until one of them exits; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check_tls(parser, args)
    with tempfile.TemporaryDirectory(prefix="protoserve-up-") as scratch:
        grpc_file, http_file = Path(scratch) / "grpc", Path(scratch) / "http"
        server = _start(_serve(args, grpc_file))
        children = [server]
        stopping = False

        def forward(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True
            for child in children:
                if child.poll() is None:
                    child.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        grpc_port = _wait_for_port(server, grpc_file, "gRPC server", 300)
        if grpc_port is None:
            forward(signal.SIGTERM, None)
            server.wait()
            return 1
        gateway = _start(_gateway(args, grpc_port, http_file))
        children.append(gateway)
        http_port = _wait_for_port(gateway, http_file, "gateway", 60)
        if http_port is not None:
            print(
                f"protoserve up: gRPC on {args.host}:{grpc_port}, "
                f"HTTP on http://{args.host}:{http_port} (docs at /docs)",
                flush=True,
            )
        # Whichever ends first (a signal, or a crash), the other follows.
        while all(child.poll() is None for child in children) and http_port is not None:
            time.sleep(0.2)
        if not stopping:
            forward(signal.SIGTERM, None)
        codes = [child.wait() for child in children]
        return 0 if stopping and all(code == 0 for code in codes) else max(1, *codes)
