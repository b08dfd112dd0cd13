"""Declared tensors in ``model.toml``: a TorchScript or torch.export file gets a signature.

A repository folder declares what its file takes and returns (``[inputs.NAME]``,
``[outputs.NAME]``) and that it batches rows (``[batching] predict_batches``).
The tests serve real files on a real server and look as a Triton client does:
ModelMetadata, ModelConfig and ModelInfer over the Open Inference Protocol, many
calls at once, and the batch sizes /metrics counted; and v1 GetModel.
"""

from __future__ import annotations

import asyncio
import io
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from protoserve.inference.v1 import inference_service_pb2 as v1
from protoserve.oip.v2 import grpc_service_pb2 as pb
from protoserve.oip.v2 import grpc_service_pb2_grpc as pb_grpc
from tests.server.test_repository import Server, code, details, error, model_folder, serving

REPO_MODELS = "tests.server.repository_models"

NET_TOML = """\
source = "{file}"

[batching]
predict_batches = true
max_batch_delay_ms = 20    # wide, so that calls sent together surely meet

[inputs.INPUT0]
dtype = "float32"
shape = [-1, 8]
description = "Eight features per row."

[outputs.OUTPUT0]
dtype = "float32"
shape = [-1, 4]
"""

# Declared out of name order: a file gets its inputs in this order, not sorted.
PAIR_TOML = """\
source = "model.pt"

[inputs.z]
dtype = "float32"
shape = [-1]
[inputs.a]
dtype = "float32"
shape = [-1]

[outputs.difference]
dtype = "float32"
shape = [-1]
[outputs.product]
dtype = "float32"
shape = [-1]
"""

# The file returns one tensor; this declares two.
WRONG_TOML = """\
source = "model.pt"

[inputs.INPUT0]
dtype = "float32"
shape = [-1, 8]

[outputs.first]
dtype = "float32"
shape = [-1, 4]
[outputs.second]
dtype = "float32"
shape = [-1, 4]
"""


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


class Pair(torch.nn.Module):
    def forward(self, z: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return z - a, z * a


def scripted(module: torch.nn.Module) -> bytes:
    """A TorchScript file's bytes (making one is deprecated in torch 2.13; users have them)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module), buffer)  # type: ignore[no-untyped-call]
    return buffer.getvalue()


def exported(module: torch.nn.Module, folder: Path) -> bytes:
    """A torch.export archive's bytes, its batch dimension dynamic."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(module, (torch.randn(2, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "net.pt2"))
    return (folder / "net.pt2").read_bytes()


@pytest.fixture(scope="module")
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture
def server(net: Net, tmp_path: Path) -> Iterator[Server]:
    root = tmp_path / "models"
    root.mkdir()
    files = {"model.pt": scripted(net), "model.pt2": exported(net, tmp_path)}
    for name, file in (("net", "model.pt"), ("net-export", "model.pt2")):
        model_folder(root, name, NET_TOML.format(file=file), files={1: {file: files[file]}})
    model_folder(root, "pair", PAIR_TOML, files={1: {"model.pt": scripted(Pair())}})
    model_folder(root, "wrong", WRONG_TOML, files={1: {"model.pt": files["model.pt"]}})
    with serving(root, metrics_port=0) as s:
        assert s.index(ready=True).keys() == {
            ("net", "1"),
            ("net-export", "1"),
            ("pair", "1"),
            ("wrong", "1"),
        }
        yield s


def infer_request(model: str, x: torch.Tensor) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="INPUT0", datatype="FP32", shape=list(x.shape)
    )
    return pb.ModelInferRequest(
        model_name=model, inputs=[tensor], raw_input_contents=[x.numpy().tobytes()]
    )


def output(response: pb.ModelInferResponse, index: int = 0) -> torch.Tensor:
    shape = list(response.outputs[index].shape)
    data = bytearray(response.raw_output_contents[index])
    return torch.frombuffer(data, dtype=torch.float32).reshape(shape)


def batch_sizes(s: Server, model: str) -> tuple[float, float]:
    """(model calls, rows) of protoserve_batch_size for ``model``'s predict so far."""
    url = f"http://127.0.0.1:{s.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    found = {"count": 0.0, "sum": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                family.name == "protoserve_batch_size"
                and sample.labels == {"model": model, "kind": "predict"}
                and sample.name.endswith(("_count", "_sum"))
            ):
                found[sample.name.rsplit("_", 1)[1]] += sample.value
    return found["count"], found["sum"]


@pytest.mark.parametrize("model", ["net", "net-export"])
def test_metadata_and_config_show_the_declared_tensors_and_the_batch(
    server: Server, model: str
) -> None:
    metadata = server.oip.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=10)
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("INPUT0", "FP32", [-1, 8])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("OUTPUT0", "FP32", [-1, 4])
    ]
    config = server.oip.ModelConfig(pb.ModelConfigRequest(name=model), timeout=10).config
    assert config.max_batch_size > 0
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("INPUT0", pb.TYPE_FP32, [8])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("OUTPUT0", pb.TYPE_FP32, [4])
    ]
    assert config.dynamic_batching.max_queue_delay_microseconds == 20_000
    # v1 GetModel describes them too, description included.
    got = server.v1.GetModel(v1.GetModelRequest(name=model), timeout=10).model
    assert [(t.name, t.data_type, list(t.shape), t.description) for t in got.inputs] == [
        ("INPUT0", v1.DATA_TYPE_FLOAT32, [-1, 8], "Eight features per row.")
    ]
    assert [(t.name, t.data_type, list(t.shape)) for t in got.outputs] == [
        ("OUTPUT0", v1.DATA_TYPE_FLOAT32, [-1, 4])
    ]


@pytest.mark.parametrize("model", ["net", "net-export"])
def test_model_infer_returns_the_modules_output_by_its_declared_name(
    server: Server, net: Net, model: str
) -> None:
    x = torch.randn(3, 8)
    response = server.oip.ModelInfer(infer_request(model, x), timeout=30)
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("OUTPUT0", "FP32", [3, 4])
    ]
    with torch.no_grad():
        assert torch.allclose(output(response), net(x), atol=1e-6)
    # The declaration is checked: a wrong inner dimension is the caller's mistake.
    err = error(server.oip.ModelInfer, infer_request(model, torch.randn(3, 7)))
    assert code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert "must match [-1, 8], got [3, 7]" in details(err)


def test_concurrent_calls_are_joined_into_batches_and_equal_their_rows(
    server: Server, net: Net
) -> None:
    rows = torch.randn(32, 8)
    calls_before, rows_before = batch_sizes(server, "net")

    async def together() -> list[pb.ModelInferResponse]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            calls = [stub.ModelInfer(infer_request("net", row[None]), timeout=30) for row in rows]
            return list(await asyncio.gather(*calls))

    responses = asyncio.run(together())
    with torch.no_grad():
        want = net(rows)
    for i, response in enumerate(responses):
        assert list(response.outputs[0].shape) == [1, 4]
        # Rows joined into batches of any size against one 32-row product: equal to
        # rounding only, which varies by CPU (measured: at most 1.2e-7, |y| < 1).
        assert torch.allclose(output(response), want[i : i + 1], atol=1e-6), i
    calls, joined = batch_sizes(server, "net")
    # 32 one-row requests, all answered, in fewer model calls: rows were joined.
    assert joined - rows_before == 32
    assert calls - calls_before < 32, calls - calls_before


def test_inputs_go_in_declared_order_and_tuple_results_take_the_declared_names(
    server: Server,
) -> None:
    z, a = torch.tensor([5.0, 7.0]), torch.tensor([1.0, 2.0])
    request = pb.ModelInferRequest(
        model_name="pair",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=[2])
            for name in ("a", "z")
        ],
        raw_input_contents=[a.numpy().tobytes(), z.numpy().tobytes()],
    )
    response = server.oip.ModelInfer(request, timeout=30)
    assert [o.name for o in response.outputs] == ["difference", "product"]
    assert output(response, 0).tolist() == [4.0, 5.0]  # z - a, not a - z
    assert output(response, 1).tolist() == [5.0, 14.0]
    metadata = server.oip.ModelMetadata(pb.ModelMetadataRequest(name="pair"), timeout=10)
    assert [t.name for t in metadata.inputs] == ["z", "a"]
    # Not declared to batch: ModelConfig says so.
    config = server.oip.ModelConfig(pb.ModelConfigRequest(name="pair"), timeout=10).config
    assert config.max_batch_size == 0 and [list(i.dims) for i in config.input] == [[-1], [-1]]


def test_a_result_that_does_not_fit_the_declared_outputs_is_a_clear_error(
    server: Server,
) -> None:
    for _ in range(2):  # and the model's worker goes on serving
        err = error(server.oip.ModelInfer, infer_request("wrong", torch.randn(2, 8)))
        assert code(err) == grpc.StatusCode.FAILED_PRECONDITION
        assert (
            "model file model.pt returned 1 tensors, but its declared outputs are "
            "['first', 'second']; fix the outputs in model.toml"
        ) in details(err)
    assert server.ready("wrong")


def test_declarations_override_a_class_models_own(tmp_path: Path) -> None:
    from tests.server.repository_models import NoNegatives, RowTripler

    # A class that declares nothing gets a signature, and batches rows.
    model_folder(
        tmp_path,
        "declared",
        f'source = "{REPO_MODELS}:NoNegatives"\n[batching]\npredict_batches = true\n'
        '[inputs.x]\ndtype = "float32"\nshape = [-1, 2]\n'
        '[outputs.y]\ndtype = "float32"\nshape = [-1, 2]\n',
    )
    # A class that batches rows is told not to.
    model_folder(
        tmp_path,
        "unbatched",
        f'source = "{REPO_MODELS}:RowTripler"\n[batching]\npredict_batches = false\n',
    )
    with serving(tmp_path, max_batch_size=8) as s:

        def config(name: str) -> pb.ModelConfig:
            return s.oip.ModelConfig(pb.ModelConfigRequest(name=name), timeout=10).config

        declared = config("declared")
        assert declared.max_batch_size == 8
        assert [(i.name, list(i.dims)) for i in declared.input] == [("x", [2])]
        assert [(o.name, list(o.dims)) for o in declared.output] == [("y", [2])]
        unbatched = config("unbatched")
        assert unbatched.max_batch_size == 0 and not unbatched.HasField("dynamic_batching")
        assert [list(i.dims) for i in unbatched.input] == [[-1, 2]]
        # The classes themselves are untouched: the settings are the instances' own.
        assert NoNegatives.inputs == () and not NoNegatives.predict_batches
        assert RowTripler.predict_batches
