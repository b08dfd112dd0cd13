"""Triton's own clients against real protoserve processes (`nox -s compat`).

The tests here need tritonclient, which cannot share a venv with protoserve
(protobuf < 5 against >= 7). Where it is missing (the main test run) this folder
is left out of collection, silently: `nox -s compat` runs it, with the servers
started from the Python that $PROTOSERVE_COMPAT_PYTHON names.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("tritonclient") is None:
    collect_ignore_glob = ["test_*.py"]

# The rest runs only in the compat venv, where the test modules are collected.
from tests.compat import _processes
from tests.compat._cases import CASES, SPARE, TEXT
from tests.compat._repository import build_repository

#: Folders of perf_analyzer's shared libraries (libcudart.so.12, libb64.so.0d); nox sets it.
LIBRARIES_ENV = "PROTOSERVE_COMPAT_LD_LIBRARY_PATH"


def _wait(check: Callable[[], bool], what: str, server: _processes.Process) -> None:
    """Poll `check` until it holds; fail with the server's log after 90 s."""
    deadline = time.monotonic() + 90
    while True:
        try:
            if check():
                return
        except Exception:  # not answering yet
            pass
        if server.process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} never happened:\n{server.output()}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository: the add/sub models, a spare one and bytelm."""
    folder = tmp_path_factory.mktemp("repository")
    build_repository(folder, [case.model for case in CASES] + [SPARE], text=TEXT)
    return folder


@pytest.fixture(scope="session")
def server(
    tmp_path_factory: pytest.TempPathFactory, model_repository: Path
) -> Iterator[_processes.Process]:
    """`protoserve serve --model-repository`, once every model is ready."""
    import tritonclient.grpc as grpcclient

    started = _processes.start(
        "serve",
        tmp_path_factory.mktemp("server"),
        "--model-repository",
        str(model_repository),
        "--torch-threads",
        "1",
        # The texts of one request decode together and test_text.py compares them
        # with each decoded alone: bit for bit only with batch invariance.
        "--batch-invariant",
        # tritonclient loads and unloads models (test_unload_and_load), without a token.
        "--model-control",
    )
    try:
        client = grpcclient.InferenceServerClient(started.address)
        _wait(client.is_server_ready, "the server's readiness", started)
        client.close()
        yield started
    finally:
        _processes.stop(started)


@pytest.fixture(scope="session")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, server: _processes.Process
) -> Iterator[_processes.Process]:
    """`protoserve gateway` in front of the server."""
    started = _processes.start(
        "gateway", tmp_path_factory.mktemp("gateway"), "--upstream", server.address
    )
    try:
        yield started
    finally:
        _processes.stop(started)


@pytest.fixture
def grpc_client(server: _processes.Process) -> Iterator[Any]:
    """tritonclient.grpc, straight to the server's gRPC port."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.address)
    yield client
    client.close()


@pytest.fixture
def http_client(gateway: _processes.Process) -> Iterator[Any]:
    """tritonclient.http, through the gateway."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(gateway.address)
    yield client
    client.close()


@pytest.fixture(scope="session")
def perf_analyzer() -> tuple[str, dict[str, str]]:
    """The perf_analyzer binary of tritonclient's wheel, and the environment it runs in."""
    binary = Path(sys.prefix) / "bin" / "perf_analyzer"
    if not binary.exists():
        found = shutil.which("perf_analyzer")
        if found is None:
            pytest.fail("perf_analyzer is missing: install tritonclient's manylinux wheel")
        binary = Path(found)
    libraries = os.environ.get(LIBRARIES_ENV, "")
    if not libraries:
        pytest.fail(f"set {LIBRARIES_ENV} to the folders of libcudart.so.12 and libb64.so.0d")
    path = os.pathsep.join(p for p in (libraries, os.environ.get("LD_LIBRARY_PATH", "")) if p)
    return str(binary), {**os.environ, "LD_LIBRARY_PATH": path}
