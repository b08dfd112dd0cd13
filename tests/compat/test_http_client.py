"""tritonclient.http against `protoserve gateway`: the KServe V2 REST protocol, unchanged."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.compat._cases import CASES, SPARE, TEXT, WIDTH, AddSubCase

pytestmark = pytest.mark.e2e
#: (inputs as binary, outputs as binary): the four ways tritonclient.http can send.
ENCODINGS = [(True, True), (False, False), (True, False), (False, True)]


def _add_sub(
    client: Any,
    case: AddSubCase,
    *,
    binary_in: bool = True,
    binary_out: bool = True,
    model: str | None = None,
    **kw: Any,
) -> Any:
    a, b = case.operands()
    inputs = [
        httpclient.InferInput("INPUT0", list(a.shape), case.datatype),
        httpclient.InferInput("INPUT1", list(b.shape), case.datatype),
    ]
    inputs[0].set_data_from_numpy(a, binary_data=binary_in)
    inputs[1].set_data_from_numpy(b, binary_data=binary_in)
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary_out),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=binary_out),
    ]
    return client.infer(model or case.model, inputs, outputs=outputs, **kw)


def test_server_is_live_and_ready(http_client: Any) -> None:
    assert http_client.is_server_live() is True
    assert http_client.is_server_ready() is True


def test_server_metadata(http_client: Any) -> None:
    metadata = http_client.get_server_metadata()
    assert isinstance(metadata["name"], str) and metadata["name"]
    assert isinstance(metadata["version"], str) and metadata["version"]
    assert "model_repository" in metadata["extensions"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.model)
def test_model_metadata(http_client: Any, case: AddSubCase) -> None:
    assert http_client.is_model_ready(case.model) is True
    assert http_client.is_model_ready(case.model, "1") is True
    metadata = http_client.get_model_metadata(case.model)
    assert metadata["name"] == case.model
    assert metadata["versions"] == ["1"]
    # Shapes are JSON numbers, not protobuf's int64-as-string.
    assert metadata["inputs"] == [
        {"name": n, "datatype": case.datatype, "shape": [-1, WIDTH]} for n in ("INPUT0", "INPUT1")
    ]
    assert metadata["outputs"] == [
        {"name": n, "datatype": case.datatype, "shape": [-1, WIDTH]} for n in ("OUTPUT0", "OUTPUT1")
    ]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.model)
def test_model_config_agrees_with_metadata(http_client: Any, case: AddSubCase) -> None:
    config = http_client.get_model_config(case.model)
    assert config["name"] == case.model
    max_batch_size = config.get("max_batch_size", 0)
    assert isinstance(max_batch_size, int)
    dims = [WIDTH] if max_batch_size > 0 else [-1, WIDTH]
    # perf_analyzer reads dims as JSON integers and data_type as Triton's enum name.
    for key, names in (("input", ("INPUT0", "INPUT1")), ("output", ("OUTPUT0", "OUTPUT1"))):
        described = [(t["name"], t["data_type"], t["dims"]) for t in config[key]]
        assert described == [(n, f"TYPE_{case.datatype}", dims) for n in names]


@pytest.mark.parametrize("binary_in,binary_out", ENCODINGS, ids=lambda v: "binary" if v else "json")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.model)
def test_infer(http_client: Any, case: AddSubCase, binary_in: bool, binary_out: bool) -> None:
    a, b = case.operands()
    result = _add_sub(
        http_client, case, binary_in=binary_in, binary_out=binary_out, request_id="req-7"
    )
    response = result.get_response()
    assert response["model_name"] == case.model
    assert response["id"] == "req-7"
    for name, expected in (("OUTPUT0", a + b), ("OUTPUT1", a - b)):
        got = result.as_numpy(name)
        assert got.dtype == case.dtype
        np.testing.assert_array_equal(got, expected)


def test_infer_with_version(http_client: Any) -> None:
    case = CASES[0]
    a, b = case.operands()
    result = _add_sub(http_client, case, model_version="1")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)


def test_unknown_model(http_client: Any) -> None:
    with pytest.raises(InferenceServerException) as info:
        _add_sub(http_client, CASES[0], model="no_such_model")
    assert info.value.status() in ("400", "404")
    assert "no_such_model" in info.value.message()
    assert http_client.is_model_ready("no_such_model") is False
    with pytest.raises(InferenceServerException, match="no_such_model"):
        http_client.get_model_metadata("no_such_model")


def test_wrong_datatype_is_a_client_error(http_client: Any) -> None:
    a = np.zeros((1, WIDTH), dtype=np.float64)
    inputs = [httpclient.InferInput(n, [1, WIDTH], "FP64") for n in ("INPUT0", "INPUT1")]
    for item in inputs:
        item.set_data_from_numpy(a)
    with pytest.raises(InferenceServerException) as info:
        http_client.infer(CASES[0].model, inputs)
    assert info.value.status() == "400"
    assert "FP32" in info.value.message()
    assert "FP64" in info.value.message()


def _index(client: Any) -> dict[str, str]:
    return {m["name"]: m["state"] for m in client.get_model_repository_index()}


def test_repository_index(http_client: Any) -> None:
    index = _index(http_client)
    for name in [c.model for c in CASES] + [SPARE, TEXT]:
        assert index[name] == "READY", index


def test_unload_and_load(http_client: Any) -> None:
    case = AddSubCase(SPARE, "FP32", np.float32)
    http_client.unload_model(SPARE)
    try:
        assert http_client.is_model_ready(SPARE) is False
        # As Triton's: a model unloaded on purpose does not make the server unready.
        assert http_client.is_server_ready() is True
        assert _index(http_client)[SPARE] == "UNAVAILABLE"
        with pytest.raises(InferenceServerException, match=SPARE):
            _add_sub(http_client, case)
        assert http_client.is_model_ready(CASES[0].model) is True
    finally:
        http_client.load_model(SPARE)
    assert http_client.is_model_ready(SPARE) is True
    assert _index(http_client)[SPARE] == "READY"
    a, b = case.operands()
    np.testing.assert_array_equal(_add_sub(http_client, case).as_numpy("OUTPUT1"), a - b)


def test_load_unknown_model(http_client: Any) -> None:
    with pytest.raises(InferenceServerException) as info:
        http_client.load_model("no_such_model")
    assert info.value.status() in ("400", "404")
    assert "no_such_model" in info.value.message()
