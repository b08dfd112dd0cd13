"""The echo floor (issue #18): a bare grpc.aio server answering fixed bytes.

``python bench/_echo.py --port-file FILE /pkg.Service/Method=REPLY_FILE ...`` serves each
method path with the bytes of its file, pre-serialized (protoserve's own answer to the
same request, taken from a running server by the suite), and nothing else: no parsing,
no interceptor, no metrics, no logging, grpc.aio's default options. It binds a free
loopback port, writes it to ``--port-file`` once serving, and stops on SIGTERM. What a
grpc.aio server in Python costs per call, whatever it answers: protoserve's floor.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

import grpc


def handlers(replies: dict[str, bytes]) -> list[grpc.GenericRpcHandler]:
    """One generic handler per service; no (de)serializers: bytes in, the fixed bytes out."""
    by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
    for path, reply in replies.items():
        service, _, method = path.lstrip("/").rpartition("/")

        async def answer(request: bytes, context: Any, reply: bytes = reply) -> bytes:
            return reply

        by_service.setdefault(service, {})[method] = grpc.unary_unary_rpc_method_handler(answer)
    return [grpc.method_handlers_generic_handler(s, m) for s, m in by_service.items()]


async def serve(port_file: Path, replies: dict[str, bytes]) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(tuple(handlers(replies)))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(f"{port}\n")  # noqa: ASYNC240 (once, before any call)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("replies", nargs="+", metavar="PATH=FILE")
    args = parser.parse_args()
    replies = {}
    for item in args.replies:
        path, _, file = item.partition("=")
        replies[path] = Path(file).read_bytes()
    asyncio.run(serve(args.port_file, replies))


if __name__ == "__main__":
    main()
