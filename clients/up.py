"""``protoserve up``: the gRPC server and the gateway in front of it, as two processes.

Two processes, as they would run in production: a gateway problem cannot take
the models down, and each can be restarted alone. ``up`` starts the server,
waits until it is listening, starts the gateway against it, and forwards
SIGTERM/SIGINT to both. If either exits, the other is stopped too.

``--replicas N`` starts N servers instead, on N consecutive ports, and one gateway
balancing over them (``gateway/_balancing.py``), to try locally what many pods do
(docs/deploy.md, "Many servers"): a server that exits, for a signal sent to it alone,
is started again on its port a second later; the gateway and the others go on.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from protoserve.common.balancing import is_ip, target_of
from protoserve.common.workers import die_with_parent, prepare_die_with_parent, worker_count

__all__ = ["main"]

#: Restarts of one replica (--replicas) before ``up`` gives up and stops them all.
_RESTARTS = 5
#: The signals ``up`` forwards to its children.
_HELD = frozenset({signal.SIGTERM, signal.SIGINT})


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
    parser.add_argument(
        "--replicas",
        type=worker_count,
        metavar="N",
        default=1,
        help="gRPC servers, each a process of its own on the next port (--grpc-port, +1, "
        "...; 0: each a free one), with the gateway balancing over them; one that exits "
        "alone is started again (default 1)",
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


def _upstream(host: str, ports: Sequence[int]) -> str:
    """The gateway's gRPC target for the servers on ``ports`` of ``host``: ``host:port``
    for one; an address list (``ipv4:``/``ipv6:``), balanced over, for more."""
    dial = _dial_host(host)
    if len(ports) == 1:
        return f"{dial}:{ports[0]}"
    address = dial.strip("[]")
    if not is_ip(address):  # a name: its first address, as the servers listen on it
        address = str(socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)[0][4][0])
    if ":" in address:
        address = f"[{address}]"
    return target_of([f"{address}:{port}" for port in ports])[0]


def _serve(args: argparse.Namespace, port_file: Path, port: int | None = None) -> list[str]:
    port = args.grpc_port if port is None else port
    return _command(
        "serve",
        *("--host", args.host, "--port", str(port), "--port-file", str(port_file)),
        *(f"--model={m}" for m in args.model),
        *([f"--model-repository={args.model_repository}"] if args.model_repository else []),
        *_serve_tls(args),
        *([f"--workers={args.workers}"] if args.workers else []),
        *args.serve_args,
    )


def _gateway(args: argparse.Namespace, grpc_ports: Sequence[int], port_file: Path) -> list[str]:
    return _command(
        "gateway",
        *("--upstream", _upstream(args.host, grpc_ports), "--host", args.host),
        *_gateway_tls(args),
        *("--port", str(args.http_port), "--port-file", str(port_file)),
        *([f"--workers={args.gateway_workers}"] if args.gateway_workers else []),
    )


def _start(command: list[str]) -> subprocess.Popen[bytes]:
    """A child in a process group of its own, so that a terminal's Ctrl-C reaches `up`
    alone, which passes it on once (reaching the child too, it would be its second: no
    drain); and it gets SIGTERM if `up` dies (on Linux). Its signals are not held, as
    `up`'s may be while it starts one (:func:`_signals_held`): a child keeps the mask."""
    prepare_die_with_parent()
    return subprocess.Popen(command, process_group=0, preexec_fn=_child_setup)


def _child_setup() -> None:
    """In the child, before exec."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)
    die_with_parent()


def main(argv: Sequence[str] | None = None) -> int:
    """Run both until a signal, or until one of them exits; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check_tls(parser, args)
    with tempfile.TemporaryDirectory(prefix="protoserve-up-") as scratch:
        http_file = Path(scratch) / "http"
        grpc_files = [Path(scratch) / f"grpc-{i}" for i in range(args.replicas)]
        servers = [
            _start(_serve(args, path, _replica_port(args, i))) for i, path in enumerate(grpc_files)
        ]
        children = list(servers)
        stopping = False

        def forward(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True
            for child in children:
                if child.poll() is None:
                    child.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        grpc_ports: list[int] = []
        for server, path in zip(servers, grpc_files, strict=True):
            port = _wait_for_port(server, path, "gRPC server", 300)
            if port is None:
                forward(signal.SIGTERM, None)
                for child in children:
                    child.wait()
                return 1
            grpc_ports.append(port)
        gateway = _start(_gateway(args, grpc_ports, http_file))
        children.append(gateway)
        http_port = _wait_for_port(gateway, http_file, "gateway", 60)
        if http_port is not None:
            where = ", ".join(  # and each replica's pid, to try a signal on one
                f"{args.host}:{port}" + (f" (pid {server.pid})" if args.replicas > 1 else "")
                for port, server in zip(grpc_ports, servers, strict=True)
            )
            print(
                f"protoserve up: gRPC on {where}, "
                f"HTTP on http://{args.host}:{http_port} (docs at /docs)",
                flush=True,
            )
        # Whichever ends first (a signal, or a crash), the others follow; but with
        # replicas, a server that ends alone is started again, on its port (up to
        # _RESTARTS times each: one that cannot start stops the set).
        restarts = [0] * args.replicas
        while http_port is not None and not stopping:
            if gateway.poll() is not None:
                break
            ended = [i for i, s in enumerate(servers) if s.poll() is not None]
            if ended and (args.replicas == 1 or any(restarts[i] >= _RESTARTS for i in ended)):
                break
            for i in ended:
                restarts[i] += 1
                _say_ended(servers[i], grpc_ports[i])
            time.sleep(1 if ended else 0.2)
            # Signals wait while a replica starts: a stop then reaches it too.
            with _signals_held():
                if stopping:
                    break
                for i in ended:
                    servers[i] = children[i] = _start_again(
                        args, grpc_ports[i], Path(scratch) / f"again-{i}"
                    )
        if not stopping:
            forward(signal.SIGTERM, None)
        codes = [child.wait() for child in children]
        # Stopped by a signal, a replica that was still starting ends by it, not by its
        # own drain (its handlers were not installed yet): no failure either.
        stopped = {0, -signal.SIGTERM, -signal.SIGINT} if stopping else {0}
        return 0 if stopping and all(code in stopped for code in codes) else max(1, *codes)


def _replica_port(args: argparse.Namespace, index: int) -> int:
    """Replica ``index``'s port: the next after ``--grpc-port`` for each, or 0 (a free one)."""
    return args.grpc_port + index if args.grpc_port else 0


def _say_ended(server: subprocess.Popen[bytes], port: int) -> None:
    print(
        f"protoserve up: the gRPC server on port {port} (pid {server.pid}) exited with "
        f"{server.returncode}; starting it again",
        file=sys.stderr,
        flush=True,
    )


def _start_again(args: argparse.Namespace, port: int, port_file: Path) -> subprocess.Popen[bytes]:
    """A replica that ended, started again on its port."""
    port_file.unlink(missing_ok=True)
    server = _start(_serve(args, port_file, port))
    print(f"protoserve up: gRPC server on port {port} is pid {server.pid}", flush=True)
    return server


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGTERM and SIGINT wait (pending) inside the block, and are handled after it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)
