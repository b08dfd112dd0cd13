"""The gateway's upstream over TLS and mTLS: ``build_gateway(channel_credentials=...)``.

A real InferenceServer with ``certfile``/``keyfile`` (and ``client_ca``) on port 0,
the gateway served by uvicorn in front of it: a request goes HTTP -> TLS gRPC, and
``/readyz`` asks Health over the same channel. The processes and flags
(``--upstream-ca`` and friends) are tests/e2e/test_tls.py's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from protoserve.gateway import build_gateway
from protoserve.gateway._tls import TLSFileError, upstream_credentials
from tests._threads import LoopThread, UvicornThread, start_grpc_server, stop_grpc_server
from tests._tls import PKI, make_pki

MODEL = "tests.server.models_for_tests:Scripted"
GENERATE = "/v1/models/scripted:generate"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_server(pki: PKI) -> Iterator[tuple[LoopThread, Any]]:
    """TLS with client certificates required, signed by ``pki.ca``."""
    thread, server = start_grpc_server(
        [MODEL],
        certfile=str(pki.server_cert),
        keyfile=str(pki.server_key),
        client_ca=str(pki.ca),
    )
    yield thread, server
    stop_grpc_server(thread, server)


def _gateway(server: Any, credentials: grpc.ChannelCredentials | None) -> UvicornThread:
    return UvicornThread(build_gateway(f"127.0.0.1:{server.port}", channel_credentials=credentials))


@pytest.fixture
def through(
    request: pytest.FixtureRequest, mtls_server: tuple[LoopThread, Any], pki: PKI
) -> Iterator[httpx.Client]:
    """An HTTP client of a gateway built with the credentials the test names."""
    credentials = request.param(pki)
    gateway = _gateway(mtls_server[1], credentials)
    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            yield http
    finally:
        gateway.stop()


def _with_client_cert(pki: PKI) -> grpc.ChannelCredentials | None:
    return upstream_credentials(
        ca=str(pki.ca), certfile=str(pki.client_cert), keyfile=str(pki.client_key)
    )


@pytest.mark.parametrize("through", [_with_client_cert], indirect=True)
def test_a_request_reaches_an_mtls_upstream_and_readyz_is_ready(through: httpx.Client) -> None:
    answer = through.post(GENERATE, json={"inputs": "x", "parameters": {"max_new_tokens": 1}})
    assert answer.status_code == 200, answer.text
    assert answer.json()["generated_text"] == "h"
    assert through.get("/readyz").json() == {"status": "SERVING"}


def _plaintext(pki: PKI) -> None:
    return None


def _ca_only(pki: PKI) -> grpc.ChannelCredentials | None:
    return upstream_credentials(ca=str(pki.ca))


def _untrusted_client(pki: PKI) -> grpc.ChannelCredentials | None:
    return upstream_credentials(
        ca=str(pki.ca),
        certfile=str(pki.other_client_cert),
        keyfile=str(pki.other_client_key),
    )


def _wrong_ca(pki: PKI) -> grpc.ChannelCredentials | None:
    return upstream_credentials(
        ca=str(pki.other_ca), certfile=str(pki.client_cert), keyfile=str(pki.client_key)
    )


@pytest.mark.parametrize(
    "through",
    [_plaintext, _ca_only, _untrusted_client, _wrong_ca],
    ids=["plaintext", "no-client-cert", "client-cert-of-another-ca", "server-not-trusted"],
    indirect=True,
)
def test_a_gateway_the_upstream_refuses_answers_503_and_is_not_ready(
    through: httpx.Client,
) -> None:
    answer = through.post(GENERATE, json={"inputs": "x", "parameters": {"max_new_tokens": 1}})
    # The handshake fails: UNAVAILABLE, never a hang until a deadline, never a 500.
    assert answer.status_code == 503, answer.text
    assert answer.json()["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    ready = through.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["status"] == "UNREACHABLE"


def test_upstream_credentials_need_both_halves_of_a_client_certificate(pki: PKI) -> None:
    with pytest.raises(TLSFileError, match="--upstream-certfile and --upstream-keyfile go"):
        upstream_credentials(ca=str(pki.ca), certfile=str(pki.client_cert))
    assert upstream_credentials() is None  # nothing asked: plaintext


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"ca": "missing.pem"}, "--upstream-ca missing.pem: cannot read it"),
        ({"ca": "client.key"}, "--upstream-ca client.key: holds no PEM certificate"),
        (
            {"certfile": "client.pem", "keyfile": "server.key"},
            "--upstream-certfile client.pem and --upstream-keyfile server.key are not a "
            "certificate and its private key",
        ),
    ],
    ids=["missing", "a-key-as-ca", "mismatched-key"],
)
def test_a_bad_upstream_tls_file_is_named_in_the_error(
    pki: PKI, arguments: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(Path(pki.ca).parent)
    with pytest.raises(TLSFileError) as raised:
        upstream_credentials(**arguments)
    assert str(raised.value).startswith(message)
