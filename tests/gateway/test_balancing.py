"""The gateway's channel to its upstream: gRPC's service config (gateway/_balancing.py).

What the channel does with it, with real servers, is tests/e2e/test_replicas.py's; here,
what the gateway asks of gRPC for each kind of ``--upstream``, and its flags."""

from __future__ import annotations

import json
from typing import Any

import pytest

from protoserve.gateway._balancing import RETRY_BUFFER_BYTES, channel_options
from protoserve.gateway.cli import build_parser

MiB = 1024 * 1024


def config(target: str, **settings: Any) -> dict[str, Any]:
    settings = {"retries": 2, "health_check": None, "max_message_bytes": 16 * MiB, **settings}
    options = dict(channel_options(target, **settings))
    assert options["grpc.service_config_disable_resolution"] == 1
    return json.loads(options["grpc.service_config"])


@pytest.mark.parametrize(
    ("target", "checked"),
    [
        ("127.0.0.1:50051", False),
        ("unix:/tmp/s.sock", False),
        ("ipv4:127.0.0.1:50051", False),
        ("dns:///protoserve-server-pods:50051", True),
        ("ipv4:127.0.0.1:50051,127.0.0.1:50052", True),
        ("ipv6:[::1]:50051,[::1]:50052", True),
    ],
)
def test_health_checking_is_on_where_the_target_may_name_several_servers(
    target: str, checked: bool
) -> None:
    found = config(target)
    assert found["loadBalancingConfig"] == [{"round_robin": {}}]
    assert ("healthCheckConfig" in found) is checked
    if checked:
        assert found["healthCheckConfig"] == {"serviceName": ""}
    # Said outright, the flag wins.
    assert "healthCheckConfig" in config(target, health_check=True)
    assert "healthCheckConfig" not in config(target, health_check=False)


def test_calls_refused_with_unavailable_are_retried_on_every_method() -> None:
    (method,) = config("dns:///x:1", retries=3)["methodConfig"]
    assert method["name"] == [{}]
    assert method["retryPolicy"]["maxAttempts"] == 4
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "methodConfig" not in config("dns:///x:1", retries=0)


def test_a_request_up_to_the_largest_message_is_kept_for_its_retry() -> None:
    options = dict(
        channel_options("dns:///x:1", retries=2, health_check=None, max_message_bytes=100 * MiB)
    )
    assert options["grpc.per_rpc_retry_buffer_size"] == 100 * MiB
    assert options["grpc.retry_buffer_size"] == 100 * MiB
    small = dict(channel_options("x:1", retries=2, health_check=None, max_message_bytes=MiB))
    assert small["grpc.retry_buffer_size"] == RETRY_BUFFER_BYTES


@pytest.mark.parametrize("retries", [-1, 5])
def test_retries_past_grpcs_cap_are_refused(retries: int) -> None:
    with pytest.raises(ValueError, match="upstream retries must be 0 to 4"):
        config("x:1", retries=retries)


def test_the_flags_and_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args([])
    assert (args.upstream_retries, args.upstream_health_check) == (2, None)
    args = build_parser().parse_args(["--upstream-retries", "0", "--no-upstream-health-check"])
    assert (args.upstream_retries, args.upstream_health_check) == (0, False)
    monkeypatch.setenv("PROTOSERVE_GATEWAY_UPSTREAM_RETRIES", "4")
    monkeypatch.setenv("PROTOSERVE_GATEWAY_UPSTREAM_HEALTH_CHECK", "on")
    args = build_parser().parse_args([])
    assert (args.upstream_retries, args.upstream_health_check) == (4, True)
