"""TLS end to end: real ``protoserve serve``, ``gateway`` and ``up`` processes over TLS and mTLS.

Certificates come from tests/_tls.py (a CA, a server certificate for 127.0.0.1, a
client certificate, and a second CA with a client of its own). A TLS server
refuses plaintext; an mTLS server (``--client-ca``) refuses a client without a
certificate of its CA in the handshake, so such a client gets UNAVAILABLE and
never reaches a method. The in-process gateway over TLS is
tests/gateway/test_upstream_tls.py's.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from protoserve.clients import AsyncClient, Client, Unavailable
from tests._tls import PKI, make_pki
from tests.e2e.conftest import ServerProcess, start_process

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
GENERATE = {"inputs": "def ", "parameters": {"max_new_tokens": 3}}


def _protoserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "protoserve.clients.cli", *args]


def _start(folder: Path, command: str, *args: str, timeout: float = 120) -> ServerProcess:
    """``protoserve COMMAND ... ARGS`` in ``folder``, once it has written its port."""
    folder.mkdir(parents=True, exist_ok=True)
    return start_process(folder, command, *args, timeout=timeout)


def _server_tls(pki: PKI) -> list[str]:
    return [f"--certfile={pki.server_cert}", f"--keyfile={pki.server_key}"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``serve --certfile --keyfile``: TLS, no client certificate asked."""
    server = _start(tmp_path_factory.mktemp("tls"), "serve", *_server_tls(pki))
    yield server
    assert server.stop() == 0, server.log.read_text()


@pytest.fixture(scope="module")
def mtls_server(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``serve --certfile --keyfile --client-ca``: client certificates of ``pki.ca`` only."""
    server = _start(
        tmp_path_factory.mktemp("mtls"), "serve", *_server_tls(pki), f"--client-ca={pki.ca}"
    )
    yield server
    assert server.stop() == 0, server.log.read_text()


# The server's TLS, and the Python clients against it


def test_a_tls_server_says_so_in_its_log(
    tls_server: ServerProcess, mtls_server: ServerProcess
) -> None:
    assert f"serving gRPC over TLS on 127.0.0.1:{tls_server.port}" in tls_server.log.read_text()
    assert f"serving gRPC over mTLS on 127.0.0.1:{mtls_server.port}" in mtls_server.log.read_text()


def test_a_client_trusting_the_ca_generates_over_tls(tls_server: ServerProcess, pki: PKI) -> None:
    with Client(tls_server.target, root_certificates=pki.read("ca"), timeout=30) as client:
        text = client.generate("def ", max_new_tokens=3)
        assert text.model == "bytelm"  # model=None: found with ListModels over TLS
        assert text.usage is not None and text.usage.completion_tokens == 3

    async def stream() -> list[str]:
        async with AsyncClient(
            tls_server.target, root_certificates=pki.read("ca"), timeout=30
        ) as client:
            return [str(part) async for part in client.generate_stream("def ", max_new_tokens=4)]

    assert len("".join(asyncio.run(stream())).encode()) == 4  # bytelm: one byte a token


@pytest.mark.parametrize("roots", ["none", "system", "other-ca"])
def test_a_tls_server_refuses_clients_that_do_not_trust_it(
    tls_server: ServerProcess, pki: PKI, roots: str
) -> None:
    """Plaintext, the system's roots, another CA: each fails its handshake, UNAVAILABLE."""
    options: dict[str, Any] = {
        "none": {},
        "system": {"tls": True},
        "other-ca": {"root_certificates": pki.read("other_ca")},
    }[roots]
    with Client(tls_server.target, model="bytelm", timeout=30, retries=0, **options) as client:
        with pytest.raises(Unavailable):
            client.generate("def ", max_new_tokens=1)


def test_mtls_a_client_with_a_certificate_of_the_ca_generates(
    mtls_server: ServerProcess, pki: PKI
) -> None:
    with Client(
        mtls_server.target,
        root_certificates=pki.read("ca"),
        certificate_chain=pki.read("client_cert"),
        private_key=pki.read("client_key"),
        timeout=30,
    ) as client:
        usage = client.generate("def ", max_new_tokens=2).usage
        assert usage is not None and usage.completion_tokens == 2


@pytest.mark.parametrize("certificate", ["none", "other-ca"])
def test_mtls_a_client_without_a_certificate_of_the_ca_is_refused(
    mtls_server: ServerProcess, pki: PKI, certificate: str
) -> None:
    client_cert: dict[str, Any] = {
        "none": {},
        "other-ca": {
            "certificate_chain": pki.read("other_client_cert"),
            "private_key": pki.read("other_client_key"),
        },
    }[certificate]
    with Client(
        mtls_server.target,
        root_certificates=pki.read("ca"),
        model="bytelm",
        timeout=30,
        retries=0,
        **client_cert,
    ) as client:
        with pytest.raises(Unavailable):
            client.generate("def ", max_new_tokens=1)


# The CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _protoserve(*args), capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )


def test_cli_over_mtls(mtls_server: ServerProcess, pki: PKI) -> None:
    tls = ["--server", mtls_server.target, f"--cacert={pki.ca}"]
    done = _cli("models", *tls, f"--cert={pki.client_cert}", f"--key={pki.client_key}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("bytelm\t")
    done = _cli("generate", *tls, f"--cert={pki.client_cert}", f"--key={pki.client_key}", "def ")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()

    refused = _cli("models", *tls)  # no client certificate
    assert refused.returncode == 1
    assert refused.stderr.startswith("protoserve models: ") and "Traceback" not in refused.stderr


def test_cli_names_a_bad_tls_file(pki: PKI, tmp_path: Path) -> None:
    done = _cli("models", "--cacert", str(tmp_path / "missing.pem"))
    assert done.returncode == 2
    assert done.stderr == (
        f"protoserve models: --cacert {tmp_path / 'missing.pem'}: cannot read it "
        "(No such file or directory)\n"
    )
    done = _cli("models", f"--cert={pki.client_cert}")
    assert (done.returncode, done.stderr) == (
        2,
        "protoserve models: --cert and --key go together\n",
    )


# Start-up errors: one line naming the flag, no traceback, nothing served


def _refusals(pki: PKI, tmp_path: Path) -> list[tuple[list[str], str]]:
    missing = tmp_path / "missing.pem"
    return [
        (
            [f"--certfile={missing}", f"--keyfile={pki.server_key}"],
            f"--certfile {missing}: cannot read it",
        ),
        ([f"--certfile={pki.server_cert}"], "--certfile and --keyfile go together"),
        ([f"--client-ca={pki.ca}"], "--client-ca needs --certfile and --keyfile"),
        (
            [f"--certfile={pki.server_cert}", f"--keyfile={pki.client_key}"],
            f"--certfile {pki.server_cert} and --keyfile {pki.client_key} are not a "
            "certificate and its private key",
        ),
        (
            [*_server_tls(pki), f"--client-ca={pki.server_key}"],
            f"--client-ca {pki.server_key}: holds no PEM certificate",
        ),
    ]


def test_serve_refuses_bad_tls_files_in_one_line(pki: PKI, tmp_path: Path) -> None:
    for flags, message in _refusals(pki, tmp_path):
        done = _cli("serve", "--port", "0", *flags)
        assert done.returncode == 2, (flags, done.stderr)
        assert done.stderr.startswith(f"protoserve serve: {message}"), done.stderr
        assert len(done.stderr.splitlines()) == 1, done.stderr


def test_serve_reads_tls_files_from_the_environment(pki: PKI, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    env = {**os.environ, "PROTOSERVE_CERTFILE": str(missing), "PROTOSERVE_KEYFILE": "k.pem"}
    done = subprocess.run(
        _protoserve("serve", "--port", "0"),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"protoserve serve: --certfile {missing}: cannot read it")


# The gateway process in front of a TLS server


def _upstream_mtls(pki: PKI) -> list[str]:
    return [
        f"--upstream-ca={pki.ca}",
        f"--upstream-certfile={pki.client_cert}",
        f"--upstream-keyfile={pki.client_key}",
    ]


@pytest.mark.parametrize("source", [[], ["--from-reflection"]], ids=["compiled", "reflection"])
def test_the_gateway_reaches_an_mtls_server(
    mtls_server: ServerProcess, pki: PKI, tmp_path: Path, source: Sequence[str]
) -> None:
    gateway = _start(
        tmp_path, "gateway", "--upstream", mtls_server.target, *_upstream_mtls(pki), *source
    )
    try:
        with httpx.Client(base_url=f"http://{gateway.target}", timeout=30) as http:
            answer = http.post("/v1/models/bytelm:generate", json=GENERATE)
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] == 3
            assert http.get("/readyz").json() == {"status": "SERVING"}
    finally:
        assert gateway.stop() == 0, gateway.log.read_text()


def test_a_gateway_without_upstream_tls_is_not_ready(
    tls_server: ServerProcess, tmp_path: Path
) -> None:
    gateway = _start(tmp_path, "gateway", "--upstream", tls_server.target)
    try:
        with httpx.Client(base_url=f"http://{gateway.target}", timeout=30) as http:
            ready = http.get("/readyz")
            assert (ready.status_code, ready.json()["status"]) == (503, "UNREACHABLE")
            assert http.post("/v1/models/bytelm:generate", json=GENERATE).status_code == 503
    finally:
        assert gateway.stop() == 0, gateway.log.read_text()


def test_the_gateway_refuses_a_bad_upstream_tls_file_in_one_line(pki: PKI, tmp_path: Path) -> None:
    done = _cli("gateway", "--port", "0", f"--upstream-ca={pki.server_key}")
    assert done.returncode == 2
    assert done.stderr == (
        f"protoserve gateway: --upstream-ca {pki.server_key}: holds no PEM certificate\n"
    )
    done = _cli("gateway", "--port", "0", f"--upstream-certfile={pki.client_cert}")
    assert done.returncode == 2
    assert "--upstream-certfile and --upstream-keyfile go together" in done.stderr


# protoserve up: both, wired


def test_up_with_mtls_serves_end_to_end(pki: PKI, tmp_path: Path) -> None:
    """A self-signed server certificate: ``up`` gives the gateway it as its CA."""
    log = tmp_path / "up.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            _protoserve(
                "up",
                *("--grpc-port", "0", "--http-port", "0"),
                f"--certfile={pki.self_signed_cert}",
                f"--keyfile={pki.self_signed_key}",
                f"--client-ca={pki.ca}",
                f"--upstream-certfile={pki.client_cert}",
                f"--upstream-keyfile={pki.client_key}",
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 120
        while not (
            found := re.search(r"gRPC on ([\d.]+:\d+), HTTP on (http://[\d.:]+)", log.read_text())
        ):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        grpc_target, base = found.group(1), found.group(2)
        with httpx.Client(base_url=base, timeout=30) as http:
            answer = http.post("/v1/models/bytelm:generate", json=GENERATE)
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] == 3
            assert http.get("/readyz").json() == {"status": "SERVING"}
        # The gRPC port itself is mTLS: a client without a certificate is refused.
        with Client(
            grpc_target,
            root_certificates=pki.read("self_signed_cert"),
            model="bytelm",
            timeout=30,
            retries=0,
        ) as client:
            with pytest.raises(Unavailable):
                client.generate("def ", max_new_tokens=1)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    assert code == 0, log.read_text()


def test_up_refuses_mtls_without_a_certificate_for_the_gateway(pki: PKI) -> None:
    done = _cli("up", *_server_tls(pki), f"--client-ca={pki.ca}")
    assert done.returncode == 2
    assert "give it one with --upstream-certfile and --upstream-keyfile" in done.stderr


def test_up_replicas_over_tls_check_each_server_against_its_host(pki: PKI, tmp_path: Path) -> None:
    """``up --replicas 2 --certfile``: the gateway's address list is checked against the
    host the certificate names (``gateway/_balancing.py``), not the list itself."""
    log = tmp_path / "up.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            _protoserve(
                "up",
                *("--replicas", "2", "--grpc-port", "0", "--http-port", "0"),
                *("--model", "tests.server.models_for_tests:Doubler"),
                f"--certfile={pki.self_signed_cert}",
                f"--keyfile={pki.self_signed_key}",
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 120
        while not (found := re.search(r"HTTP on (http://[\d.:]+)", log.read_text())):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        with httpx.Client(base_url=found.group(1), timeout=30) as http:
            assert http.get("/readyz").json() == {"status": "SERVING"}
            for _ in range(4):  # both servers, round robin
                assert http.get("/v1/models/doubler").status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    assert code == 0, log.read_text()
