"""Devices and dtypes per model: where each model runs, what it computes in, how it is said.

Everything here runs on the CPU; the tests marked ``gpu`` need CUDA and skip without it.
Floats are compared with tolerances: the CPU's kernels round differently on other machines.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from protoserve.oip.v2 import grpc_service_pb2 as oip_pb
from protoserve.oip.v2 import grpc_service_pb2_grpc as oip_grpc
from protoserve.server.config import add_arguments, from_arguments
from protoserve.server.metrics import Metrics
from protoserve.server.models import bytelm
from protoserve.server.oip.signatures import model_config
from protoserve.server.runtime import devices
from protoserve.server.runtime.devices import DeviceError, place, resolve_device, resolve_dtype
from protoserve.server.runtime.loader import load_model_spec
from protoserve.server.runtime.registry import ModelEntry, ModelState
from protoserve.server.runtime.tensors import RawTensor, to_raw
from tests._threads import start_grpc_server, stop_grpc_server
from tests.server._runtime import run, started
from tests.server.models_for_tests import Doubler, PlacedDoubler
from tests.server.test_repository import model_folder

HAS_CUDA = torch.cuda.is_available()
no_cuda = pytest.mark.skipif(HAS_CUDA, reason="checks what happens where torch sees no CUDA")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; torch sees none here")
MODELS = "tests.server.models_for_tests"


def config(argv: list[str], env: dict[str, str] | None = None) -> Any:
    parser = argparse.ArgumentParser()
    add_arguments(parser, env or {})
    return from_arguments(parser.parse_args(argv), env or {})


def floats(raw: RawTensor) -> torch.Tensor:
    assert raw.dtype == "float32"
    return torch.frombuffer(bytearray(raw.data), dtype=torch.float32).reshape(raw.shape)


# The settings.
def test_device_and_dtype_flags_and_environment() -> None:
    assert (config([]).device, config([]).dtype) == ("auto", "float32")
    got = config(["--device", "cuda:1", "--dtype", "bfloat16"])
    assert (got.device, got.dtype) == ("cuda:1", "bfloat16")
    env = {"PROTOSERVE_DEVICE": "cpu", "PROTOSERVE_DTYPE": "float16"}
    assert (config([], env).device, config([], env).dtype) == ("cpu", "float16")
    assert config(["--dtype", "float32"], env).dtype == "float32"  # the flag wins
    with pytest.raises(SystemExit):
        config(["--dtype", "float64"])
    with pytest.raises(SystemExit):
        config([], {"PROTOSERVE_DTYPE": "int8"})


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CPU", "cuda:0:1", ""])
def test_a_malformed_device_is_refused(name: str) -> None:
    with pytest.raises(DeviceError, match="is not one of auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_dtypes_by_name() -> None:
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(DeviceError, match="float64"):
        resolve_dtype("float64")
    with pytest.raises(DeviceError):
        resolve_dtype(torch.int8)


@no_cuda
def test_auto_is_the_cpu_without_cuda_and_cuda_is_an_error() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(DeviceError, match=rf"device '{name}': .*; use cpu or auto"):
            resolve_device(name)


def test_cuda_devices_are_resolved_by_index(monkeypatch: pytest.MonkeyPatch) -> None:
    # One GPU, as torch would see it: no CUDA call is made to resolve a name.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=r"'cuda:3' does not exist: .* 1 CUDA device \(cuda:0\)"):
        resolve_device("cuda:3")


def test_auto_moves_only_models_that_follow_their_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """A class of yours may ignore ``self.device``: ``auto`` leaves it on the CPU (its
    inputs would otherwise reach a GPU its weights are not on); a device named moves it."""
    from protoserve.server.models.builtin import ByteLMModel

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert place(Doubler(), "auto", "float32")[0] == torch.device("cpu")
    assert place(ByteLMModel(), "auto", "float32")[0] == torch.device("cuda", 0)
    assert place(Doubler(), "cuda", "float32")[0] == torch.device("cuda", 0)


def test_the_model_s_own_setting_wins_over_the_server_s() -> None:
    model = PlacedDoubler()  # its class says bfloat16
    assert place(model, "auto", "float32") == (torch.device("cpu"), torch.bfloat16)
    assert (model.device, model.dtype) == (torch.device("cpu"), torch.bfloat16)
    plain = Doubler()
    assert place(plain, "cpu", "float16") == (torch.device("cpu"), torch.float16)


# Models on their device, in their dtype.
def test_explicit_cpu_and_auto_place_bytelm_on_the_cpu() -> None:
    settings = [{"device": "cpu"}] + ([] if HAS_CUDA else [{}])  # auto is the CPU here

    async def main(settings: dict[str, str]) -> None:
        async with started(load_model_spec("bytelm"), **settings) as runtime:
            entry = runtime.get_model("bytelm")
            assert entry.state is ModelState.READY
            assert (entry.device_name, entry.dtype_name) == ("cpu", "float32")
            model = cast(Any, entry.model).model
            assert {(p.device.type, p.dtype) for p in model.parameters()} == {
                ("cpu", torch.float32)
            }

    for one in settings:
        run(main(one))


def test_float32_by_default_generates_what_the_model_gives_alone() -> None:
    alone = bytelm.load_pretrained()
    want = list(
        bytelm.generate_tokens(
            alone, bytelm.encode("def "), max_new_tokens=12, temperature=0, top_k=0, top_p=1, seed=0
        )
    )

    async def main() -> list[int]:
        async with started(load_model_spec("bytelm"), device="cpu") as runtime:
            result = await runtime.generate(
                "bytelm", "def ", {"max_new_tokens": 12, "temperature": 0.0}
            )
            return result.token_ids

    assert run(main()) == want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bytelm_in_16_bits_generates_and_embeds(dtype: torch.dtype) -> None:
    name = str(dtype).removeprefix("torch.")

    async def main() -> None:
        async with started(load_model_spec("bytelm"), device="cpu", dtype=name) as runtime:
            entry = runtime.get_model("bytelm")
            assert entry.dtype_name == name
            model = cast(Any, entry.model).model
            assert {p.dtype for p in model.parameters()} == {dtype}
            result = await runtime.generate(
                "bytelm", "def ", {"max_new_tokens": 8, "temperature": 0.0, "seed": 1}
            )
            assert 1 <= len(result.token_ids) <= 8
            assert all(0 <= t < 256 for t in result.token_ids)
            sampled = await runtime.generate(
                "bytelm", "import ", {"max_new_tokens": 8, "temperature": 0.8, "seed": 3}
            )
            assert sampled.usage.completion_tokens >= 1
            vectors, _ = await runtime.embed("bytelm", ["hello", "x" * 900])
            assert vectors.dtype == torch.float32 and vectors.shape == (2, 256)
            assert torch.isfinite(vectors).all()
            # The 16-bit model embeds as the float32 one does, to its rounding.
            reference = bytelm.embed(bytelm.load_pretrained(), [bytelm.encode("hello")])
            cosine = torch.nn.functional.cosine_similarity(vectors[:1], reference)
            assert float(cosine) > 0.98

    run(main())


def test_a_16_bit_batched_step_is_held_to_its_dtype_s_rounding() -> None:
    assert bytelm.rounding_tolerance(torch.float32) == bytelm.ROUNDING_TOLERANCE
    assert bytelm.rounding_tolerance(torch.float16) == pytest.approx(8 * 2**-10)
    assert bytelm.rounding_tolerance(torch.bfloat16) == pytest.approx(8 * 2**-7)
    # Rows mixed up are off by far more than a 16-bit rounding.
    a, b = torch.randn(2, 257, generator=torch.Generator().manual_seed(0)).unbind()
    assert bytelm.rounding_difference(a, b) > bytelm.rounding_tolerance(torch.bfloat16)


class Affine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.linear(x)
        return y, y.argmax(dim=-1)


def save_affine(path: Path) -> tuple[Affine, Path]:
    torch.manual_seed(0)
    module = Affine().eval()
    example = (torch.randn(4, 3),)
    if path.suffix == ".pt2":
        batch = torch.export.Dim("batch", min=1, max=1024)
        program = torch.export.export(module, example, dynamic_shapes=({0: batch},))
        torch.export.save(program, str(path))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.trace(module, example), str(path))
    return module, path


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_file_model_predicts_in_its_dtype(tmp_path: Path, suffix: str, dtype: str) -> None:
    module, path = save_affine(tmp_path / f"affine{suffix}")
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))

    async def main() -> list[RawTensor]:
        async with started(load_model_spec(f"affine={path}"), device="cpu", dtype=dtype) as rt:
            assert rt.get_model("affine").dtype_name == dtype
            return await rt.predict("affine", [to_raw("x", x)], {})

    outputs = run(main())
    # The API's dtypes whatever the model computes in: float32 out, int64 as it was.
    assert [(o.name, o.dtype, o.shape) for o in outputs] == [
        ("output0", "float32", (5, 2)),
        ("output1", "int64", (5,)),
    ]
    y, _ = module(x)
    tolerance = 1e-6 if dtype == "float32" else 5e-2
    assert torch.allclose(floats(outputs[0]), y, atol=tolerance, rtol=tolerance)


def test_a_class_reads_its_device_and_dtype_at_load_and_gets_inputs_there() -> None:
    PlacedDoubler.seen.clear()

    async def main() -> list[RawTensor]:
        async with started(PlacedDoubler(), device="cpu") as runtime:
            assert runtime.get_model("placed").dtype_name == "bfloat16"
            return await runtime.predict("placed", [to_raw("x", torch.ones(3))], {})

    outputs = run(main())
    assert PlacedDoubler.seen == [(torch.device("cpu"), torch.bfloat16)]
    assert floats(outputs[0]).tolist() == [2.0, 2.0, 2.0]


# Devices that do not exist.
def serve(*argv: str) -> subprocess.CompletedProcess[str]:
    """``protoserve serve`` in its own process (it configures logging: not in this one)."""
    command = [sys.executable, "-m", "protoserve.clients.cli", "serve", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_serve_refuses_a_malformed_device_flag() -> None:
    result = serve("--device", "gpu")
    assert result.returncode == 2
    assert "--device: 'gpu' is not one of auto, cpu, cuda or cuda:N" in result.stderr


@no_cuda
def test_serve_refuses_cuda_where_there_is_none() -> None:
    result = serve("--device", "cuda")
    assert result.returncode == 2
    assert result.stderr.startswith("protoserve serve: device 'cuda': ")
    assert result.stderr.count("\n") == 1  # one line
    # A model whose class asks for the GPU: named, before anything loads.
    result = serve("--device", "cpu", "--model", f"{MODELS}:OnCuda")
    assert result.returncode == 2
    assert result.stderr.startswith("protoserve serve: model oncuda: device 'cuda': ")


@no_cuda
def test_a_given_model_on_a_missing_device_fails_and_the_others_serve() -> None:
    async def main() -> None:
        async with started(load_model_spec(f"{MODELS}:OnCuda"), Doubler()) as runtime:
            failed = runtime.get_model("oncuda")
            assert failed.state is ModelState.FAILED
            assert "device 'cuda'" in failed.state_message
            assert runtime.get_model("doubler").state is ModelState.READY

    run(main())


def test_model_toml_device_and_dtype(tmp_path: Path) -> None:
    model_folder(tmp_path, "half", f'source = "{MODELS}:Doubler"\ndtype = "bfloat16"\n')
    model_folder(tmp_path, "typo", f'source = "{MODELS}:Doubler"\ndevice = "gpu"\n')
    model_folder(tmp_path, "wide", f'source = "{MODELS}:Doubler"\ndtype = "float64"\n')
    # cuda:3 is well formed; no machine here has it (a GPU machine has fewer than 4 here).
    model_folder(tmp_path, "far", f'source = "{MODELS}:Doubler"\ndevice = "cuda:3"\n')
    model_folder(tmp_path, "own", f'source = "{MODELS}:PlacedDoubler"\ndtype = "float16"\n')

    async def main() -> None:
        async with started(repository=tmp_path, device="cpu") as runtime:
            assert runtime.get_model("half").dtype_name == "bfloat16"
            # model.toml wins over the class's own dtype.
            assert runtime.get_model("own").dtype_name == "float16"
            reasons = {row.name: row.reason for row in runtime.repository_index()}
            assert reasons["typo"] == (
                "device: must be one of auto, cpu, cuda or cuda:N, not 'gpu'"
            )
            assert reasons["wide"] == (
                "dtype: must be one of float32, float16, bfloat16, not 'float64'"
            )
            if torch.cuda.device_count() < 4:
                assert "failed to load: DeviceError: device 'cuda:3'" in reasons["far"]
            out = await runtime.predict("half", [to_raw("x", torch.ones(2))], {})
            assert floats(out[0]).tolist() == [2.0, 2.0]

    run(main())


# Where each model runs, as the server says it.
@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, grpc.Channel]]:
    thread, server = start_grpc_server(
        (f"{MODELS}:Doubler",), device="cpu", dtype="bfloat16", metrics_port=0
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield f"http://127.0.0.1:{server.metrics_port}/metrics", channel
    channel.close()
    stop_grpc_server(thread, server)


def test_get_model_says_the_device_and_dtype(served: tuple[str, grpc.Channel]) -> None:
    stub = pb_grpc.InferenceServiceStub(served[1])
    model = stub.GetModel(pb.GetModelRequest(name="doubler"), timeout=10).model
    assert (model.device, model.dtype) == ("cpu", "bfloat16")
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert [(m.name, m.device) for m in listed] == [("doubler", "cpu")]


def test_oip_model_config_has_a_cpu_instance_group(served: tuple[str, grpc.Channel]) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(served[1])
    config = stub.ModelConfig(oip_pb.ModelConfigRequest(name="doubler"), timeout=10).config
    assert [(g.kind, g.count, list(g.gpus)) for g in config.instance_group] == [
        (oip_pb.ModelInstanceGroup.KIND_CPU, 1, [])
    ]


def test_oip_model_config_names_the_gpu() -> None:
    scheduler = types.SimpleNamespace(max_batch_size=1, max_batch_delay=0.0, decoder=None)
    entry = ModelEntry("doubler", Doubler(), cast(Any, scheduler))
    assert not model_config(entry).instance_group  # not placed yet
    entry.device = torch.device("cuda", 1)
    (group,) = model_config(entry).instance_group
    assert (group.kind, group.count, list(group.gpus)) == (
        oip_pb.ModelInstanceGroup.KIND_GPU,
        1,
        [1],
    )


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_say_where_each_model_runs(served: tuple[str, grpc.Channel]) -> None:
    response = httpx.get(served[0], timeout=10)
    found = samples(response.text)
    labels = frozenset({("model", "doubler"), ("device", "cpu"), ("dtype", "bfloat16")})
    assert found[("protoserve_model_device", labels)] == 1.0
    if not HAS_CUDA:
        assert "protoserve_cuda_memory" not in "".join(name for name, _ in found)


def test_cuda_memory_gauges_per_device() -> None:
    metrics = Metrics(memory=lambda: [("cuda:0", 1024, 4096), ("cuda:1", 0, 0)])
    found = samples(generate_latest(metrics.registry).decode())
    assert found[("protoserve_cuda_memory_allocated_bytes", frozenset({("device", "cuda:0")}))] == (
        1024
    )
    assert found[("protoserve_cuda_memory_reserved_bytes", frozenset({("device", "cuda:0")}))] == (
        4096
    )
    assert ("protoserve_cuda_memory_reserved_bytes", frozenset({("device", "cuda:1")})) in found
    nothing = samples(generate_latest(Metrics(memory=list).registry).decode())
    assert not any(name.startswith("protoserve_cuda_memory") for name, _ in nothing)


@no_cuda
def test_cuda_memory_reads_nothing_without_cuda() -> None:
    assert devices.cuda_memory() == []


def test_gpu_utilization_gauge_per_device() -> None:
    metrics = Metrics(memory=list, utilization=lambda: [("cuda:0", 0.75)])
    found = samples(generate_latest(metrics.registry).decode())
    assert found[("protoserve_gpu_utilization_ratio", frozenset({("device", "cuda:0")}))] == 0.75
    nothing = samples(generate_latest(Metrics(memory=list, utilization=list).registry).decode())
    assert not any(name == "protoserve_gpu_utilization_ratio" for name, _ in nothing)


@no_cuda
def test_gpu_utilization_reads_nothing_without_cuda() -> None:
    assert devices.gpu_utilization() == []


# On a GPU.
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bytelm_on_the_gpu(dtype: str) -> None:
    async def main() -> None:
        async with started(load_model_spec("bytelm"), device="cuda", dtype=dtype) as runtime:
            entry = runtime.get_model("bytelm")
            assert entry.device_name.startswith("cuda:") and entry.dtype_name == dtype
            model = cast(Any, entry.model).model
            assert {p.device.type for p in model.parameters()} == {"cuda"}
            results = await asyncio.gather(
                *(
                    runtime.generate("bytelm", "def ", {"max_new_tokens": 16, "seed": s})
                    for s in range(8)
                )
            )
            assert all(r.usage.completion_tokens >= 1 for r in results)
            vectors, _ = await runtime.embed("bytelm", ["a", "bb", "ccc"])
            assert vectors.device.type == "cpu" and vectors.dtype == torch.float32
            assert devices.cuda_memory()[entry.device.index][1] > 0

    run(main())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_a_file_model_on_the_gpu(tmp_path: Path, suffix: str) -> None:
    module, path = save_affine(tmp_path / f"affine{suffix}")
    x = torch.randn(5, 3)

    async def main() -> list[RawTensor]:
        async with started(load_model_spec(f"affine={path}"), device="cuda") as rt:
            assert rt.get_model("affine").device_name.startswith("cuda:")
            return await rt.predict("affine", [to_raw("x", x)], {})

    outputs = run(main())
    assert torch.allclose(floats(outputs[0]), module(x)[0], atol=1e-4, rtol=1e-4)
