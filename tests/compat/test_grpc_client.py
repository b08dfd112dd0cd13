"""tritonclient.grpc against `protoserve serve`: the calls a Triton user makes, unchanged."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.compat._cases import CASES, SPARE, TEXT, WIDTH, AddSubCase

pytestmark = pytest.mark.e2e


def _add_sub(client: Any, case: AddSubCase, model: str | None = None, **kw: Any) -> Any:
    a, b = case.operands()
    inputs = [
        grpcclient.InferInput("INPUT0", list(a.shape), case.datatype),
        grpcclient.InferInput("INPUT1", list(b.shape), case.datatype),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    outputs = [
        grpcclient.InferRequestedOutput("OUTPUT0"),
        grpcclient.InferRequestedOutput("OUTPUT1"),
    ]
    return client.infer(model or case.model, inputs, outputs=outputs, **kw)


def test_server_is_live_and_ready(grpc_client: Any) -> None:
    assert grpc_client.is_server_live() is True
    assert grpc_client.is_server_ready() is True


def test_server_metadata(grpc_client: Any) -> None:
    metadata = grpc_client.get_server_metadata()
    assert metadata.name
    assert metadata.version
    assert "model_repository" in metadata.extensions


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.model)
def test_model_metadata(grpc_client: Any, case: AddSubCase) -> None:
    assert grpc_client.is_model_ready(case.model) is True
    assert grpc_client.is_model_ready(case.model, "1") is True
    metadata = grpc_client.get_model_metadata(case.model)
    assert metadata.name == case.model
    assert list(metadata.versions) == ["1"]
    tensors = [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs]
    assert tensors == [(n, case.datatype, [-1, WIDTH]) for n in ("INPUT0", "INPUT1")]
    tensors = [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs]
    assert tensors == [(n, case.datatype, [-1, WIDTH]) for n in ("OUTPUT0", "OUTPUT1")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.model)
def test_model_config_agrees_with_metadata(grpc_client: Any, case: AddSubCase) -> None:
    config = grpc_client.get_model_config(case.model).config
    assert config.name == case.model
    data_type = f"TYPE_{case.datatype}"
    # Triton's rule: with max_batch_size > 0, dims leave out the batch dimension.
    dims = [WIDTH] if config.max_batch_size > 0 else [-1, WIDTH]
    for tensors, names in (
        (config.input, ("INPUT0", "INPUT1")),
        (config.output, ("OUTPUT0", "OUTPUT1")),
    ):
        described = [
            (t.name, grpcclient.model_config_pb2.DataType.Name(t.data_type), list(t.dims))
            for t in tensors
        ]
        assert described == [(n, data_type, dims) for n in names]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.model)
def test_infer(grpc_client: Any, case: AddSubCase) -> None:
    a, b = case.operands()
    result = _add_sub(grpc_client, case, request_id="req-7")
    response = result.get_response()
    assert response.model_name == case.model
    assert response.id == "req-7"
    for name, expected in (("OUTPUT0", a + b), ("OUTPUT1", a - b)):
        got = result.as_numpy(name)
        assert got.dtype == case.dtype
        np.testing.assert_array_equal(got, expected)


def test_infer_with_version(grpc_client: Any) -> None:
    case = CASES[0]
    result = _add_sub(grpc_client, case, model_version="1")
    a, b = case.operands()
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)


def test_unknown_model(grpc_client: Any) -> None:
    with pytest.raises(InferenceServerException) as info:
        _add_sub(grpc_client, CASES[0], model="no_such_model")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in info.value.message()
    with pytest.raises(InferenceServerException, match="no_such_model"):
        grpc_client.get_model_metadata("no_such_model")


def test_wrong_datatype_is_invalid_argument(grpc_client: Any) -> None:
    a = np.zeros((1, WIDTH), dtype=np.float64)
    inputs = [grpcclient.InferInput(n, [1, WIDTH], "FP64") for n in ("INPUT0", "INPUT1")]
    for item in inputs:
        item.set_data_from_numpy(a)
    with pytest.raises(InferenceServerException) as info:
        grpc_client.infer(CASES[0].model, inputs)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "FP32" in info.value.message()
    assert "FP64" in info.value.message()


def _index(client: Any) -> dict[str, str]:
    return {m.name: m.state for m in client.get_model_repository_index().models}


def test_repository_index(grpc_client: Any) -> None:
    index = _index(grpc_client)
    for name in [c.model for c in CASES] + [SPARE, TEXT]:
        assert index[name] == "READY", index


def test_unload_and_load(grpc_client: Any) -> None:
    case = AddSubCase(SPARE, "FP32", np.float32)
    grpc_client.unload_model(SPARE)
    try:
        assert grpc_client.is_model_ready(SPARE) is False
        # As Triton's: a model unloaded on purpose does not make the server unready.
        assert grpc_client.is_server_ready() is True
        assert _index(grpc_client)[SPARE] == "UNAVAILABLE"
        with pytest.raises(InferenceServerException, match=SPARE):
            _add_sub(grpc_client, case)
        # The other models are untouched.
        assert grpc_client.is_model_ready(CASES[0].model) is True
    finally:
        grpc_client.load_model(SPARE)
    assert grpc_client.is_model_ready(SPARE) is True
    assert _index(grpc_client)[SPARE] == "READY"
    a, b = case.operands()
    np.testing.assert_array_equal(_add_sub(grpc_client, case).as_numpy("OUTPUT1"), a - b)


def test_load_unknown_model(grpc_client: Any) -> None:
    with pytest.raises(InferenceServerException) as info:
        grpc_client.load_model("no_such_model")
    assert "no_such_model" in info.value.message()
