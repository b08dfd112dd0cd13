"""A gRPC server for a service the gateway was never given: EchoService, with reflection.

Run as a process: ``python -m tests.gateway.echo_server DESCRIPTOR_SET PORT_FILE``. The
message classes come from the descriptor set at run time; there are no stubs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha import reflection

SERVICE = "protoserve.testing.echo.v1.EchoService"
PROTOS = Path(__file__).parent / "protos"


def build_descriptor_set(out: Path) -> Path:
    """Compile the echo proto (with imports and comments) into ``out``."""
    import google.api.annotations_pb2 as annotations

    googleapis = Path(annotations.__file__).resolve().parents[2]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{googleapis}",
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            "protoserve/testing/echo/v1/echo_service.proto",
        ],
        check=True,
    )
    return out


def failure_details(code: int) -> tuple[tuple[str, bytes], ...]:
    """The ``grpc-status-details-bin`` trailer of Fail: one ``google.rpc.ErrorInfo``."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason="FAILING_AS_ASKED", domain="echo.testing"))
    status = status_pb2.Status(code=code, message="failing as asked", details=[detail])
    return (("grpc-status-details-bin", status.SerializeToString()),)


async def serve(descriptor_set: bytes, port_file: Path) -> None:
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(descriptor_set).file:
        pool.Add(file)
    service = pool.FindServiceByName(SERVICE)
    types = {
        m.name: (GetMessageClass(m.input_type), GetMessageClass(m.output_type))
        for m in service.methods
    }

    async def echo(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        delay = request.message.delay.ToTimedelta().total_seconds()
        if delay:
            await asyncio.sleep(delay)
        await context.send_initial_metadata((("x-echo", "yes"),))
        context.set_trailing_metadata((("x-echo-trailer", "done"),))
        seen = sorted(
            f"{k}={v}"
            for k, v in context.invocation_metadata() or ()
            if not k.startswith(":") and isinstance(v, str)
        )
        return types["Echo"][1](
            request=request, metadata=seen, has_deadline=context.time_remaining() is not None
        )

    async def chant(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        for index in range(request.times):
            yield types["Chant"][1](text=request.text, index=index)
            await asyncio.sleep(0.01)

    async def fail(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        code = next(c for c in grpc.StatusCode if c.value[0] == request.code)
        # With a google.rpc detail, as servers that follow AIP-193 send them.
        await context.abort(
            code, "failing as asked", trailing_metadata=failure_details(request.code)
        )

    async def plain(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return types["Plain"][1](value=request.value)

    def unary(fn: Any, name: str) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            fn,
            request_deserializer=types[name][0].FromString,
            response_serializer=lambda m: m.SerializeToString(),
        )

    handlers = {
        "Echo": unary(echo, "Echo"),
        "Fail": unary(fail, "Fail"),
        "Plain": unary(plain, "Plain"),
        "Chant": grpc.unary_stream_rpc_method_handler(
            chant,
            request_deserializer=types["Chant"][0].FromString,
            response_serializer=lambda m: m.SerializeToString(),
        ),
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    reflection.enable_server_reflection((SERVICE, reflection.SERVICE_NAME), server, pool=pool)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await asyncio.to_thread(port_file.write_text, f"{port}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(0)


def wait_port(process: subprocess.Popen[bytes], port_file: Path, timeout: float = 60) -> int:
    """The port a process wrote to ``port_file``, once it has."""
    deadline = time.monotonic() + timeout
    while not (port_file.exists() and port_file.read_text().strip()):
        assert process.poll() is None, f"exited with {process.returncode}"
        assert time.monotonic() < deadline, "did not start"
        time.sleep(0.05)
    return int(port_file.read_text())


def stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM by PID (then SIGKILL if it will not go); the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


@contextlib.contextmanager
def running(folder: Path) -> Iterator[tuple[str, Path]]:
    """This server in a process of its own: its target, and its descriptor set."""
    descriptor_set = build_descriptor_set(folder / "echo.binpb")
    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.gateway.echo_server", str(descriptor_set),
         str(folder / "echo.port")],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    try:
        yield f"127.0.0.1:{wait_port(process, folder / 'echo.port')}", descriptor_set
    finally:
        stop(process)


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1]).read_bytes(), Path(sys.argv[2])))
