"""Real servers in background threads, each on its own event loop and a port-0 socket."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """An event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def start_grpc_server(models: Sequence[str], **config: Any) -> tuple[LoopThread, Any]:
    """An InferenceServer with the given model specs, on port 0; returns (thread, server)."""
    from protoserve.server import InferenceServer, ServerConfig
    from protoserve.server.runtime.loader import load_model_spec

    thread = LoopThread()

    async def make() -> Any:
        server = InferenceServer(
            ServerConfig(port=0, **config), [load_model_spec(s) for s in models]
        )
        await server.start()
        return server

    return thread, thread.run(make())


def one_message_per_token(server: Any, *models: str) -> None:
    """Make ``models``' streams one message per token, whatever the machine's speed.

    A stream's reader that falls behind gets every token since its last read in one
    message (tests/server/test_coalescing.py); whether a fast model's tokens outrun the
    server's writes is a matter of timing. With a buffer of one, the model's worker
    makes no token before the server has read the one before: the reader keeps up,
    and tests that count messages or compare a stream's bytes hold on any machine.
    """
    for name in models:
        server.runtime.get_model(name).scheduler.buffer = 1


def stop_grpc_server(thread: LoopThread, server: Any) -> None:
    thread.run(server.stop(1), timeout=30)
    thread.stop()


class UvicornThread:
    """An ASGI app served by uvicorn on 127.0.0.1, port 0, in a thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        # IPPROTO_TCP so that asyncio sets TCP_NODELAY on accepted connections (as the
        # gateway's command does): else every keep-alive request waits ~40 ms.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
