"""The workers of ``protoserve serve --workers``: one model repository, alike on each.

Two (or three) real servers in this process, each on its own TCP port and its
own unix worker socket, configured with each other's sockets and one secret, as
their supervisor configures them (no SO_REUSEPORT: each is called on its own
port). Model control needs the admin token, which the workers never send each
other: the secret stands in for it. The repository holds two small models,
``a`` and ``b``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from protoserve.oip.v2 import grpc_service_pb2 as pb
from protoserve.oip.v2 import grpc_service_pb2_grpc as pb_grpc
from protoserve.server import InferenceServer
from protoserve.server.auth import Auth, SiblingSecretError
from protoserve.server.config import ServerConfig, add_arguments, from_arguments
from protoserve.server.siblings import SIBLING_HEADER
from tests._threads import LoopThread, start_grpc_server, stop_grpc_server

SECRET = "5ec7e7" * 6
ADMIN_TOKEN = "admin-token-of-the-workers"
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
MODEL = 'source = "tests.server.repository_models:RowTripler"\n'


def repository(root: Path, *names: str) -> Path:
    """A model repository holding ``names``, each version 1 of a tiny class model."""
    for name in names:
        add_model(root, name)
    return root


def add_model(root: Path, name: str) -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "model.toml").write_text(MODEL)


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A private folder (0700) for the worker sockets, short enough for a socket's path
    (108 bytes at most, which pytest's tmp_path can pass)."""
    folder = Path(tempfile.mkdtemp(prefix="ps-"))
    folder.chmod(0o700)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Worker:
    thread: LoopThread
    server: InferenceServer
    channel: grpc.Channel
    oip: pb_grpc.GRPCInferenceServiceStub

    def index(self) -> dict[str, tuple[str, str]]:
        """RepositoryIndex: model name -> (state, reason) of its version 1."""
        response = self.oip.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
        return {m.name: (m.state, m.reason) for m in response.models}

    def load(self, name: str) -> None:
        request = pb.RepositoryModelLoadRequest(model_name=name)
        self.oip.RepositoryModelLoad(request, timeout=30, metadata=ADMIN)

    def unload(self, name: str) -> None:
        request = pb.RepositoryModelUnloadRequest(model_name=name)
        self.oip.RepositoryModelUnload(request, timeout=30, metadata=ADMIN)


@contextlib.contextmanager
def worker(
    root: Path, sockets: Path, me: str, siblings: Sequence[str], **config: Any
) -> Iterator[Worker]:
    """A server on a port of its own and on ``sockets/me.sock``, whose siblings listen on
    ``sockets/NAME.sock`` for each of ``siblings``."""
    admin = root.parent / f"{root.name}-admin-tokens"
    admin.write_text(ADMIN_TOKEN + "\n")
    thread, server = start_grpc_server(
        (),
        model_repository=str(root),
        admin_token_file=str(admin),
        worker_socket=str(sockets / f"{me}.sock"),
        sibling_sockets=tuple(str(sockets / f"{s}.sock") for s in siblings),
        sibling_secret=SECRET,
        shutdown_grace=2,
        **config,
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Worker(thread, server, channel, pb_grpc.GRPCInferenceServiceStub(channel))
    finally:
        channel.close()
        stop_grpc_server(thread, server)


def failure(call: Any, *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return info.value


READY = ("READY", "")
UNLOADED = ("UNAVAILABLE", "unloaded")


def test_a_load_or_unload_on_one_worker_reaches_the_other(tmp_path: Path, sockets: Path) -> None:
    root = repository(tmp_path / "models", "a", "b")
    with (
        worker(root, sockets, "wa", ["wb"]) as a,
        worker(root, sockets, "wb", ["wa"]) as b,
    ):
        assert a.index() == b.index() == {"a": READY, "b": READY}
        b.unload("a")  # without the admin token between them: the secret stands in
        assert a.index() == b.index() == {"a": UNLOADED, "b": READY}
        a.load("a")
        assert a.index() == b.index() == {"a": READY, "b": READY}
        # The client's own call still needs the admin token.
        request = pb.RepositoryModelUnloadRequest(model_name="a")
        refused = failure(a.oip.RepositoryModelUnload, request)
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        assert b.index()["a"] == READY


def test_a_wrong_secret_is_refused_and_logged_without_it(
    tmp_path: Path, sockets: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = repository(tmp_path / "models", "a", "b")
    wrong = "0bad5ec7" * 4
    unload = pb.RepositoryModelUnloadRequest(model_name="a")
    with worker(root, sockets, "wa", ["wb"]) as a, caplog.at_level(logging.INFO):
        with grpc.insecure_channel(f"unix:{sockets / 'wa.sock'}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            err = failure(stub.RepositoryModelUnload, unload, 10, ((SIBLING_HEADER, wrong),))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
            assert "secret is not accepted" in (err.details() or "")  # type: ignore[attr-defined]
            # The right secret opens model control only.
            infer = pb.ModelInferRequest(model_name="a")
            err = failure(stub.ModelInfer, infer, 10, ((SIBLING_HEADER, SECRET),))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        # The right secret over TCP: the peer is not known to be this user.
        err = failure(a.oip.RepositoryModelUnload, unload, 10, ((SIBLING_HEADER, SECRET),))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        assert "worker socket only" in (err.details() or "")  # type: ignore[attr-defined]
        assert a.index()["a"] == READY
    assert "refused RepositoryModelUnload" in caplog.text
    assert wrong not in caplog.text and SECRET not in caplog.text


def test_a_sibling_down_or_failing_is_named_in_the_error(tmp_path: Path, sockets: Path) -> None:
    root = repository(tmp_path / "models", "a", "b")
    other = repository(tmp_path / "other", "a")  # no b: unloading it there is NOT_FOUND
    with (
        worker(root, sockets, "wa", ["wb", "wc"]) as a,  # wc never runs
        worker(other, sockets, "wb", ["wa"]) as b,
    ):
        err = failure(a.unload, "b")
        # UNAVAILABLE, as a sibling could not be reached; each failure named, with why.
        assert err.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        details = err.details() or ""  # type: ignore[attr-defined]
        assert "not on 2 of the 2 other workers" in details
        assert "wb.sock: NOT_FOUND: model 'b' is not in the model repository" in details
        assert "wc.sock: UNAVAILABLE: cannot reach it" in details
        assert str(sockets) not in details  # the socket's folder is not the client's business
        assert a.index()["b"] == UNLOADED
        # The sibling that could be reached has a change it could make.
        err = failure(a.unload, "a")
        assert "wb.sock" not in (err.details() or "")  # type: ignore[attr-defined]
        assert a.index()["a"] == b.index()["a"] == UNLOADED


def test_a_worker_started_later_serves_what_its_siblings_serve(
    tmp_path: Path, sockets: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = repository(tmp_path / "models", "a", "b")
    with worker(root, sockets, "wa", ["wb"]) as a:
        # wb is down (crashed, restarting): the client hears of it, wa has the change.
        assert "wb.sock: UNAVAILABLE" in (failure(a.unload, "b").details() or "")  # type: ignore[attr-defined]
        add_model(root, "c")
        failure(a.load, "c")
        assert a.index() == {"a": READY, "b": UNLOADED, "c": READY}
        with caplog.at_level(logging.INFO), worker(root, sockets, "wb", ["wa"]) as b:
            # b is not loaded at all (left out), rather than loaded and then unloaded.
            assert b.index() == {"a": READY, "b": ("UNAVAILABLE", "not loaded"), "c": READY}
            assert "sibling worker wa.sock does not serve b: left out" in caplog.text
            # From now on, changes reach it.
            a.load("b")
            assert b.index()["b"] == READY


def test_catching_up_loads_and_unloads_what_a_sibling_changed(
    tmp_path: Path, sockets: Path
) -> None:
    root = repository(tmp_path / "models", "a", "b")
    # wa does not forward to wb here: wb falls behind, as a worker that missed calls.
    with worker(root, sockets, "wa", []) as a, worker(root, sockets, "wb", ["wa"]) as b:
        a.unload("a")
        b.unload("b")  # forwarded to wa: now neither serves b
        a.load("b")
        assert a.index() == {"a": UNLOADED, "b": READY}
        assert b.index() == {"a": READY, "b": UNLOADED}
        siblings = b.server.siblings
        assert siblings is not None
        b.thread.run(siblings.catch_up(b.server.runtime), timeout=30)
        assert b.index() == {"a": UNLOADED, "b": READY}


def test_the_workers_settings_come_from_the_environment_and_are_hidden() -> None:
    env = {
        "PROTOSERVE_WORKER_SOCKET": "/run/ps/w1.sock",
        "PROTOSERVE_SIBLING_SOCKETS": "/run/ps/w0.sock, /run/ps/w2.sock",
        "PROTOSERVE_SIBLING_SECRET": SECRET,
    }
    parser = argparse.ArgumentParser()
    add_arguments(parser, env)
    config = from_arguments(parser.parse_args([]), env)
    assert config.worker_socket == "/run/ps/w1.sock"
    assert config.sibling_sockets == ("/run/ps/w0.sock", "/run/ps/w2.sock")
    assert config.sibling_secret == SECRET and SECRET not in repr(config)
    assert "sibling" not in parser.format_help() and "worker-socket" not in parser.format_help()
    with pytest.raises(SystemExit):  # the secret is no flag: a flag's value is in ps
        parser.parse_args(["--sibling-secret", SECRET])
    assert Auth.from_config(config).sibling_secret == SECRET
    for bad in (
        ServerConfig(sibling_secret="not hex, and short"),
        ServerConfig(sibling_sockets=("/run/ps/w0.sock",)),
    ):
        with pytest.raises(SiblingSecretError) as info:
            Auth.from_config(bad)
        assert "PROTOSERVE_SIBLING_SECRET" in str(info.value)
        assert "not hex" not in str(info.value)  # a secret is never said back
