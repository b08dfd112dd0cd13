"""The proto ⇄ Python layer, without a server: dtypes, bytes, parameters."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from protoserve.clients import _convert
from protoserve.clients._errors import InvalidArgument
from protoserve.clients._types import FinishReason, Usage
from protoserve.inference.v1 import inference_service_pb2 as pb

TORCH_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
]


def _echo(request: pb.PredictRequest) -> pb.PredictResponse:
    """What a server returning its inputs unchanged would send, through the wire format."""
    wire = pb.PredictResponse(outputs=request.inputs).SerializeToString()
    return pb.PredictResponse.FromString(wire)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_torch_tensors_round_trip_in_every_dtype(dtype: torch.dtype) -> None:
    value = (torch.arange(12) % 3).reshape(3, 4).to(dtype)
    request, as_numpy = _convert.predict_request("m", {"x": value}, None)
    assert as_numpy is False
    out = _convert.predict_outputs(_echo(request), as_numpy)["x"]
    assert isinstance(out, torch.Tensor)
    assert out.dtype == dtype
    assert torch.equal(out, value)


def test_raw_bytes_are_little_endian_and_row_major() -> None:
    value = torch.tensor([[1, 2], [3, 4]], dtype=torch.int32).t()  # not contiguous
    request, _ = _convert.predict_request("m", {"x": value}, None)
    tensor = request.inputs[0]
    assert tensor.data_type == pb.DATA_TYPE_INT32
    assert list(tensor.shape) == [2, 2]
    assert tensor.raw_data == np.array([1, 3, 2, 4], dtype="<i4").tobytes()


def test_bfloat16_travels_as_its_own_bits() -> None:
    value = torch.tensor([1.0, -2.5], dtype=torch.bfloat16)
    request, _ = _convert.predict_request("m", {"x": value}, None)
    assert request.inputs[0].data_type == pb.DATA_TYPE_BFLOAT16
    assert request.inputs[0].raw_data == bytes.fromhex("803f20c0")


def test_numpy_in_numpy_out_and_big_endian_input_is_swapped() -> None:
    value = np.arange(4, dtype=">i8")
    request, as_numpy = _convert.predict_request("m", {"x": value}, {"factor": 3})
    assert as_numpy is True
    assert request.inputs[0].raw_data == np.arange(4, dtype="<i8").tobytes()
    assert dict(request.parameters) == {"factor": 3.0}
    out = _convert.predict_outputs(_echo(request), as_numpy)["x"]
    assert isinstance(out, np.ndarray)
    assert out.flags.writeable
    np.testing.assert_array_equal(out, value)


def test_bfloat16_output_stays_torch_when_numpy_was_asked() -> None:
    request, _ = _convert.predict_request("m", {"x": torch.ones(2, dtype=torch.bfloat16)}, None)
    out = _convert.predict_outputs(_echo(request), as_numpy=True)["x"]
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16


def test_empty_tensor_round_trips() -> None:
    request, _ = _convert.predict_request("m", {"x": torch.zeros(0, 3)}, None)
    out = _convert.predict_outputs(_echo(request), as_numpy=False)["x"]
    assert isinstance(out, torch.Tensor) and out.shape == (0, 3)


@pytest.mark.parametrize(
    "value", [torch.zeros(2, dtype=torch.complex64), np.zeros(2, dtype=np.uint16)], ids=str
)
def test_unsupported_dtype_is_a_type_error(value: Any) -> None:
    with pytest.raises(TypeError, match="not supported"):
        _convert.predict_request("m", {"x": value}, None)


def test_bytes_that_do_not_fit_the_shape_are_refused() -> None:
    response = pb.PredictResponse(
        outputs=[pb.Tensor(name="y", data_type=pb.DATA_TYPE_FLOAT32, shape=[3], raw_data=b"1234")]
    )
    with pytest.raises(ValueError, match="do not fit"):
        _convert.predict_outputs(response, as_numpy=False)


def test_generation_parameters_none_means_unset_and_names_are_exact() -> None:
    request = _convert.generate_request(
        "m", "hi", {"seed": 3, "temperature": None, "stop_sequences": "\n"}
    )
    assert request.parameters.HasField("seed")
    assert not request.parameters.HasField("temperature")
    assert list(request.parameters.stop_sequences) == ["\n"]
    with pytest.raises(TypeError, match="unexpected keyword argument 'stop'"):
        _convert.generate_request("m", "hi", {"stop": "\n"})


def test_a_value_the_wire_cannot_carry_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument) as caught:
        _convert.stream_request("m", "hi", {"max_new_tokens": -1})
    assert caught.value.field_violations[0].field == "parameters.max_new_tokens"


def test_responses_become_python_values() -> None:
    response = pb.GenerateResponse(
        generated_text="abc",
        token_ids=[97, 98, 99],
        finish_reason=pb.FINISH_REASON_LENGTH,
        usage=pb.Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5),
        model="m",
    )
    text = _convert.generation(response)
    assert text == "abc" and text.finish_reason is FinishReason.LENGTH
    assert text.usage == Usage(2, 3) and text.token_ids == (97, 98, 99)
    assert _convert.stream_part(pb.GenerateStreamResponse(text="a", token_ids=[97])) == (
        "a",
        (97,),
        None,
        None,
    )


def test_embeddings_shapes() -> None:
    response = pb.EmbedResponse(
        embeddings=[pb.Embedding(values=[1, 2, 3]), pb.Embedding(values=[4, 5, 6])]
    )
    batch = _convert.embeddings(response, single=False)
    assert batch.dtype == torch.float32 and batch.shape == (2, 3)
    one = _convert.embeddings(pb.EmbedResponse(embeddings=[pb.Embedding(values=[1, 2])]), True)
    assert one.shape == (2,)
    assert list(_convert.embed_request("m", "a", normalize=False).inputs) == ["a"]
