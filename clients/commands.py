"""``protoserve models``, ``protoserve generate``, ``protoserve embed``: the clients at a terminal.

Each talks to a gRPC target (``HOST:PORT``, the default ``127.0.0.1:50051``) or
to the gateway (an ``http://`` or ``https://`` URL), chosen with ``--server`` or
``PROTOSERVE_SERVER``. Failures print one line, never a traceback, and exit
non-zero: 1 when the call failed, 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["embed_main", "generate_main", "models_main"]

_DEFAULT_SERVER = "127.0.0.1:50051"


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"protoserve {prog}", description=description)
    parser.add_argument(
        "--server",
        default=os.environ.get("PROTOSERVE_SERVER", _DEFAULT_SERVER),
        help="gRPC HOST:PORT, or the gateway's http(s):// URL (default %(default)s; "
        "env PROTOSERVE_SERVER)",
    )
    parser.add_argument(
        "--model", default=None, help="model name (default: the server's only model)"
    )
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    parser.add_argument(
        "--token",
        default=os.environ.get("PROTOSERVE_TOKEN") or None,
        help="bearer token sent with every call, for a server started with --auth-token-file "
        "(env PROTOSERVE_TOKEN, which other users' `ps` does not show)",
    )
    _tls_flags(parser)
    return parser


def _tls_flags(parser: argparse.ArgumentParser) -> None:
    """TLS to the server, as curl and grpcurl name it: --cacert, --cert, --key."""
    parser.add_argument(
        "--cacert",
        metavar="PEM",
        default=os.environ.get("PROTOSERVE_CACERT") or None,
        help="trust these CA certificates for the server's (gRPC: implies TLS; "
        "env PROTOSERVE_CACERT)",
    )
    parser.add_argument(
        "--cert",
        metavar="PEM",
        default=os.environ.get("PROTOSERVE_CERT") or None,
        help="client certificate chain, for a server that requires one (mTLS; needs --key; "
        "env PROTOSERVE_CERT)",
    )
    parser.add_argument(
        "--key",
        metavar="PEM",
        default=os.environ.get("PROTOSERVE_KEY") or None,
        help="the private key of --cert (unencrypted PEM; env PROTOSERVE_KEY)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="gRPC over TLS, trusting the system's CA certificates (implied by --cacert)",
    )


def _grpc_tls(args: argparse.Namespace) -> dict[str, Any]:
    """The gRPC client's TLS arguments from --tls, --cacert, --cert and --key.

    Raises:
        ValueError: a file cannot be used, or --cert without --key (or the reverse).
    """
    from protoserve.common.tls import read_ca, read_pair

    if (args.cert is None) != (args.key is None):
        raise ValueError("--cert and --key go together")
    options: dict[str, Any] = {"tls": args.tls}
    if args.cacert:
        options["root_certificates"] = read_ca(args.cacert, "--cacert")
    if args.cert and args.key:
        chain, key = read_pair(args.cert, args.key, cert_flag="--cert", key_flag="--key")
        options.update(certificate_chain=chain, private_key=key)
    return options


def _client(args: argparse.Namespace) -> Any:
    if args.server.startswith(("http://", "https://")):
        from protoserve.clients._http import HttpClient

        # --cacert trusts the gateway's HTTPS certificate; client certificates are gRPC's.
        return HttpClient(
            args.server,
            model=args.model,
            timeout=args.timeout,
            token=args.token,
            verify=args.cacert or True,
        )
    from protoserve.clients._grpc import Client

    return Client(
        args.server, model=args.model, timeout=args.timeout, token=args.token, **_grpc_tls(args)
    )


def _value(text: str) -> Any:
    """A --param value: JSON when it parses (numbers, true/false, lists), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _run(prog: str, body: Callable[[], None]) -> int:
    from protoserve.clients._errors import ProtoserveError

    try:
        body()
    except ProtoserveError as error:
        print(f"protoserve {prog}: {error}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as error:
        print(f"protoserve {prog}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `protoserve generate ... | head` closed our stdout
        return 0
    return 0


def models_main(argv: Sequence[str] | None = None) -> int:
    """List the server's models: name, version, state, tasks."""
    parser = _parser("models", "List the models a server holds.")
    parser.add_argument("--json", action="store_true", help="one JSON object per model")
    args = parser.parse_args(argv)

    def body() -> None:
        with _client(args) as client:
            for info in client.models():
                if args.json:
                    print(
                        json.dumps(
                            {
                                "name": info.name,
                                "version": info.version,
                                "state": info.state,
                                "tasks": list(info.tasks),
                            }
                        )
                    )
                else:
                    print(f"{info.name}\t{info.version}\t{info.state}\t{','.join(info.tasks)}")

    return _run("models", body)


def generate_main(argv: Sequence[str] | None = None) -> int:
    """Generate text; with --stream print it token by token as it arrives."""
    parser = _parser("generate", "Continue a text with a model.")
    parser.add_argument("text", help="the text to continue")
    parser.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="K=V",
        help="generation parameter, repeatable: max_new_tokens=40, "
        "temperature=0.8, seed=1, stop_sequences='[\"\\n\\n\"]'",
    )
    parser.add_argument(
        "--usage", action="store_true", help="print the finish reason and token usage to stderr"
    )
    args = parser.parse_args(argv)
    parameters: dict[str, Any] = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--param {item!r} is not K=V")
        parameters[key.strip()] = _value(value)

    def body() -> None:
        with _client(args) as client:
            if args.stream:
                stream = client.generate_stream(args.text, **parameters)
                for chunk in stream:
                    sys.stdout.write(chunk)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                finish, usage = stream.finish_reason, stream.usage
            else:
                result = client.generate(args.text, **parameters)
                print(result)
                finish, usage = result.finish_reason, result.usage
            if args.usage:
                print(
                    f"finish: {finish.value if finish else '-'}; tokens: "
                    f"{usage.prompt_tokens} in, {usage.completion_tokens} out",
                    file=sys.stderr,
                )

    return _run("generate", body)


def embed_main(argv: Sequence[str] | None = None) -> int:
    """Embed texts; print one JSON array per text."""
    parser = _parser("embed", "Turn texts into vectors (one JSON array per line).")
    parser.add_argument("texts", nargs="+", help="texts to embed")
    parser.add_argument("--raw", action="store_true", help="do not L2-normalise")
    args = parser.parse_args(argv)

    def body() -> None:
        with _client(args) as client:
            vectors = client.embed(list(args.texts), normalize=not args.raw)
            for row in vectors.tolist():
                print(json.dumps([round(v, 6) for v in row]))

    return _run("embed", body)
