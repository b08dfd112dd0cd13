"""Bearer tokens through the gateway: the ``Authorization`` header goes upstream, and
the server's UNAUTHENTICATED comes back as 401 with ``WWW-Authenticate: Bearer``.

A real server with a model repository holding ``counted``
(``tests.server.models_for_tests:Counted``, which counts the calls that reach it),
an inference token and an admin token, and the gateway in front of it, each on a
real port.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from protoserve.gateway import GatewayError, build_gateway
from protoserve.gateway._errors import error_info
from tests._observe import WITHIN, wait_until
from tests._sse import events
from tests._threads import UvicornThread, start_grpc_server, stop_grpc_server
from tests.server.models_for_tests import Counted

INFERENCE_TOKEN = "gateway-inference-token"
ADMIN_TOKEN = "gateway-admin-token"
INFERENCE = {"Authorization": f"Bearer {INFERENCE_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MISSING = (
    "needs a bearer token: send the metadata 'authorization: Bearer TOKEN' "
    "(over HTTP, the header 'Authorization: Bearer TOKEN')"
)
GENERATE = "/v1/models/counted:generate"
UNLOAD = "/v2/repository/models/counted/unload"
LOAD = "/v2/repository/models/counted/load"


@dataclass
class Stack:
    server: Any
    http: httpx.Client

    def ready(self) -> bool:
        return bool(self.server.runtime.model_ready("counted"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("gateway-auth")
    (root / "models" / "counted" / "1").mkdir(parents=True)
    (root / "models" / "counted" / "model.toml").write_text(
        'source = "tests.server.models_for_tests:Counted"\n'
    )
    (root / "tokens").write_text(f"{INFERENCE_TOKEN}\n")
    (root / "admin").write_text(f"{ADMIN_TOKEN}\n")
    thread, server = start_grpc_server(
        (),
        model_repository=str(root / "models"),
        auth_token_file=str(root / "tokens"),
        admin_token_file=str(root / "admin"),
        shutdown_grace=2,
    )
    gateway = UvicornThread(build_gateway(f"127.0.0.1:{server.port}"))
    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            yield Stack(server, http)
    finally:
        gateway.stop()
        stop_grpc_server(thread, server)


def test_without_a_token_the_answer_is_401_with_a_bearer_challenge(stack: Stack) -> None:
    before = Counted.calls
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eDp5"}):
        reply = stack.http.post(GENERATE, json={"inputs": "a"}, headers=headers)
        assert reply.status_code == 401, headers
        assert reply.headers["WWW-Authenticate"] == "Bearer"
        body = reply.json()
        assert body["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
        assert body["message"].startswith("Generate needs a bearer token")
        [detail] = body["details"]
        assert detail["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
        assert detail["domain"] == "protoserve"
    assert stack.http.post(GENERATE, json={"inputs": "a"}).json()["message"] == (
        f"Generate {MISSING}"
    )
    # A stream is refused before it starts: a 401 too, not an error event.
    reply = stack.http.post(
        "/v1/models/counted:generateStream",
        json={"inputs": "a"},
        headers={"Accept": "text/event-stream"},
    )
    assert (reply.status_code, reply.headers["WWW-Authenticate"]) == (401, "Bearer")
    # The Open Inference Protocol's REST answers in its own body, with the same status.
    reply = stack.http.post(
        "/v2/models/counted/infer",
        json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]},
    )
    assert (reply.status_code, reply.headers["WWW-Authenticate"]) == (401, "Bearer")
    assert reply.json() == {"error": f"ModelInfer {MISSING}"}
    assert Counted.calls == before  # the model never ran


def test_an_inference_token_generates_and_is_forbidden_model_control(stack: Stack) -> None:
    before = Counted.calls
    reply = stack.http.post(GENERATE, json={"inputs": "a"}, headers=INFERENCE)
    assert (reply.status_code, reply.json()["generated_text"]) == (200, "ok")
    with stack.http.stream(
        "POST",
        "/v1/models/counted:generateStream",
        json={"inputs": "a"},
        headers={**INFERENCE, "Accept": "text/event-stream"},
    ) as stream:
        assert stream.status_code == 200
        received = list(events(stream.iter_bytes()))
    assert received[-1].event == "done"
    assert "".join(json.loads(e.data)["text"] for e in received[:-1]) == "ok"
    assert Counted.calls == before + 2
    for path in (UNLOAD, LOAD):
        reply = stack.http.post(path, json={}, headers=INFERENCE)
        assert reply.status_code == 403
        assert "WWW-Authenticate" not in reply.headers
        assert reply.json()["error"].endswith(
            "needs an admin token (the server's --admin-token-file); "
            "this token may make inference calls only"
        )
    assert stack.ready()


def test_the_admin_token_unloads_and_loads(stack: Stack) -> None:
    reply = stack.http.post(UNLOAD, json={}, headers={"Authorization": "Bearer nope"})
    assert (reply.status_code, reply.headers["WWW-Authenticate"]) == (401, "Bearer")
    assert stack.ready()
    assert stack.http.post(UNLOAD, json={}, headers=ADMIN).status_code == 200
    assert not stack.ready()
    assert stack.http.post(LOAD, json={}, headers=ADMIN).status_code == 200
    assert stack.ready()


def test_probes_need_no_token(stack: Stack) -> None:
    assert stack.http.get("/healthz").status_code == 200
    reply = stack.http.get("/readyz")
    assert (reply.status_code, reply.json()) == (200, {"status": "SERVING"})
    assert stack.http.get("/v2/health/ready").status_code == 200
    assert stack.http.get("/v2/health/live").status_code == 200
    assert stack.http.get("/v2/models/counted/ready").status_code == 401


@pytest.mark.parametrize(
    ("code", "challenge"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, "Bearer"),
        (grpc.StatusCode.PERMISSION_DENIED, None),
        (grpc.StatusCode.INVALID_ARGUMENT, None),
    ],
)
def test_only_a_401_carries_the_challenge(code: grpc.StatusCode, challenge: str | None) -> None:
    info, headers = error_info(GatewayError(code, "no"))
    assert info.status == {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}.get(code.name, 400)
    assert headers.get("WWW-Authenticate") == challenge


def _gateway_log(host: str, tmp: Path) -> str:
    """What ``protoserve gateway --host HOST`` logs by the time it has its port."""
    port_file = tmp / f"port-{host}"
    process = subprocess.Popen(
        [sys.executable, "-m", "protoserve.clients.cli", "gateway", "--host", host, "--port", "0",
         "--port-file", str(port_file), "--upstream", "127.0.0.1:1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: port_file.exists() or process.poll() is not None, "the gateway up")
    finally:
        process.terminate()
        _, log = process.communicate(timeout=WITHIN)
    assert "serving HTTP" in log, log
    return log


def test_a_gateway_beyond_loopback_says_it_has_no_authentication_of_its_own(
    tmp_path: Path,
) -> None:
    warning = (
        "serving on 0.0.0.0 with no authentication of its own: every call is the "
        "upstream's to authenticate (serve --auth-token-file)"
    )
    assert warning in _gateway_log("0.0.0.0", tmp_path)
    assert "no authentication" not in _gateway_log("127.0.0.1", tmp_path)
