"""The model repository over a real server: versions, broken folders, load and unload.

Each test builds a repository in ``tmp_path`` and serves it on a port-0 server;
it talks to it as users do: v1 ListModels/GetModel/Predict, the Open Inference
Protocol (ModelInfer with versions, RepositoryIndex, RepositoryModelLoad/Unload)
and the Health service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protoserve.inference.v1 import inference_service_pb2 as v1
from protoserve.inference.v1 import inference_service_pb2_grpc as v1_grpc
from protoserve.oip.v2 import grpc_service_pb2 as pb
from protoserve.oip.v2 import grpc_service_pb2_grpc as pb_grpc
from protoserve.server import InferenceServer, Runtime, TensorInfo
from protoserve.server.app import model_health_name
from protoserve.server.config import add_arguments, from_arguments
from protoserve.server.models.bytelm import BatchedDecoding, load_pretrained
from protoserve.server.runtime.errors import FailedPrecondition
from protoserve.server.runtime.repository import RepositoryError, read_config
from tests._observe import wait_until
from tests._threads import LoopThread, start_grpc_server, stop_grpc_server
from tests.server.repository_models import Held, SlowToLoad
from tests.server.test_decoding import decoding_gauges

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MODELS = "tests.server.models_for_tests"
REPO_MODELS = "tests.server.repository_models"


# Building repositories.
class Scale(torch.nn.Module):
    """y = k * x; each version folder of the tests holds one with its own k."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.register_buffer("k", torch.tensor(float(k)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.k


@pytest.fixture(scope="module")
def scales(tmp_path_factory: pytest.TempPathFactory) -> dict[int, bytes]:
    """torch.export archives of Scale(k) for k = 1, 2, 3, as bytes to copy into folders."""
    folder = tmp_path_factory.mktemp("scales")
    batch = torch.export.Dim("batch", min=1, max=1024)
    found = {}
    for k in (1, 2, 3):
        program = torch.export.export(Scale(k), (torch.ones(2),), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(folder / f"{k}.pt2"))
        found[k] = (folder / f"{k}.pt2").read_bytes()
    return found


def model_folder(
    root: Path,
    name: str,
    toml: str,
    versions: Sequence[int] = (1,),
    files: Mapping[int, Mapping[str, bytes]] | None = None,
) -> Path:
    """``root/name`` with ``model.toml`` and a folder per version (holding ``files[v]``)."""
    path = root / name
    path.mkdir()
    (path / "model.toml").write_text(toml)
    for version in versions:
        add_version(path, version, (files or {}).get(version, {}))
    return path


def add_version(path: Path, version: int, files: Mapping[str, bytes] | None = None) -> None:
    (path / str(version)).mkdir()
    for name, data in (files or {}).items():
        (path / str(version) / name).write_bytes(data)


def scale_folder(root: Path, name: str, scales: dict[int, bytes], versions: str = "") -> Path:
    """A model serving ``model.pt2`` with versions 1, 2, 3 (y = version * x)."""
    toml = 'source = "model.pt2"\n' + (f"versions = {versions}\n" if versions else "")
    files = {k: {"model.pt2": data} for k, data in scales.items()}
    return model_folder(root, name, toml, versions=(1, 2, 3), files=files)


# Talking to the server.
@dataclass
class Server:
    thread: LoopThread
    server: InferenceServer
    channel: grpc.Channel
    v1: v1_grpc.InferenceServiceStub
    oip: pb_grpc.GRPCInferenceServiceStub

    @property
    def runtime(self) -> Runtime:
        return self.server.runtime

    def run(self, coro: Any) -> Any:
        return self.thread.run(coro, timeout=60)

    def listed(self) -> list[tuple[str, str]]:
        """ListModels (v1): (name, version) of each model."""
        response = self.v1.ListModels(v1.ListModelsRequest(), timeout=10)
        return [(m.name, m.version) for m in response.models]

    def index(self, ready: bool = False) -> dict[tuple[str, str], tuple[str, str]]:
        """RepositoryIndex: (name, version) -> (state, reason)."""
        response = self.oip.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready), timeout=10)
        return {(m.name, m.version): (m.state, m.reason) for m in response.models}

    def load(self, name: str) -> None:
        self.oip.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=60)

    def unload(self, name: str) -> None:
        request = pb.RepositoryModelUnloadRequest(model_name=name)
        self.oip.RepositoryModelUnload(request, timeout=60)

    def health(self, name: str = "") -> int:
        service = model_health_name(name) if name else ""
        request = health_pb2.HealthCheckRequest(service=service)
        return int(health_pb2_grpc.HealthStub(self.channel).Check(request, timeout=10).status)

    def ready(self, name: str, version: str = "") -> bool:
        request = pb.ModelReadyRequest(name=name, version=version)
        return bool(self.oip.ModelReady(request, timeout=10).ready)

    def infer(self, model: str, values: Sequence[float], version: str = "") -> list[float]:
        """ModelInfer with one FP32 input ``x``; the first output's values."""
        tensor = pb.ModelInferRequest.InferInputTensor(
            name="x",
            datatype="FP32",
            shape=[len(values)],
            contents=pb.InferTensorContents(fp32_contents=values),
        )
        request = pb.ModelInferRequest(model_name=model, model_version=version, inputs=[tensor])
        response = self.oip.ModelInfer(request, timeout=60)
        data = response.raw_output_contents[0]
        return list(struct.unpack(f"<{len(data) // 4}f", data))

    def predict(self, model: str, values: Sequence[float]) -> list[float]:
        """v1 Predict with one float32 input ``x``; the first output's values."""
        x = v1.Tensor(
            name="x",
            data_type=v1.DATA_TYPE_FLOAT32,
            shape=[len(values)],
            raw_data=struct.pack(f"<{len(values)}f", *values),
        )
        response = self.v1.Predict(v1.PredictRequest(model=model, inputs=[x]), timeout=60)
        data = response.outputs[0].raw_data
        return list(struct.unpack(f"<{len(data) // 4}f", data))


@contextlib.contextmanager
def serving(root: Path, *specs: str, **config: Any) -> Iterator[Server]:
    config.setdefault("shutdown_grace", 5)
    # Load and unload without tokens, as on a developer's machine (tests/server/test_auth.py
    # has them with tokens, and refused by default).
    config.setdefault("model_control", True)
    thread, server = start_grpc_server(specs, model_repository=str(root), **config)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Server(
            thread,
            server,
            channel,
            v1_grpc.InferenceServiceStub(channel),
            pb_grpc.GRPCInferenceServiceStub(channel),
        )
    finally:
        channel.close()
        stop_grpc_server(thread, server)


def error(call: Callable[..., Any], *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return info.value


def code(err: grpc.RpcError) -> grpc.StatusCode:
    return err.code()  # type: ignore[attr-defined,no-any-return]


def details(err: grpc.RpcError) -> str:
    return err.details() or ""  # type: ignore[attr-defined,no-any-return]


# Versions.
def test_latest_all_and_listed_versions_are_served_and_requests_pick_theirs(
    scales: dict[int, bytes], tmp_path: Path
) -> None:
    scale_folder(tmp_path, "latest", scales)
    scale_folder(tmp_path, "every", scales, versions='"all"')
    scale_folder(tmp_path, "some", scales, versions="[3, 1]")
    with serving(tmp_path) as s:
        # v1 sees each model once, at the version a request naming none gets.
        assert s.listed() == [("every", "3"), ("latest", "3"), ("some", "3")]
        got = s.v1.GetModel(v1.GetModelRequest(name="every"), timeout=10).model
        assert (got.version, got.state) == ("3", v1.MODEL_STATE_READY)
        assert s.predict("every", [1, 2]) == [3, 6]
        for name, versions in (("latest", ["3"]), ("every", ["1", "2", "3"]), ("some", ["1", "3"])):
            metadata = s.oip.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=10)
            assert list(metadata.versions) == versions
            for version in versions:
                assert s.infer(name, [1, 2], version) == [int(version), 2 * int(version)]
                assert s.ready(name, version)
        assert s.infer("every", [1, 2]) == [3, 6]
        for name, version in (("latest", "1"), ("some", "2")):
            assert not s.ready(name, version)
            err = error(s.infer, name, [1.0], version)
            assert code(err) == grpc.StatusCode.NOT_FOUND
            assert f"has no version '{version}'" in details(err)
        index = s.index()
        assert index == {
            ("every", "1"): ("READY", ""),
            ("every", "2"): ("READY", ""),
            ("every", "3"): ("READY", ""),
            ("latest", "3"): ("READY", ""),
            ("some", "1"): ("READY", ""),
            ("some", "3"): ("READY", ""),
        }
        assert s.health() == SERVING and s.health("every") == SERVING


def test_a_folder_may_name_its_model_and_set_its_own_batching(tmp_path: Path) -> None:
    model_folder(
        tmp_path,
        "folder-a",
        f'name = "small-batches"\nsource = "{REPO_MODELS}:RowTripler"\n'
        "[batching]\nmax_batch_size = 4\nmax_batch_delay_ms = 5\n",
    )
    model_folder(
        tmp_path,
        "unbatched",
        f'source = "{REPO_MODELS}:RowTripler"\n[batching]\nenabled = false\n',
    )
    model_folder(tmp_path, "server-default", f'source = "{REPO_MODELS}:RowTripler"\n')
    with serving(tmp_path, max_batch_size=16) as s:
        assert [name for name, _ in s.listed()] == ["server-default", "small-batches", "unbatched"]

        def config(name: str) -> pb.ModelConfig:
            return s.oip.ModelConfig(pb.ModelConfigRequest(name=name), timeout=10).config

        small = config("small-batches")
        assert small.max_batch_size == 4
        assert small.dynamic_batching.max_queue_delay_microseconds == 5000
        assert config("server-default").max_batch_size == 16
        unbatched = config("unbatched")
        assert unbatched.max_batch_size == 0 and not unbatched.HasField("dynamic_batching")


def test_a_folder_may_ask_for_batch_invariance(tmp_path: Path) -> None:
    model_folder(tmp_path, "exact", 'source = "bytelm"\n[batching]\nbatch_invariant = true\n')
    model_folder(tmp_path, "rounded", 'source = "bytelm"\n')
    exact_here = BatchedDecoding(load_pretrained(), 4, exact=True).batched
    # GetModel's decoding and ModelConfig's "decoding" parameter say the same.
    words = {
        "DECODING_BATCHED": "batched",
        "DECODING_BATCHED_EXACT": "batched-exact",
        "DECODING_SEQUENTIAL": "sequential",
    }
    with serving(tmp_path, max_active=4, metrics_port=0) as s:

        def decoding(name: str) -> str:
            model = s.v1.GetModel(v1.GetModelRequest(name=name), timeout=10).model
            config = s.oip.ModelConfig(pb.ModelConfigRequest(name=name), timeout=10).config
            found = v1.Decoding.Name(model.decoding)
            assert config.parameters["decoding"].string_value == words[found]
            return found

        assert decoding("rounded") == "DECODING_BATCHED"  # the server's setting
        assert decoding("exact") == (
            "DECODING_BATCHED_EXACT" if exact_here else "DECODING_SEQUENTIAL"
        )
        assert decoding_gauges(s.server.metrics_port)[("rounded", "batched")] == 1.0
        # An unloaded model decodes nothing: /metrics stops saying it does.
        s.unload("exact")
        gauges = decoding_gauges(s.server.metrics_port)
        assert [v for (model, _), v in gauges.items() if model == "exact"] == [0.0] * 3
        assert gauges[("rounded", "batched")] == 1.0


# Broken folders.
BROKEN = {
    # folder: (model.toml or None for none, version folders, the reason's telling part)
    "bad-toml": ('source = "bytelm', (1,), "model.toml is not valid TOML"),
    "typo": ('source = "bytelm"\nversion = "all"\n', (1,), "unknown key version"),
    "no-file": ('source = "model.pt2"\n', (1,), "version 1: model.pt2 is missing"),
    "no-module": ('source = "no.such.module:Model"\n', (1,), "cannot import 'no.such.module'"),
    "no-versions": ('source = "bytelm"\n', (), "no version folder"),
    "missing-version": ('source = "bytelm"\nversions = [1, 2]\n', (1,), "no folder for version 2"),
    "no-config": (None, (1,), "model.toml is missing"),
    "zero-instances": ('source = "bytelm"\ninstances = 0\n', (1,), "instances: must be"),
    "bad-devices": ('source = "bytelm"\ndevices = ["gpu"]\n', (1,), "devices: each must be"),
    "needs-arguments": (
        f'source = "{REPO_MODELS}:NeedsArguments"\n',
        (1,),
        "failed: TypeError",
    ),
    "fails-to-load": (
        f'source = "{MODELS}:FailsToLoad"\n',
        (1,),
        "failed to load: OSError: weights missing",
    ),
    "bad-warmup": (
        f'source = "{REPO_MODELS}:NoNegatives"\n'
        '[warmup.inputs.x]\ndtype = "float32"\nshape = [2]\ndata = [1, -1]\n',
        (1,),
        "failed to load: ValueError: negative input",
    ),
    "warmup-text-for-tensors": (
        f'source = "{MODELS}:Doubler"\n[warmup]\ntext = "hello"\n',
        (1,),
        "neither generates nor embeds",
    ),
    # Declared tensors are checked against the model built from a class.
    "tensors-for-text": (
        'source = "bytelm"\n[inputs.x]\ndtype = "float32"\nshape = [-1]\n',
        (1,),
        "inputs: ByteLMModel does not predict",
    ),
    "batches-undeclared": (
        f'source = "{REPO_MODELS}:NoNegatives"\n[batching]\npredict_batches = true\n',
        (1,),
        "batching.predict_batches: needs declared inputs",
    ),
    "class-batches-fixed-rows": (
        f'source = "{REPO_MODELS}:RowTripler"\n[inputs.x]\ndtype = "float32"\nshape = [4, 2]\n',
        (1,),
        "batching.predict_batches (the model's class sets it): inputs.x.shape is [4, 2]",
    ),
}


def test_broken_folders_are_skipped_with_their_reasons_and_the_rest_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_folder(
        tmp_path,
        "good",
        f'source = "{MODELS}:Doubler"\n[warmup.inputs.x]\ndtype = "float32"\nshape = [3]\n',
    )
    for name, (toml, versions, _) in BROKEN.items():
        if toml is None:
            (tmp_path / name / "1").mkdir(parents=True)
        else:
            model_folder(tmp_path, name, toml, versions)
    caplog.set_level(logging.ERROR, logger="protoserve.server")
    with serving(tmp_path) as s:
        # The server starts and is ready: broken folders do not hold it down.
        assert s.runtime.ready and s.health() == SERVING
        assert s.listed() == [("good", "1")]
        assert s.predict("good", [1, 2]) == [2, 4]
        index = s.index()
        assert index[("good", "1")] == ("READY", "")
        for name, (_, _, reason) in BROKEN.items():
            rows = {v: row for (n, v), row in index.items() if n == name}
            assert rows, f"{name} is not in the index"
            for state, why in rows.values():
                assert state == "UNAVAILABLE" and reason in why, (name, why)
        assert s.index(ready=True) == {("good", "1"): ("READY", "")}
        # Every broken folder is named, with its reason, on an ERROR line of its own.
        lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        for name, (_, _, reason) in BROKEN.items():
            assert any(f"folder {name!r}" in line and reason in line for line in lines), name
        # A broken model is not ready, and says why when asked for.
        assert s.health("fails-to-load") == NOT_SERVING
        assert not s.ready("fails-to-load")
        err = error(s.v1.GetModel, v1.GetModelRequest(name="fails-to-load"))
        assert code(err) == grpc.StatusCode.NOT_FOUND
        assert "is not loaded: failed to load: OSError: weights missing" in details(err)


# Loading and unloading.
def test_unload_and_load_change_list_models_readiness_and_health(tmp_path: Path) -> None:
    model_folder(tmp_path, "doubler", f'source = "{MODELS}:Doubler"\n')
    with serving(tmp_path, f"{MODELS}:Scripted") as s:
        assert s.listed() == [("scripted", "1"), ("doubler", "1")]
        assert s.ready("doubler") and s.health("doubler") == SERVING
        s.unload("doubler")
        assert s.listed() == [("scripted", "1")]
        assert not s.ready("doubler")
        assert s.health("doubler") == NOT_SERVING
        assert s.health() == SERVING  # what is left is ready
        err = error(s.predict, "doubler", [1.0])
        assert code(err) == grpc.StatusCode.NOT_FOUND
        assert "is not loaded: unloaded" in details(err)
        assert s.index() == {("doubler", "1"): ("UNAVAILABLE", "unloaded")}
        s.unload("doubler")  # unloading what is not loaded does nothing
        s.load("doubler")
        assert s.listed() == [("scripted", "1"), ("doubler", "1")]
        assert s.predict("doubler", [1, 2]) == [2, 4]
        assert s.ready("doubler") and s.health("doubler") == SERVING
        assert s.index() == {("doubler", "1"): ("READY", "")}


def test_a_folder_added_while_serving_is_indexed_and_loads(tmp_path: Path) -> None:
    with serving(tmp_path) as s:
        assert s.listed() == [] and s.health() == SERVING
        model_folder(tmp_path, "late", f'source = "{MODELS}:Doubler"\n')
        assert s.index() == {("late", "1"): ("UNAVAILABLE", "not loaded")}
        s.load("late")
        assert s.listed() == [("late", "1")]
        assert s.infer("late", [3]) == [6]


def test_reload_picks_up_a_new_version_and_a_fixed_config_and_keeps_metrics(
    scales: dict[int, bytes], tmp_path: Path
) -> None:
    path = model_folder(
        tmp_path, "scale", 'source = "model.pt2"\n', (1,), {1: {"model.pt2": scales[1]}}
    )
    model_folder(tmp_path, "typo", f'source = "{MODELS}:Doubler"\nbatchin = 1\n')
    with serving(tmp_path, metrics_port=0) as s:
        assert s.listed() == [("scale", "1")]
        add_version(path, 2, {"model.pt2": scales[2]})
        assert s.infer("scale", [1, 2]) == [1, 2]  # nothing changes until asked to
        s.load("scale")
        assert s.listed() == [("scale", "2")]
        assert s.infer("scale", [1, 2]) == [2, 4]
        index = s.index()
        assert index[("scale", "2")] == ("READY", "") and ("scale", "1") not in index

        # A reload that fails leaves the version serving before.
        good = (path / "model.toml").read_text()
        (path / "model.toml").write_text("source = 'model.pt2'\nsorce = 1\n")
        err = error(s.load, "scale")
        assert code(err) == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown key sorce" in details(err)
        (path / "model.toml").write_text(f'source = "{MODELS}:FailsToLoad"\n')
        err = error(s.load, "scale")
        assert code(err) == grpc.StatusCode.UNAVAILABLE
        assert "version 2 failed to load: OSError: weights missing" in details(err)
        assert s.infer("scale", [1, 2]) == [2, 4]
        assert s.index()[("scale", "2")] == ("READY", "")
        (path / "model.toml").write_text(good)

        # A fixed config loads.
        assert "unknown key batchin" in s.index()[("typo", "")][1]
        (tmp_path / "typo" / "model.toml").write_text(f'source = "{MODELS}:Doubler"\n')
        s.load("typo")
        assert s.infer("typo", [1]) == [2]

        # Metrics kept counting through the reloads, one series per model name.
        text = httpx.get(f"http://127.0.0.1:{s.server.metrics_port}/metrics", timeout=10).text
        assert 'protoserve_queue_depth{model="scale"} 0.0' in text
        assert text.count('protoserve_queue_depth{model="scale"}') == 1
        assert 'protoserve_requests_total{code="OK",method="ModelInfer"}' in text


def test_unload_waits_for_a_request_in_flight(tmp_path: Path) -> None:
    Held.entered.clear()
    Held.release.set()  # its warm-up goes through
    model_folder(tmp_path, "held", f'source = "{REPO_MODELS}:Held"\n')
    with serving(tmp_path) as s, ThreadPoolExecutor(2) as pool:
        Held.release.clear()
        Held.entered.clear()
        call = pool.submit(s.infer, "held", [1, 2])
        assert Held.entered.wait(20)
        unloading: Future[None] = pool.submit(s.unload, "held")
        # It leaves service at once: not listed, new requests refused ...
        wait_until(lambda: s.listed() == [], "held out of service")
        assert s.index() == {("held", "1"): ("UNLOADING", "finishing its requests")}
        assert code(error(s.infer, "held", [1.0])) == grpc.StatusCode.NOT_FOUND
        # ... but the request in flight finishes, and only then is it unloaded.
        assert not unloading.done()
        Held.release.set()
        assert call.result(20) == [2, 3]
        unloading.result(20)
        assert s.index() == {("held", "1"): ("UNAVAILABLE", "unloaded")}


def test_a_reload_serves_the_old_version_meanwhile_and_an_unload_waits_its_turn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="protoserve.server")
    SlowToLoad.release.set()
    model_folder(tmp_path, "slow", f'source = "{REPO_MODELS}:SlowToLoad"\n')
    with serving(tmp_path) as s, ThreadPoolExecutor(2) as pool:
        SlowToLoad.release.clear()
        SlowToLoad.loading.clear()
        reloading = pool.submit(s.load, "slow")
        assert SlowToLoad.loading.wait(20)
        # While the new one loads, the old one serves and the server stays ready.
        assert s.infer("slow", [5]) == [5]
        assert s.health() == SERVING and s.health("slow") == SERVING
        assert s.index() == {("slow", "1"): ("READY", "")}
        unloading = pool.submit(s.unload, "slow")
        waits = "model slow: the unload waits for the load or unload under way"
        wait_until(
            lambda: any(r.getMessage() == waits for r in caplog.records),
            "the unload reached the server",
        )
        assert not unloading.done()
        SlowToLoad.release.set()
        reloading.result(20)
        unloading.result(20)
        # One after the other: the unload came last, so the model is unloaded.
        assert s.listed() == []
        assert s.index() == {("slow", "1"): ("UNAVAILABLE", "unloaded")}


def test_load_and_unload_errors_have_the_right_codes(tmp_path: Path) -> None:
    model_folder(tmp_path, "typo", 'source = "bytelm"\nverions = "all"\n')
    model_folder(tmp_path, "broken", f'source = "{MODELS}:FailsToLoad"\n')
    with serving(tmp_path, f"{MODELS}:Doubler") as s:
        cases = [
            (s.load, "nope", grpc.StatusCode.NOT_FOUND, "not in the model repository"),
            (s.unload, "nope", grpc.StatusCode.NOT_FOUND, "not in the model repository"),
            (s.load, "typo", grpc.StatusCode.INVALID_ARGUMENT, "unknown key verions"),
            (s.load, "broken", grpc.StatusCode.UNAVAILABLE, "OSError: weights missing"),
            (s.load, "doubler", grpc.StatusCode.FAILED_PRECONDITION, "given with --model"),
            (s.unload, "doubler", grpc.StatusCode.FAILED_PRECONDITION, "given with --model"),
        ]
        for call, name, want, message in cases:
            err = error(call, name)
            assert (code(err), message in details(err)) == (want, True), (name, details(err))
        assert s.predict("doubler", [1]) == [2]


def test_model_control_off_refuses_load_and_unload(tmp_path: Path) -> None:
    model_folder(tmp_path, "doubler", f'source = "{MODELS}:Doubler"\n')
    with serving(tmp_path, model_control=False) as s:
        for call in (s.load, s.unload):
            err = error(call, "doubler")
            assert code(err) == grpc.StatusCode.FAILED_PRECONDITION
            assert "--no-model-control" in details(err)
        assert s.index() == {("doubler", "1"): ("READY", "")}
        assert s.predict("doubler", [1]) == [2]


def test_without_a_repository_the_repository_calls_are_failed_precondition() -> None:
    async def calls() -> list[str]:
        runtime = Runtime([])
        messages = []
        for call in (runtime.load_model("x"), runtime.unload_model("x")):
            with pytest.raises(FailedPrecondition) as info:
                await call
            messages.append(info.value.message)
        with pytest.raises(FailedPrecondition):
            runtime.repository_index()
        return messages

    assert all("--model-repository" in m for m in asyncio.run(calls()))


# model.toml, checked.
@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("", "source: missing"),
        ('source = "what"', "source: cannot tell what 'what' is"),
        ('source = "bytelm"\nversions = "newest"', "versions: must be 'latest', 'all' or a list"),
        ('source = "bytelm"\nversions = []', "versions: must be"),
        ('source = "bytelm"\nversions = [0]', "versions: must be"),
        ('source = "bytelm"\nname = "bad name"', "name: model name 'bad name' must be"),
        ('source = "bytelm"\n[batching]\nmax_batch_size = true', "batching.max_batch_size"),
        ('source = "bytelm"\n[batching]\nsize = 4', "unknown key batching.size"),
        ('source = "bytelm"\n[batching]\nenabled = "yes"', "batching.enabled: must be true"),
        ('source = "bytelm"\n[batching]\nmax_batch_delay_ms = -1', "batching.max_batch_delay_ms"),
        ('source = "bytelm"\n[batching]\nbatch_invariant = 1', "batching.batch_invariant: must be"),
        ('source = "bytelm"\n[warmup]', "warmup: needs text, or inputs"),
        ('source = "bytelm"\n[warmup]\ntext = 3', "warmup.text: must be a string"),
        (
            'source = "bytelm"\n[warmup.inputs.x]\ndtype = "float99"\nshape = [1]',
            "warmup.inputs.x.dtype: must be one of",
        ),
        (
            'source = "bytelm"\n[warmup.inputs.x]\ndtype = "int64"\nshape = [2]\ndata = [1]',
            "warmup.inputs.x.data: holds 1 values; shape [2] needs 2",
        ),
        (
            'source = "bytelm"\n[warmup.inputs.x]\ndtype = "int64"\nshap = [2]',
            "unknown key warmup.inputs.x.shap",
        ),
    ],
)
def test_model_toml_mistakes_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    path = model_folder(tmp_path, "m", toml)
    with pytest.raises(RepositoryError, match=message.replace("[", r"\[").replace("(", r"\(")):
        read_config(path)


X = '[inputs.x]\ndtype = "float32"\nshape = [-1, 2]\n'
Y = '[outputs.y]\ndtype = "float32"\nshape = [-1, 2]\n'
ROWS = "[batching]\npredict_batches = true\n"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("inputs = 3\n", "inputs: must be a table"),
        ("[inputs]\n", "inputs: needs one table per tensor, such as [inputs.x]"),
        ("[inputs]\nx = 3\n", "inputs.x: must be a table"),
        ('[inputs.x]\ndtype = "float99"\nshape = [1]\n', "inputs.x.dtype: must be one of bool"),
        ("[inputs.x]\ndtype = [1]\nshape = [1]\n", "inputs.x.dtype: must be one of"),
        ("[inputs.x]\nshape = [1]\n", "inputs.x.dtype: must be one of"),
        ('[outputs.y]\ndtype = "int64"\n', "outputs.y.shape: must be a list of sizes"),
        ('[outputs.y]\ndtype = "int64"\nshape = "8"\n', "outputs.y.shape: must be a list"),
        ('[outputs.y]\ndtype = "int64"\nshape = [0]\n', "outputs.y.shape: must be a list"),
        ('[outputs.y]\ndtype = "int64"\nshape = [-2]\n', "outputs.y.shape: must be a list"),
        ('[outputs.y]\ndtype = "int64"\nshape = [1.5]\n', "outputs.y.shape: must be a list"),
        (
            '[outputs.y]\ndtype = "int64"\nshape = [-1]\ndescription = 3\n',
            "outputs.y.description: must be a string",
        ),
        (
            '[outputs.y]\ndtype = "int64"\nshape = [-1]\nsize = 3\n',
            "unknown key outputs.y.size; known keys: outputs.y.description, outputs.y.dtype",
        ),
        ('[inputs.""]\ndtype = "int64"\nshape = [-1]\n', "inputs.: a tensor needs a name"),
        ("[batching]\npredict_batches = 1\n", "batching.predict_batches: must be true or false"),
        (ROWS, "batching.predict_batches: needs declared inputs ([inputs.NAME] tables)"),
        (ROWS + X, "batching.predict_batches: needs declared outputs ([outputs.NAME] tables)"),
        (
            ROWS + X.replace("-1, 2", "4, 2") + Y,
            "batching.predict_batches: inputs.x.shape is [4, 2]; its first dimension must be -1",
        ),
        (ROWS + X + Y.replace("[-1, 2]", "[]"), "batching.predict_batches: outputs.y.shape is []"),
        (
            X + '[warmup.inputs.z]\ndtype = "float32"\nshape = [1, 2]\n',
            "warmup.inputs.z: not a declared input; inputs are ['x']",
        ),
        (
            X + '[warmup.inputs.x]\ndtype = "float64"\nshape = [1, 2]\n',
            "warmup.inputs.x.dtype: the input is declared float32",
        ),
        (
            X + '[warmup.inputs.x]\ndtype = "float32"\nshape = [2]\n',
            "warmup.inputs.x.shape: [2] does not fit the declared [-1, 2]",
        ),
        (
            X + X.replace(".x]", ".w]") + '[warmup.inputs.x]\ndtype = "float32"\nshape = [1, 2]\n',
            "warmup.inputs: missing the declared input 'w'",
        ),
    ],
)
def test_declared_tensor_mistakes_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    path = model_folder(
        tmp_path, "m", 'source = "model.pt"\n' + toml, files={1: {"model.pt": b"stand-in"}}
    )
    with pytest.raises(RepositoryError, match=re.escape(message)):
        read_config(path)


def test_declared_tensors_are_read_in_file_order(tmp_path: Path) -> None:
    path = model_folder(
        tmp_path,
        "m",
        'source = "model.pt"\n'
        + ROWS
        + '[inputs.z]\ndtype = "int64"\nshape = [-1]\ndescription = "Token ids."\n'
        + X
        + Y
        + '[warmup.inputs.z]\ndtype = "int64"\nshape = [1]\n'
        + '[warmup.inputs.x]\ndtype = "float32"\nshape = [1, 2]\n',
        files={1: {"model.pt": b"stand-in"}},
    )
    config = read_config(path)
    assert config.inputs == (
        TensorInfo("z", "int64", (-1,), "Token ids."),
        TensorInfo("x", "float32", (-1, 2)),
    )
    assert config.outputs == (TensorInfo("y", "float32", (-1, 2)),)
    assert config.batching.predict_batches is True
    # Left out, nothing is declared and the model's class decides.
    plain = model_folder(tmp_path, "plain", 'source = "bytelm"\n')
    config = read_config(plain)
    assert (config.inputs, config.outputs, config.batching.predict_batches) == ((), (), None)


def test_two_folders_naming_one_model_are_both_broken(tmp_path: Path) -> None:
    model_folder(tmp_path, "a", 'name = "same"\nsource = "bytelm"\n')
    model_folder(tmp_path, "b", 'name = "same"\nsource = "bytelm"\n')
    with serving(tmp_path) as s:
        assert s.listed() == []
        assert s.index() == {
            ("same", ""): ("UNAVAILABLE", "folders 'a' and 'b' are both named 'same'")
        }


# The command line.
def test_a_repository_alone_serves_no_builtin_model_and_is_set_by_flag_or_environment(
    tmp_path: Path,
) -> None:
    def parse(argv: list[str], env: dict[str, str]) -> Any:
        parser = argparse.ArgumentParser()
        add_arguments(parser, env)
        return from_arguments(parser.parse_args(argv), env)

    config = parse(["--model-repository", str(tmp_path)], {})
    assert (config.model_repository, config.models, config.model_control_on) == (
        str(tmp_path),
        (),
        False,  # without --admin-token-file, unless --model-control (test_auth.py)
    )
    env = {"PROTOSERVE_MODEL_REPOSITORY": "/models", "PROTOSERVE_MODEL_CONTROL": "off"}
    config = parse(["--model", "bytelm"], env)
    assert (config.model_repository, config.models, config.model_control) == (
        "/models",
        ("bytelm",),
        False,
    )
    assert parse([], {}).model_repository is None


def test_serve_refuses_a_repository_that_is_not_a_folder(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "protoserve.clients.cli",
            "serve",
            "--model-repository",
            str(missing),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert f"model repository {str(missing)!r} is not a folder" in result.stderr
