"""Bearer tokens and privileged model control, against a real server on a real port.

The server here has a model repository holding ``counted``
(``tests.server.models_for_tests:Counted``, which counts the calls that reach it),
two inference tokens and one admin token. Without a token every call but health
is UNAUTHENTICATED and the model never runs; an inference token runs inference
and is refused model control (PERMISSION_DENIED); the admin token unloads and loads.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protoserve.common.hosts import is_loopback
from protoserve.inference.v1 import inference_service_pb2 as v1
from protoserve.inference.v1 import inference_service_pb2_grpc as v1_grpc
from protoserve.oip.v2 import grpc_service_pb2 as pb
from protoserve.oip.v2 import grpc_service_pb2_grpc as pb_grpc
from protoserve.server.auth import Access, Auth, TokenFileError, read_tokens
from protoserve.server.config import ServerConfig, add_arguments, from_arguments
from tests._observe import counted, wait_until
from tests._threads import LoopThread, start_grpc_server, stop_grpc_server
from tests.server.models_for_tests import Counted

COUNTED_SPEC = "tests.server.models_for_tests:Counted"
INFERENCE_TOKENS = ("inference-token-one", "inference-token-two")
ADMIN_TOKEN = "admin-token-0123456789"
MISSING = (
    "needs a bearer token: send the metadata 'authorization: Bearer TOKEN' "
    "(over HTTP, the header 'Authorization: Bearer TOKEN')"
)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


INFERENCE = bearer(INFERENCE_TOKENS[0])
ADMIN = bearer(ADMIN_TOKEN)


def repository(root: Path) -> Path:
    """A model repository holding ``counted``, version 1."""
    (root / "counted" / "1").mkdir(parents=True)
    (root / "counted" / "model.toml").write_text(f'source = "{COUNTED_SPEC}"\n')
    return root


def token_file(path: Path, *tokens: str) -> str:
    path.write_text("# tokens, one a line\n\n" + "".join(f"  {t}  \n" for t in tokens))
    return str(path)


@dataclass
class Served:
    thread: LoopThread
    server: Any
    channel: grpc.Channel

    @property
    def v1(self) -> v1_grpc.InferenceServiceStub:
        return v1_grpc.InferenceServiceStub(self.channel)

    @property
    def oip(self) -> pb_grpc.GRPCInferenceServiceStub:
        return pb_grpc.GRPCInferenceServiceStub(self.channel)

    def predict(self, metadata: Sequence[tuple[str, str]] = ()) -> list[float]:
        x = v1.Tensor(
            name="x", data_type=v1.DATA_TYPE_FLOAT32, shape=[2], raw_data=struct.pack("<2f", 1, 2)
        )
        request = v1.PredictRequest(model="counted", inputs=[x])
        response = self.v1.Predict(request, metadata=metadata, timeout=30)
        return list(struct.unpack("<2f", response.outputs[0].raw_data))

    def unload(self, metadata: Sequence[tuple[str, str]] = ()) -> None:
        request = pb.RepositoryModelUnloadRequest(model_name="counted")
        self.oip.RepositoryModelUnload(request, metadata=metadata, timeout=60)

    def load(self, metadata: Sequence[tuple[str, str]] = ()) -> None:
        request = pb.RepositoryModelLoadRequest(model_name="counted")
        self.oip.RepositoryModelLoad(request, metadata=metadata, timeout=60)

    def ready(self) -> bool:
        """Whether ``counted`` is served, as the server's runtime knows it."""
        return bool(self.server.runtime.model_ready("counted"))

    def requests(self, method: str, code: str) -> float:
        """The server's ``protoserve_requests_total`` for ``method`` and ``code``."""
        return counted(self.server, "protoserve_requests_total", method=method, code=code)


@contextlib.contextmanager
def serving(root: Path, *specs: str, **config: Any) -> Iterator[Served]:
    thread, server = start_grpc_server(
        specs, model_repository=str(repository(root / "models")), shutdown_grace=2, **config
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Served(thread, server, channel)
    finally:
        channel.close()
        stop_grpc_server(thread, server)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("auth")
    with serving(
        root,
        auth_token_file=token_file(root / "tokens", *INFERENCE_TOKENS),
        admin_token_file=token_file(root / "admin", ADMIN_TOKEN),
    ) as s:
        yield s


def rpc_error(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def reason(err: grpc.RpcError) -> str:
    """The ``google.rpc.ErrorInfo`` reason the status carries."""
    for key, value in err.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    assert info.domain == "protoserve"
                    return info.reason
    raise AssertionError("no ErrorInfo")


def status(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    return err.code(), err.details()  # type: ignore[attr-defined]


# Without a token.
def test_every_call_without_an_accepted_token_is_unauthenticated_and_no_model_runs(
    served: Served,
) -> None:
    x = pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[1], contents=pb.InferTensorContents(fp32_contents=[1])
    )
    calls = {
        "Predict": lambda md: served.predict(md),
        "Generate": lambda md: served.v1.Generate(
            v1.GenerateRequest(model="counted", inputs="a"), metadata=md, timeout=10
        ),
        "GenerateStream": lambda md: list(
            served.v1.GenerateStream(
                v1.GenerateStreamRequest(model="counted", inputs="a"), metadata=md, timeout=10
            )
        ),
        "ListModels": lambda md: served.v1.ListModels(
            v1.ListModelsRequest(), metadata=md, timeout=10
        ),
        "ModelInfer": lambda md: served.oip.ModelInfer(
            pb.ModelInferRequest(model_name="counted", inputs=[x]), metadata=md, timeout=10
        ),
        "ModelReady": lambda md: served.oip.ModelReady(
            pb.ModelReadyRequest(name="counted"), metadata=md, timeout=10
        ),
        "RepositoryIndex": lambda md: served.oip.RepositoryIndex(
            pb.RepositoryIndexRequest(), metadata=md, timeout=10
        ),
        "RepositoryModelUnload": lambda md: served.unload(md),
    }
    wrong = {
        (): ("TOKEN_MISSING", MISSING),
        (("authorization", "Basic dXNlcjpwYXNz"),): ("TOKEN_MISSING", MISSING),
        (("authorization", "Bearer"),): ("TOKEN_MISSING", MISSING),
        bearer("not-a-token"): ("TOKEN_INVALID", "needs a bearer token; this one is not accepted"),
        # Only the first authorization counts; a token is compared whole.
        (("authorization", "Bearer x"), *INFERENCE): (
            "TOKEN_INVALID",
            "needs a bearer token; this one is not accepted",
        ),
        bearer(INFERENCE_TOKENS[0] + "x"): (
            "TOKEN_INVALID",
            "needs a bearer token; this one is not accepted",
        ),
        bearer(INFERENCE_TOKENS[0][:-1]): (
            "TOKEN_INVALID",
            "needs a bearer token; this one is not accepted",
        ),
    }
    before = Counted.calls
    for name, call in calls.items():
        refused = served.requests(name, "UNAUTHENTICATED")
        for metadata, (why, message) in wrong.items():
            err = rpc_error(call, metadata)
            if name == "RepositoryModelUnload":  # admin tokens exist: it needs one of them
                message = message.replace("a bearer token", "an admin bearer token")
            assert status(err) == (grpc.StatusCode.UNAUTHENTICATED, f"{name} {message}"), metadata
            assert reason(err) == why
        # Each refusal is counted under the method's name, in the call's frame (which
        # ends just after the caller has its answer).
        wait_until(
            lambda: served.requests(name, "UNAUTHENTICATED") == refused + len(wrong),  # noqa: B023
            f"{name}'s refusals counted",
        )
    assert Counted.calls == before  # the model never ran
    assert served.ready()  # and was never unloaded
    assert served.requests("Predict", "OK") == 0


def test_a_method_the_server_lacks_is_unauthenticated_too_without_a_token(served: Served) -> None:
    call = served.channel.unary_unary("/no.such.Service/Method")
    err = rpc_error(call, b"", timeout=10)
    assert status(err) == (grpc.StatusCode.UNAUTHENTICATED, f"Method {MISSING}")
    err = rpc_error(call, b"", metadata=INFERENCE, timeout=10)
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    assert served.requests("Method", "UNAUTHENTICATED") == 0  # not a method: not a label
    # The name is the caller's: the answer echoes 128 characters of it.
    err = rpc_error(served.channel.unary_unary("/x.Y/" + "M" * 300), b"", timeout=10)
    assert status(err) == (grpc.StatusCode.UNAUTHENTICATED, f"{'M' * 128}… {MISSING}")


def test_a_refused_call_is_logged_without_its_token(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rpc_error(served.predict, bearer("wrong-secret-value"))
    rpc_error(served.unload, INFERENCE)
    served.predict(INFERENCE)

    def lines() -> list[tuple[str, str]]:
        return [
            (r.method, r.code)  # type: ignore[attr-defined]
            for r in caplog.records
            if r.name == "protoserve.server.access"
        ]

    expected = [
        ("Predict", "UNAUTHENTICATED"),
        ("RepositoryModelUnload", "PERMISSION_DENIED"),
        ("Predict", "OK"),
    ]
    # A call of the test before may log its line after this one began (the server logs
    # once its status is sent): only the last three are this test's.
    wait_until(lambda: lines()[-3:] == expected, "three access lines")
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for secret in ("wrong-secret-value", *INFERENCE_TOKENS, ADMIN_TOKEN):
        assert secret not in logged


# With an inference token.
def test_an_inference_token_runs_inference_and_is_refused_model_control(served: Served) -> None:
    before = Counted.calls
    for token in INFERENCE_TOKENS:  # every line of the file is a token
        assert served.predict(bearer(token)) == [2.0, 3.0]
    # The scheme is case-insensitive.
    assert served.predict((("authorization", f"bearer {INFERENCE_TOKENS[1]}"),)) == [2.0, 3.0]
    stream = served.v1.GenerateStream(
        v1.GenerateStreamRequest(model="counted", inputs="a"), metadata=INFERENCE, timeout=10
    )
    assert "".join(m.text for m in stream) == "ok"
    assert Counted.calls == before + 4
    for call in (served.unload, served.load):
        err = rpc_error(call, INFERENCE)
        name = "RepositoryModelUnload" if call == served.unload else "RepositoryModelLoad"
        assert status(err) == (
            grpc.StatusCode.PERMISSION_DENIED,
            f"{name} needs an admin token (the server's --admin-token-file); "
            "this token may make inference calls only",
        )
        assert reason(err) == "ADMIN_TOKEN_REQUIRED"
    assert served.ready()
    assert served.predict(INFERENCE) == [2.0, 3.0]


# With the admin token.
def test_the_admin_token_unloads_and_loads_and_runs_inference(served: Served) -> None:
    assert served.predict(ADMIN) == [2.0, 3.0]
    served.unload(ADMIN)
    assert not served.ready()
    err = rpc_error(served.predict, INFERENCE)
    assert err.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    served.load(ADMIN)
    assert served.ready()
    assert served.predict(INFERENCE) == [2.0, 3.0]


# Health and reflection.
def test_health_answers_without_a_token(served: Served) -> None:
    health = health_pb2_grpc.HealthStub(served.channel)
    for service in ("", "models/counted"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    # The protocol's server health too.
    assert served.oip.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert served.oip.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    # What no probe calls and what lists model names needs a token.
    err = rpc_error(served.oip.ModelReady, pb.ModelReadyRequest(name="counted"), timeout=10)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    err = rpc_error(health.List, health_pb2.HealthListRequest(), timeout=10)
    assert status(err) == (grpc.StatusCode.UNAUTHENTICATED, f"List {MISSING}")
    listed = health.List(health_pb2.HealthListRequest(), metadata=INFERENCE, timeout=10)
    assert "models/counted" in listed.statuses


def list_services(channel: grpc.Channel, metadata: Sequence[tuple[str, str]] = ()) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    [answer] = stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10)
    return [s.name for s in answer.list_services_response.service]


def test_reflection_needs_a_token(served: Served) -> None:
    err = rpc_error(list_services, served.channel)
    assert status(err) == (grpc.StatusCode.UNAUTHENTICATED, f"ServerReflectionInfo {MISSING}")
    assert "inference.GRPCInferenceService" in list_services(served.channel, INFERENCE)


def test_public_reflection_and_private_health_are_flags(tmp_path: Path) -> None:
    with serving(
        tmp_path,
        auth_token_file=token_file(tmp_path / "tokens", "t0k3n"),
        public_reflection=True,
        public_health=False,
    ) as s:
        assert "grpc.health.v1.Health" in list_services(s.channel)
        health = health_pb2_grpc.HealthStub(s.channel)
        err = rpc_error(health.Check, health_pb2.HealthCheckRequest(), timeout=10)
        assert status(err) == (grpc.StatusCode.UNAUTHENTICATED, f"Check {MISSING}")
        err = rpc_error(lambda: next(health.Watch(health_pb2.HealthCheckRequest(), timeout=10)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        err = rpc_error(s.oip.ServerLive, pb.ServerLiveRequest(), timeout=10)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        answer = health.Check(health_pb2.HealthCheckRequest(), metadata=bearer("t0k3n"), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


# Model control: off unless there is an admin token or --model-control.
OFF = (
    "model control is off on this server (the default without --admin-token-file, or "
    "--no-model-control): models load at the start only; to load and unload while serving, "
    "start it with --admin-token-file (callers then need an admin token), or --model-control "
    "for local use without tokens"
)


def test_model_control_is_off_by_default_and_says_how_to_turn_it_on(tmp_path: Path) -> None:
    with serving(tmp_path / "open") as s:
        for call in (s.unload, s.load):
            assert status(rpc_error(call)) == (grpc.StatusCode.FAILED_PRECONDITION, OFF)
        assert s.ready()
    # Inference tokens alone do not turn it on either.
    with serving(
        tmp_path / "tokens", auth_token_file=token_file(tmp_path / "tokens.txt", "t0k3n")
    ) as s:
        err = rpc_error(s.unload, bearer("t0k3n"))
        assert status(err) == (grpc.StatusCode.FAILED_PRECONDITION, OFF)
        assert s.ready()


def test_no_model_control_refuses_the_admin_token_too(tmp_path: Path) -> None:
    admin = token_file(tmp_path / "admin", ADMIN_TOKEN)
    with serving(tmp_path, admin_token_file=admin, model_control=False) as s:
        assert status(rpc_error(s.unload, ADMIN)) == (grpc.StatusCode.FAILED_PRECONDITION, OFF)
        assert s.ready()


def test_model_control_flag_lets_any_accepted_caller_without_admin_tokens(tmp_path: Path) -> None:
    with serving(
        tmp_path,
        auth_token_file=token_file(tmp_path / "tokens", "t0k3n"),
        model_control=True,
    ) as s:
        err = rpc_error(s.unload)
        assert status(err) == (grpc.StatusCode.UNAUTHENTICATED, f"RepositoryModelUnload {MISSING}")
        s.unload(bearer("t0k3n"))
        assert not s.ready()


def test_admin_tokens_alone_leave_inference_open_and_guard_model_control(tmp_path: Path) -> None:
    with serving(tmp_path, admin_token_file=token_file(tmp_path / "admin", ADMIN_TOKEN)) as s:
        assert s.predict() == [2.0, 3.0]
        assert s.predict(bearer("anything")) == [2.0, 3.0]  # no token needed: none checked
        err = rpc_error(s.unload)
        assert status(err) == (
            grpc.StatusCode.UNAUTHENTICATED,
            f"RepositoryModelUnload {MISSING.replace('a bearer', 'an admin bearer')}",
        )
        err = rpc_error(s.unload, bearer("anything"))
        assert reason(err) == "TOKEN_INVALID"
        assert s.ready()
        s.unload(ADMIN)
        assert not s.ready()


# The start-up warning.
def started_logs(caplog: pytest.LogCaptureFixture, host: str, **config: Any) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="protoserve.server"):
        thread, server = start_grpc_server(
            ("tests.server.models_for_tests:Doubler",), host=host, **config
        )
        stop_grpc_server(thread, server)
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "protoserve.server" and r.levelno == logging.WARNING
    ]


def test_listening_beyond_loopback_without_tokens_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = token_file(tmp_path / "tokens", "t0k3n")
    assert started_logs(caplog, "0.0.0.0") == [
        "serving gRPC on 0.0.0.0 without authentication: anyone who can reach this port can "
        "call every model; give --auth-token-file (docs/security.md)"
    ]
    assert started_logs(caplog, "127.0.0.1") == []
    assert started_logs(caplog, "0.0.0.0", auth_token_file=tokens) == []
    # Model control says so too, where there is a repository to control.
    assert started_logs(caplog, "0.0.0.0", auth_token_file=tokens, model_control=True) == []
    models = str(repository(tmp_path / "repository"))
    assert started_logs(
        caplog, "0.0.0.0", auth_token_file=tokens, model_control=True, model_repository=models
    ) == [
        "model control is on without --admin-token-file: any caller with an inference token "
        "can load and unload models (docs/security.md)"
    ]
    admin = token_file(tmp_path / "admin", ADMIN_TOKEN)
    assert (
        started_logs(
            caplog,
            "0.0.0.0",
            auth_token_file=tokens,
            admin_token_file=admin,
            model_repository=models,
        )
        == []
    )


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.5.6.7", True),
        ("localhost", True),
        ("[::1]", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("[::]", False),
        ("10.0.0.1", False),
        ("example.com", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# Token files and flags.
def test_token_files_hold_one_token_a_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# a comment\n\n  one  \ntwo\n\ttwo\n# three\n")
    assert read_tokens(str(path), "--auth-token-file") == (b"one", b"two")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "--auth-token-file {path}: cannot read it: No such file or directory"),
        ("", "--auth-token-file {path} holds no token (one a line)"),
        ("# only a comment\n\n", "--auth-token-file {path} holds no token (one a line)"),
        (
            "good\nsecret with spaces\n",
            "--auth-token-file {path}, line 2: a token is printable ASCII without spaces",
        ),
        ("s\u00e9cret\n", "--auth-token-file {path}, line 1: a token is printable ASCII"),
    ],
)
def test_a_bad_token_file_says_why_without_its_tokens(
    tmp_path: Path, text: str | None, message: str
) -> None:
    path = tmp_path / "tokens"
    if text is not None:
        path.write_text(text)
    with pytest.raises(TokenFileError) as info:
        read_tokens(str(path), "--auth-token-file")
    assert str(info.value).startswith(message.format(path=path))
    assert "secret" not in str(info.value) and "cret" not in str(info.value)


def test_an_admin_token_must_not_be_an_inference_token(tmp_path: Path) -> None:
    config = ServerConfig(
        auth_token_file=token_file(tmp_path / "tokens", "shared-one", "other"),
        admin_token_file=token_file(tmp_path / "admin", "shared-one"),
    )
    with pytest.raises(TokenFileError) as info:
        Auth.from_config(config)
    assert str(info.value) == (
        f"--admin-token-file {tmp_path / 'admin'} holds a token of --auth-token-file "
        f"{tmp_path / 'tokens'}: admin tokens must be distinct"
    )


def test_serve_refuses_a_bad_token_file_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    result = subprocess.run(
        [sys.executable, "-m", "protoserve.clients.cli", "serve", "--port", "0"],
        env={"PROTOSERVE_AUTH_TOKEN_FILE": str(missing), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"protoserve serve: --auth-token-file {missing}: cannot read it: "
        "No such file or directory\n"
    )


def parse(argv: list[str], env: dict[str, str]) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser, env)
    return from_arguments(parser.parse_args(argv), env)


def test_auth_flags_and_their_variables() -> None:
    config = parse([], {})
    assert (config.auth_token_file, config.admin_token_file) == (None, None)
    assert (config.public_health, config.public_reflection) == (True, False)
    assert (config.model_control, config.model_control_on) == (None, False)
    env = {
        "PROTOSERVE_AUTH_TOKEN_FILE": "/run/secrets/tokens",
        "PROTOSERVE_ADMIN_TOKEN_FILE": "/run/secrets/admin",
        "PROTOSERVE_PUBLIC_HEALTH": "off",
        "PROTOSERVE_PUBLIC_REFLECTION": "on",
    }
    config = parse([], env)
    assert (config.auth_token_file, config.admin_token_file) == (
        "/run/secrets/tokens",
        "/run/secrets/admin",
    )
    assert (config.public_health, config.public_reflection) == (False, True)
    assert (config.model_control, config.model_control_on) == (None, True)  # an admin token
    config = parse(["--auth-token-file", "/t", "--no-model-control"], env)
    assert (config.auth_token_file, config.model_control_on) == ("/t", False)
    assert parse(["--model-control"], {}).model_control_on is True
    assert parse([], {"PROTOSERVE_MODEL_CONTROL": "on"}).model_control_on is True
    assert parse([], {"PROTOSERVE_AUTH_TOKEN_FILE": ""}).auth_token_file is None


def test_what_each_call_needs() -> None:
    auth = Auth((b"i",), (b"a",))
    oip = "/inference.GRPCInferenceService"
    assert auth.needs(f"{oip}/RepositoryModelUnload") is Access.ADMIN
    assert auth.needs(f"{oip}/RepositoryModelLoad") is Access.ADMIN
    assert auth.needs(f"{oip}/RepositoryIndex") is Access.INFERENCE
    assert auth.needs(f"{oip}/ServerReady") is Access.ANYONE
    assert auth.needs("/grpc.health.v1.Health/Check") is Access.ANYONE
    assert auth.needs("/grpc.health.v1.Health/Watch") is Access.ANYONE
    assert auth.needs("/grpc.health.v1.Health/List") is Access.INFERENCE
    assert auth.needs("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo") is (
        Access.INFERENCE
    )
    assert auth.needs("/protoserve.inference.v1.InferenceService/Generate") is Access.INFERENCE
    # A service whose name ends like a public one is not that one.
    assert auth.needs("/evil.grpc.health.v1.Health/Check") is Access.INFERENCE
    assert Auth().enabled is False and Auth().needs(f"{oip}/RepositoryModelUnload") is (
        Access.ANYONE
    )
    assert "b'i'" not in repr(auth) and "b'a'" not in repr(auth)
