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
