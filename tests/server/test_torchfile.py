"""Serving TorchScript and torch.export files for Predict, through the runtime core."""

from __future__ import annotations

import asyncio
import re
import warnings
from pathlib import Path

import pytest
import torch

from protoserve.server import InvalidArgument, Runtime
from protoserve.server.runtime.loader import load_model_spec
from protoserve.server.runtime.tensors import RawTensor, to_raw


class Affine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.linear(x)
        return y, y.argmax(dim=-1)


@pytest.fixture(scope="module")
def module() -> Affine:
    torch.manual_seed(0)
    return Affine().eval()


def save(module: Affine, path: Path) -> Path:
    example = (torch.randn(4, 3),)
    if path.suffix == ".pt2":
        batch = torch.export.Dim("batch", min=1, max=1024)
        program = torch.export.export(module, example, dynamic_shapes=({0: batch},))
        torch.export.save(program, str(path))
    else:
        # Users still bring TorchScript files; making one is deprecated in torch 2.13.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.trace(module, example), str(path))
    return path


async def predict(spec: str, inputs: list[RawTensor]) -> list[RawTensor]:
    runtime = Runtime([load_model_spec(spec)])
    try:
        await runtime.start()
        return await runtime.predict(runtime.list_models()[0].name, inputs, {})
    finally:
        runtime.close()


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_file_model_predicts_like_the_module(module: Affine, tmp_path: Path, suffix: str) -> None:
    path = save(module, tmp_path / f"affine{suffix}")
    x = torch.randn(5, 3)
    outputs = asyncio.run(predict(f"affine={path}", [to_raw("x", x)]))
    assert [(o.name, o.dtype, o.shape) for o in outputs] == [
        ("output0", "float32", (5, 2)),
        ("output1", "int64", (5,)),
    ]
    y, label = module(x)
    got = torch.frombuffer(bytearray(outputs[0].data), dtype=torch.float32).reshape(5, 2)
    assert torch.allclose(got, y, atol=1e-6)
    assert outputs[1].data == label.numpy().astype("<i8").tobytes()


def test_raw_tensor_round_trip_keeps_every_dtype() -> None:
    from protoserve.server.runtime.tensors import DTYPES, from_raw

    for name, dtype in DTYPES.items():
        t = (torch.arange(6) % 2 == 0) if dtype is torch.bool else torch.arange(6).to(dtype)
        raw = to_raw("t", t.reshape(2, 3))
        assert raw.dtype == name
        back = from_raw([raw])["t"]
        assert back.dtype == dtype and torch.equal(back, t.reshape(2, 3))


def test_byte_count_mismatch_is_invalid_argument() -> None:
    from protoserve.server.runtime.tensors import from_raw

    with pytest.raises(InvalidArgument) as info:
        from_raw([RawTensor("x", "float32", (2, 2), b"\0" * 15)])
    assert info.value.violations == [
        ("inputs[0].raw_data", "shape [2, 2] of float32 needs 16 bytes, got 15")
    ]


class Named(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sum": x.sum(dim=-1), "twice": x * 2}


def test_declared_outputs_name_and_check_what_the_file_returns(tmp_path: Path) -> None:
    from protoserve.server import TensorInfo
    from protoserve.server.models.torchfile import TorchFileModel
    from protoserve.server.runtime.errors import FailedPrecondition

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(Named()), str(tmp_path / "named.pt"))  # type: ignore[no-untyped-call]
    model = TorchFileModel(tmp_path / "named.pt")
    model.load()
    x = torch.ones(2, 3)
    # A dict result comes back in the declared order, whatever the file's.
    model.outputs = (  # type: ignore[misc]
        TensorInfo("twice", "float32", (-1, 3)),
        TensorInfo("sum", "float32", (-1,)),
    )
    got = model.predict({"x": x}, {})
    assert list(got) == ["twice", "sum"] and got["sum"].tolist() == [3.0, 3.0]
    # Declarations the result does not fit: the message says what and where to fix it.
    for outputs, message in [
        ((TensorInfo("sum", "float32", (-1,)),), "returned outputs ['sum', 'twice']"),
        (
            (TensorInfo("twice", "int64", (-1, 3)), TensorInfo("sum", "float32", (-1,))),
            "returned 'twice' as float32 [2, 3], declared int64 [-1, 3]",
        ),
        (
            (TensorInfo("twice", "float32", (-1, 4)), TensorInfo("sum", "float32", (-1,))),
            "returned 'twice' as float32 [2, 3], declared float32 [-1, 4]",
        ),
    ]:
        model.outputs = outputs  # type: ignore[misc]
        with pytest.raises(FailedPrecondition, match=re.escape(message)):
            model.predict({"x": x}, {})
