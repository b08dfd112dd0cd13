"""TLS, bearer tokens and metadata of the gRPC clients, against real servers.

Each server here is a small grpc.aio ``InferenceService`` on 127.0.0.1, port 0,
in its own event loop thread: ``ListModels`` holds one model ``m`` and
``Generate`` answers with the invocation metadata it saw (``"k=v;k2=v2"``), so
a test reads what reached the server from the returned text. A server given a
token aborts every call without ``authorization: Bearer <token>`` with
UNAUTHENTICATED. TLS servers use a self-signed certificate for 127.0.0.1 and
localhost, made with the openssl CLI.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from protoserve.clients import (
    AsyncClient,
    Client,
    FinishReason,
    Unauthenticated,
    Unavailable,
)
from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests._threads import LoopThread
from tests._tools import debian

pytestmark = pytest.mark.e2e

TOKEN = "s3cret-t0ken"
AUTH_MESSAGE = "missing or wrong bearer token"
# Metadata every call carries that the tests do not look at.
_TRANSPORT_KEYS = {"user-agent", "te", "content-type"}


def _seen(metadata: tuple[tuple[str, str | bytes], ...]) -> str:
    """The caller's metadata as ``"k=v;k2=v2"``, in the order it arrived."""
    return ";".join(
        f"{key}={value!s}"
        for key, value in metadata
        if not key.startswith((":", "grpc-")) and key not in _TRANSPORT_KEYS
    )


_Context = grpc.aio.ServicerContext[Any, Any]


class _Servicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, token: str | None) -> None:
        self.token = token
        self.list_models_metadata: list[str] = []

    async def _check(self, context: _Context) -> None:
        if self.token is None:
            return
        metadata = tuple(context.invocation_metadata() or ())
        if ("authorization", f"Bearer {self.token}") not in metadata:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, AUTH_MESSAGE)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: _Context
    ) -> pb.ListModelsResponse:
        await self._check(context)
        self.list_models_metadata.append(_seen(tuple(context.invocation_metadata() or ())))
        model = pb.Model(
            name="m",
            version="1",
            tasks=[pb.TASK_TEXT_GENERATION],
            state=pb.MODEL_STATE_READY,
        )
        return pb.ListModelsResponse(models=[model])

    async def Generate(self, request: pb.GenerateRequest, context: _Context) -> pb.GenerateResponse:
        await self._check(context)
        return pb.GenerateResponse(
            generated_text=_seen(tuple(context.invocation_metadata() or ())),
            finish_reason=pb.FINISH_REASON_LENGTH,
            model=request.model,
        )


@dataclass
class _Server:
    thread: LoopThread
    server: grpc.aio.Server
    servicer: _Servicer
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.thread.run(self.server.stop(0.5), timeout=30)
        self.thread.stop()


def _serve(token: str | None, credentials: grpc.ServerCredentials | None) -> _Server:
    thread = LoopThread()
    servicer = _Servicer(token)  # type: ignore[abstract]  # only 2 of 6 methods

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        return server, port

    server, port = thread.run(start(), timeout=30)
    return _Server(thread, server, servicer, port)


def _self_signed(directory: Path) -> tuple[bytes, bytes]:
    """A self-signed (key, cert) pair in PEM for 127.0.0.1 and localhost."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(directory / "key.pem"),
            "-out",
            str(directory / "cert.pem"),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return (directory / "key.pem").read_bytes(), (directory / "cert.pem").read_bytes()


@dataclass
class _Certs:
    key: bytes
    cert: bytes
    other_cert: bytes  # a certificate the server's is not signed by


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> _Certs:
    debian("openssl", "openssl")
    base = tmp_path_factory.mktemp("tls")
    key, cert = _self_signed(base / "server")
    _, other_cert = _self_signed(base / "other")
    return _Certs(key, cert, other_cert)


@pytest.fixture(scope="module")
def tls_server(certs: _Certs) -> Iterator[_Server]:
    """TLS, no token required."""
    server = _serve(None, grpc.ssl_server_credentials([(certs.key, certs.cert)]))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_auth_server(certs: _Certs) -> Iterator[_Server]:
    """TLS, TOKEN required."""
    server = _serve(TOKEN, grpc.ssl_server_credentials([(certs.key, certs.cert)]))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain_auth_server() -> Iterator[_Server]:
    """No TLS, TOKEN required."""
    server = _serve(TOKEN, None)
    yield server
    server.stop()


# (1) TLS


def test_tls_with_the_servers_root_generates(tls_server: _Server, certs: _Certs) -> None:
    with Client(
        tls_server.target, tls=True, root_certificates=certs.cert, model="m", timeout=10
    ) as client:
        text = client.generate("hi")
        assert text == ""  # no token, no metadata: nothing of the caller's arrived
        assert text.finish_reason is FinishReason.LENGTH
        assert text.model == "m"
        [info] = client.models()
        assert (info.name, info.state, info.tasks) == ("m", "ready", ("text_generation",))


def test_root_certificates_imply_tls(tls_server: _Server, certs: _Certs) -> None:
    with Client(tls_server.target, root_certificates=certs.cert, timeout=10) as client:
        # model=None: the one model the server holds, found over TLS.
        assert client.generate("hi").model == "m"


@pytest.mark.parametrize("roots", ["system", "other"], ids=["system-roots", "wrong-root"])
def test_tls_without_the_right_root_is_unavailable_not_a_hang(
    tls_server: _Server, certs: _Certs, roots: str
) -> None:
    root_certificates = None if roots == "system" else certs.other_cert
    with Client(
        tls_server.target, tls=True, root_certificates=root_certificates, model="m", timeout=5
    ) as client:
        # A handshake failure ends the call (retries included) as UNAVAILABLE; waiting
        # for the 5 s deadline instead would raise DeadlineExceeded.
        with pytest.raises(Unavailable):
            client.generate("hi")


def test_plain_client_against_a_tls_server_is_unavailable(tls_server: _Server) -> None:
    with Client(tls_server.target, model="m", timeout=5) as client:
        with pytest.raises(Unavailable):  # not DeadlineExceeded: no wait for the deadline
            client.generate("hi")


# (2) token over TLS


def test_token_over_tls_arrives_as_bearer_authorization(
    tls_auth_server: _Server, certs: _Certs
) -> None:
    with Client(
        tls_auth_server.target, root_certificates=certs.cert, token=TOKEN, model="m", timeout=10
    ) as client:
        assert client.generate("hi") == f"authorization=Bearer {TOKEN}"
        # The call credentials also cover ListModels (used when model is None).
        assert [m.name for m in client.models()] == ["m"]


@pytest.mark.parametrize("token", [None, "wrong"], ids=["no-token", "wrong-token"])
def test_missing_or_wrong_token_over_tls_is_unauthenticated(
    tls_auth_server: _Server, certs: _Certs, token: str | None
) -> None:
    with Client(
        tls_auth_server.target, root_certificates=certs.cert, token=token, model="m", timeout=10
    ) as client:
        with pytest.raises(Unauthenticated) as raised:
            client.generate("hi")
        assert raised.value.message == AUTH_MESSAGE
        assert raised.value.code is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(Unauthenticated):
            client.models()


# (3) token without TLS


def test_token_without_tls_is_sent_as_metadata(plain_auth_server: _Server) -> None:
    with Client(plain_auth_server.target, token=TOKEN, model="m", timeout=10) as client:
        assert client.generate("hi") == f"authorization=Bearer {TOKEN}"
    with Client(plain_auth_server.target, token=TOKEN, timeout=10) as client:
        assert client.generate("hi").model == "m"  # ListModels carried the token too


@pytest.mark.parametrize("token", [None, "wrong"], ids=["no-token", "wrong-token"])
def test_missing_or_wrong_token_without_tls_is_unauthenticated(
    plain_auth_server: _Server, token: str | None
) -> None:
    with Client(plain_auth_server.target, token=token, model="m", timeout=10) as client:
        with pytest.raises(Unauthenticated) as raised:
            client.generate("hi")
        assert raised.value.message == AUTH_MESSAGE


# (4) metadata


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_client_and_call_metadata_both_arrive(
    tls: bool, tls_auth_server: _Server, plain_auth_server: _Server, certs: _Certs
) -> None:
    server = tls_auth_server if tls else plain_auth_server
    with Client(
        server.target,
        root_certificates=certs.cert if tls else None,
        token=TOKEN,
        metadata=[("x-tenant", "blue")],
        model="m",
        timeout=10,
    ) as client:
        seen = client.generate("hi", metadata=[("x-request", "r1")]).split(";")
        assert sorted(seen) == sorted(
            ["x-tenant=blue", "x-request=r1", f"authorization=Bearer {TOKEN}"]
        )
        # Client metadata is on every call; per-call metadata only on its call.
        assert sorted(client.generate("hi").split(";")) == sorted(
            ["x-tenant=blue", f"authorization=Bearer {TOKEN}"]
        )
        before = len(server.servicer.list_models_metadata)
        client.models(metadata=[("x-request", "r2")])
        assert sorted(server.servicer.list_models_metadata[before].split(";")) == sorted(
            ["x-tenant=blue", "x-request=r2", f"authorization=Bearer {TOKEN}"]
        )


# (5) AsyncClient


def test_async_client_tls_token_and_metadata(
    tls_auth_server: _Server, plain_auth_server: _Server, certs: _Certs
) -> None:
    async def main() -> None:
        async with AsyncClient(
            tls_auth_server.target,
            root_certificates=certs.cert,
            token=TOKEN,
            metadata=[("x-tenant", "blue")],
            timeout=10,
        ) as client:
            text = await client.generate("hi", metadata=[("x-request", "r1")])
            assert text.model == "m"  # model=None: ListModels over TLS, with the token
            assert text.finish_reason is FinishReason.LENGTH
            assert sorted(text.split(";")) == sorted(
                ["x-tenant=blue", "x-request=r1", f"authorization=Bearer {TOKEN}"]
            )

        async with AsyncClient(
            tls_auth_server.target, root_certificates=certs.cert, token="wrong", model="m"
        ) as client:
            with pytest.raises(Unauthenticated) as raised:
                await client.generate("hi")
            assert raised.value.message == AUTH_MESSAGE

        async with AsyncClient(
            tls_auth_server.target, root_certificates=certs.other_cert, model="m", timeout=5
        ) as client:
            with pytest.raises(Unavailable):  # not DeadlineExceeded, as above
                await client.generate("hi")

        async with AsyncClient(
            plain_auth_server.target, token=TOKEN, model="m", timeout=10
        ) as client:
            assert await client.generate("hi") == f"authorization=Bearer {TOKEN}"

    asyncio.run(main())
