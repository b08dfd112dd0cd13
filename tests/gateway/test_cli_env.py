"""The gateway's flags read PROTOSERVE_GATEWAY_* variables without tripping over foreign ones."""

from __future__ import annotations

import pytest

from protoserve.gateway.cli import build_parser


def test_a_kubernetes_service_link_does_not_break_an_explicit_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What Kubernetes sets for a Service named protoserve-gateway (service links).
    monkeypatch.setenv("PROTOSERVE_GATEWAY_PORT", "tcp://10.96.0.12:8080")
    args = build_parser().parse_args(["--port", "9000"])
    assert args.port == 9000


def test_a_bad_numeric_variable_is_a_usage_error_naming_the_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PROTOSERVE_GATEWAY_PORT", "tcp://10.96.0.12:8080")
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([])
    assert exited.value.code == 2
    assert "--port: invalid int value: 'tcp://10.96.0.12:8080'" in capsys.readouterr().err


def test_numeric_variables_still_set_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROTOSERVE_GATEWAY_PORT", "8123")
    monkeypatch.setenv("PROTOSERVE_GATEWAY_MAX_BODY_BYTES", "1024")
    args = build_parser().parse_args([])
    assert (args.port, args.max_body_bytes) == (8123, 1024)


def test_connections_accepted_by_the_gateway_socket_have_nagle_off() -> None:
    """asyncio sets TCP_NODELAY on accepted connections only when the listening socket's
    proto is IPPROTO_TCP; with Nagle on, keep-alive requests wait ~40 ms for delayed ACKs."""
    import asyncio
    import socket

    from protoserve.gateway.cli import listening_socket

    async def accepted_nodelay() -> int:
        sock = listening_socket("127.0.0.1", 0)
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                accepted = transport.get_extra_info("socket")
                seen.set_result(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            try:
                return await asyncio.wait_for(seen, 10)
            finally:
                writer.close()

    assert asyncio.run(accepted_nodelay()) == 1
