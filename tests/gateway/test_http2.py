"""`protoserve gateway --http2`: hypercorn serving HTTP/2 (h2c and TLS) and HTTP/1.1 on one port.

Real processes on real ports: a ``protoserve serve`` upstream with the scripted test
models, and gateway processes in front of it, each bound to port 0 and reporting
its port through ``--port-file``.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from protoserve.gateway.cli import main
from tests import _sse
from tests._observe import WITHIN, wait_until
from tests._tools import debian
from tests.e2e.conftest import ROOT, ServerProcess, start_server, stop_server

pytestmark = pytest.mark.e2e

#: The upstream's models: one that ends after 34 tokens, one that takes 20 ms a token.
MODELS = ("tests.server.models_for_tests:Scripted", "tests.server.models_for_tests:Slow")
SCRIPTED_TOKENS = len("héllo wörld. STOP here. 🙂 end".encode())
SSE = {"Accept": "text/event-stream"}
#: A --shutdown-grace no test waits out: only what the test does can end a drain sooner.
HOUR = "3600"


@dataclass
class Gateway:
    """A gateway process, its base URL and its log."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text()

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, then SIGKILL if it will not go; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def start_gateway(tmp: Path, upstream: str, *args: str, timeout: float = 60) -> Gateway:
    """Start ``protoserve gateway --port 0 ARGS`` and wait for its port file."""
    port_file = tmp / "gateway.port"
    log = tmp / "gateway.log"
    command = [
        *(sys.executable, "-m", "protoserve.clients.cli", "gateway"),
        *("--upstream", upstream, "--port", "0", "--port-file", str(port_file)),
        *args,
    ]
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(command, cwd=tmp, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not (port_file.exists() and port_file.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"gateway did not start ({process.returncode}):\n{log.read_text()}")
        time.sleep(0.05)
    scheme = "https" if "--certfile" in args else "http"
    return Gateway(process, f"{scheme}://127.0.0.1:{int(port_file.read_text())}", log)


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for IP 127.0.0.1 and its key, made with the openssl CLI."""
    openssl = debian("openssl", "openssl")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    server = start_server(
        tmp_path_factory.mktemp("upstream"),
        *(f"--model={model}" for model in MODELS),
        env={"PYTHONPATH": path},
    )
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def h2c(tmp_path_factory: pytest.TempPathFactory, upstream: ServerProcess) -> Iterator[Gateway]:
    """One cleartext ``--http2`` gateway shared by the module's read-only tests."""
    gateway = start_gateway(tmp_path_factory.mktemp("h2c"), upstream.target, "--http2")
    yield gateway
    assert gateway.stop() == 0, gateway.output()


@pytest.fixture
def launch(tmp_path: Path, upstream: ServerProcess) -> Iterator[Callable[..., Gateway]]:
    """Start a gateway of the test's own (``launch(*flags)``); stopped at the end."""
    started: list[Gateway] = []

    def start(*args: str) -> Gateway:
        folder = tmp_path / f"gateway{len(started)}"
        folder.mkdir()
        started.append(start_gateway(folder, upstream.target, *args))
        return started[-1]

    yield start
    for gateway in started:
        gateway.stop()


def h2_client(url: str) -> httpx.Client:
    """A client that speaks HTTP/2 only: prior knowledge (h2c) over cleartext."""
    return httpx.Client(base_url=url, http1=False, http2=True, timeout=30)


def test_unary_call_over_h2c_prior_knowledge(h2c: Gateway) -> None:
    with h2_client(h2c.url) as client:
        response = client.post("/v1/models/scripted:generate", json={})
    assert response.status_code == 200, response.text
    assert response.http_version == "HTTP/2"
    assert response.headers["content-type"] == "application/json"
    assert response.json()["generated_text"] == "héllo wörld. STOP here. 🙂 end"


def test_sse_stream_over_h2c(h2c: Gateway) -> None:
    with (
        h2_client(h2c.url) as client,
        client.stream("POST", "/v1/models/scripted:generateStream", json={}, headers=SSE) as r,
    ):
        assert r.http_version == "HTTP/2"
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(_sse.events(r.iter_bytes()))
    assert_scripted_stream(events)


def test_http_1_1_on_the_same_port(h2c: Gateway) -> None:
    with httpx.Client(base_url=h2c.url, timeout=30) as client:
        response = client.post("/v1/models/scripted:generate", json={})
        assert response.status_code == 200, response.text
        assert response.http_version == "HTTP/1.1"
        with client.stream(
            "POST", "/v1/models/scripted:generateStream", json={}, headers=SSE
        ) as stream:
            assert stream.http_version == "HTTP/1.1"
            events = list(_sse.events(stream.iter_bytes()))
    assert_scripted_stream(events)


def assert_scripted_stream(events: list[_sse.Event]) -> None:
    """The scripted model's whole text and its tokens in messages, the finish reason on the
    last one, then done. A message holds every token since the one before, so how many
    messages there are depends on how far the reader fell behind."""
    *messages, done = events
    assert done.event == "done" and {e.event for e in messages} == {"message"}, events
    bodies = [json.loads(e.data) for e in messages]
    assert "".join(b.get("text", "") for b in bodies) == "héllo wörld. STOP here. 🙂 end"
    assert sum(len(b.get("token_ids", [])) for b in bodies) == SCRIPTED_TOKENS
    assert bodies[-1]["finish_reason"] == "FINISH_REASON_END_OF_TEXT"


def test_h2load(h2c: Gateway, tmp_path: Path) -> None:
    h2load = debian("h2load", "nghttp2-client")
    body = tmp_path / "body.json"
    body.write_text("{}")
    result = subprocess.run(
        [
            *(h2load, "-n", "20", "-c", "2", "-d", str(body)),
            *("-H", "content-type: application/json"),
            f"{h2c.url}/v1/models/scripted:generate",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "20 succeeded" in result.stdout and "20 2xx" in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("flags", "version"),
    [
        pytest.param(("--http2",), "HTTP/2", id="hypercorn"),
        # TLS without --http2 is uvicorn's: HTTPS, HTTP/1.1 only.
        pytest.param((), "HTTP/1.1", id="uvicorn"),
    ],
)
def test_tls(
    tmp_path: Path, launch: Callable[..., Gateway], flags: tuple[str, ...], version: str
) -> None:
    cert, key = self_signed(tmp_path)
    gateway = launch(*flags, "--certfile", str(cert), "--keyfile", str(key))
    assert gateway.url.startswith("https://")
    trusting = ssl.create_default_context(cafile=str(cert))
    with httpx.Client(base_url=gateway.url, http2=True, verify=trusting, timeout=30) as client:
        response = client.post("/v1/models/scripted:generate", json={})
        assert response.status_code == 200, response.text
        assert response.http_version == version
        with client.stream(
            "POST", "/v1/models/scripted:generateStream", json={}, headers=SSE
        ) as stream:
            assert stream.http_version == version
            names = [e.event for e in _sse.events(stream.iter_bytes())]
    assert names[-1] == "done"
    # Plain HTTP to the TLS port is refused, not answered in the clear.
    with pytest.raises(httpx.TransportError), httpx.Client(timeout=10) as plain:
        plain.get(gateway.url.replace("https://", "http://") + "/healthz")
    assert gateway.stop() == 0, gateway.output()


def test_certfile_without_keyfile_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--http2", "--certfile", "cert.pem"])
    assert exit_info.value.code == 2
    assert "--certfile and --keyfile go together" in capsys.readouterr().err


def test_unreadable_certificate_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    result = subprocess.run(
        [
            *(sys.executable, "-m", "protoserve.clients.cli", "gateway", "--port", "0"),
            *("--http2", "--certfile", str(bad), "--keyfile", str(bad)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("protoserve gateway: "), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_with_nothing_in_flight_exits_0_at_once(
    launch: Callable[..., Gateway], signum: signal.Signals
) -> None:
    # An idle HTTP/2 connection stays open across the signal: it must not hold the exit up
    # for the hour of grace (the wait only bounds a hang).
    gateway = launch("--http2", "--shutdown-grace", HOUR)
    with h2_client(gateway.url) as client:
        assert client.get("/healthz").status_code == 200
        gateway.process.send_signal(signum)
        status = gateway.process.wait(WITHIN)
    assert status == 0, gateway.output()


class StreamReader(threading.Thread):
    """Reads an SSE stream from the ``slow`` model (20 ms a token) in the background."""

    def __init__(self, url: str, *, http2: bool, tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.http2, self.tokens = url, http2, tokens
        self.streaming = threading.Event()
        self.events: list[str] = []
        self.error: httpx.HTTPError | None = None

    def run(self) -> None:
        body = {"parameters": {"max_new_tokens": self.tokens}}
        path = "/v1/models/slow:generateStream"
        try:
            with (
                httpx.Client(
                    base_url=self.url, http1=not self.http2, http2=self.http2, timeout=30
                ) as client,
                client.stream("POST", path, json=body, headers=SSE) as response,
            ):
                for event in _sse.events(response.iter_bytes()):
                    self.events.append(event.event)
                    self.streaming.set()
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.streaming.set()


def drain_one_stream(gateway: Gateway, *, http2: bool) -> StreamReader:
    """SIGTERM the gateway while a 40-token stream (0.8 s) is in flight; the reader, done."""
    reader = StreamReader(gateway.url, http2=http2, tokens=40)
    reader.start()
    assert reader.streaming.wait(30) and reader.events, (reader.error, gateway.output())
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(WITHIN) == 0, gateway.output()
    reader.join(WITHIN)
    assert "Traceback" not in gateway.output(), gateway.output()
    return reader


@pytest.mark.parametrize("http2", [False, True], ids=["HTTP/1.1", "HTTP/2"])
def test_first_signal_lets_a_stream_in_flight_finish(
    launch: Callable[..., Gateway], http2: bool
) -> None:
    reader = drain_one_stream(launch("--http2", "--shutdown-grace", HOUR), http2=http2)
    assert reader.events == ["message"] * 40 + ["done"], (reader.events, reader.error)


@pytest.mark.parametrize(
    "http2",
    [
        pytest.param(False, id="HTTP/1.1"),
        pytest.param(
            True,
            id="HTTP/2",
            marks=pytest.mark.xfail(
                raises=AssertionError,
                reason="hypercorn 0.18 sends GOAWAY and closes the connection before "
                "END_STREAM when the last stream ends during a drain: every byte "
                "arrives, then the client sees the connection end (ConnectionTerminated)",
            ),
        ),
    ],
)
def test_a_stream_finished_during_the_drain_ends_cleanly(
    launch: Callable[..., Gateway], http2: bool
) -> None:
    reader = drain_one_stream(launch("--http2", "--shutdown-grace", HOUR), http2=http2)
    assert reader.error is None, reader.error


@pytest.mark.parametrize("flags", [(), ("--http2",)], ids=["uvicorn", "hypercorn"])
def test_second_signal_ends_a_stream_at_once_and_exits_0(
    launch: Callable[..., Gateway], flags: tuple[str, ...]
) -> None:
    gateway = launch(*flags, "--shutdown-grace", HOUR)
    reader = StreamReader(gateway.url, http2=bool(flags), tokens=1024)
    reader.start()
    assert reader.streaming.wait(30) and reader.events, (reader.error, gateway.output())
    at_signal = len(reader.events)
    gateway.process.send_signal(signal.SIGTERM)
    # Draining: the stream in flight keeps the process up, and keeps streaming.
    wait_until(lambda: len(reader.events) >= at_signal + 10, "the stream goes on, draining")
    assert gateway.process.poll() is None, gateway.output()
    gateway.process.send_signal(signal.SIGTERM)
    # Only the second signal can end it within the hour's grace (the wait bounds a hang).
    assert gateway.process.wait(WITHIN) == 0, gateway.output()
    reader.join(WITHIN)
    # Cut short: no `done`, and no traceback from the server on the way out.
    assert "done" not in reader.events and len(reader.events) < 1024
    assert "Traceback" not in gateway.output(), gateway.output()


@pytest.mark.parametrize("flags", [(), ("--http2",)], ids=["uvicorn", "hypercorn"])
def test_the_end_of_the_grace_ends_a_stream_and_exits_0(
    launch: Callable[..., Gateway], flags: tuple[str, ...]
) -> None:
    """--shutdown-grace 1 against a stream of 1,024 tokens of 20 ms (20 s, so within the
    30 s wait it would end with `done` if nothing cut it)."""
    gateway = launch(*flags, "--shutdown-grace", "1")
    reader = StreamReader(gateway.url, http2=bool(flags), tokens=1024)
    reader.start()
    assert reader.streaming.wait(30) and reader.events, (reader.error, gateway.output())
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(WITHIN) == 0, gateway.output()
    reader.join(WITHIN)
    assert "done" not in reader.events and len(reader.events) < 1024
    assert "Traceback" not in gateway.output(), gateway.output()


@pytest.mark.parametrize("value", ["-1", "nan", "soon"])
def test_a_bad_shutdown_grace_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], value: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--shutdown-grace", value])
    assert exit_info.value.code == 2
    assert "--shutdown-grace" in capsys.readouterr().err
