"""The ``protoserve`` command: one entry point, a subcommand per job.

Each subcommand lives in the package it belongs to and is imported only when
chosen, so ``protoserve --help`` and the client commands never import torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "run"]

#: subcommand -> ("module" with a ``main(argv) -> int``, or "module:function"; one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("protoserve.server.cli", "run the gRPC inference server"),
    "gateway": ("protoserve.gateway.cli", "serve a gRPC server's methods as JSON/SSE over HTTP"),
    "up": ("protoserve.clients.up", "run the server and the gateway together"),
    "models": ("protoserve.clients.commands:models_main", "list a server's models"),
    "generate": ("protoserve.clients.commands:generate_main", "generate text (--stream: live)"),
    "embed": ("protoserve.clients.commands:embed_main", "embed texts as vectors"),
}

_USAGE = """usage: protoserve COMMAND [ARGS...]

protoserve serves PyTorch models over gRPC, with a REST/SSE gateway.

commands:
{commands}

Run `protoserve COMMAND --help` for a command's options."""


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a subcommand; returns (and exits with) its status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        lines = "\n".join(f"  {n:<{width}}  {h}" for n, (_, h) in COMMANDS.items())
        print(_USAGE.format(commands=lines))
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"protoserve: unknown command {name!r}; try `protoserve --help`", file=sys.stderr)
        return 2
    module_name, _, function = COMMANDS[name][0].partition(":")
    module = importlib.import_module(module_name)
    status: int = getattr(module, function or "main")(rest)
    return status


def run() -> None:
    """Console-script entry point: exit with the subcommand's status."""
    sys.exit(main())


if __name__ == "__main__":
    run()
