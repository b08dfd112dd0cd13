"""BYTES tensors: the built-in bytelm through tritonclient, checked against protoserve's own API.

Generation takes `text_input` (BYTES) and answers `text_output` (BYTES); embedding
takes `text` (BYTES) and answers `embedding` (FP32). The same prompt and seed
through the native v1 API (the gateway's /v1 JSON routes) give the expected text.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.compat._cases import TEXT
from tests.compat._processes import Process

pytestmark = pytest.mark.e2e
#: ASCII, and UTF-8 of two and four bytes: BYTES elements are bytes, not characters.
PROMPTS = ["The cat sat on", "héllo wörld 🙂"]
PARAMETERS = {"max_new_tokens": 12, "temperature": 0.8, "seed": 7}


def _native(gateway: Process, method: str, body: dict[str, Any]) -> Any:
    """POST /v1/models/bytelm:METHOD through the gateway: protoserve's own answer."""
    request = urllib.request.Request(
        f"http://{gateway.address}/v1/models/{TEXT}:{method}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def expected_texts(gateway: Process) -> list[bytes]:
    return [
        _native(gateway, "generate", {"inputs": p, "parameters": PARAMETERS})[
            "generated_text"
        ].encode()
        for p in PROMPTS
    ]


@pytest.fixture(scope="module")
def expected_embeddings(gateway: Process) -> np.ndarray:
    vectors = _native(gateway, "embed", {"inputs": PROMPTS})["embeddings"]
    return np.array([v["values"] for v in vectors], dtype=np.float32)


def _prompts() -> np.ndarray:
    return np.array([p.encode() for p in PROMPTS], dtype=np.object_)


def test_text_model_metadata(grpc_client: Any, http_client: Any) -> None:
    expected_inputs = [("text_input", "BYTES", [-1]), ("text", "BYTES", [-1])]
    expected_outputs = [("text_output", "BYTES", [-1]), ("embedding", "FP32", [-1, -1])]
    metadata = grpc_client.get_model_metadata(TEXT)
    assert sorted((t.name, t.datatype, list(t.shape)) for t in metadata.inputs) == sorted(
        expected_inputs
    )
    assert sorted((t.name, t.datatype, list(t.shape)) for t in metadata.outputs) == sorted(
        expected_outputs
    )
    metadata = http_client.get_model_metadata(TEXT)
    assert sorted((t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]) == sorted(
        expected_inputs
    )


def test_generate_grpc(grpc_client: Any, expected_texts: list[bytes]) -> None:
    prompts = _prompts()
    text = grpcclient.InferInput("text_input", [len(prompts)], "BYTES")
    text.set_data_from_numpy(prompts)
    result = grpc_client.infer(TEXT, [text], parameters=PARAMETERS)
    got = result.as_numpy("text_output")
    assert got.shape == (len(PROMPTS),)
    assert list(got) == expected_texts


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_generate_http(http_client: Any, expected_texts: list[bytes], binary: bool) -> None:
    prompts = _prompts()
    text = httpclient.InferInput("text_input", [len(prompts)], "BYTES")
    text.set_data_from_numpy(prompts, binary_data=binary)
    output = httpclient.InferRequestedOutput("text_output", binary_data=binary)
    result = http_client.infer(TEXT, [text], outputs=[output], parameters=PARAMETERS)
    got = list(result.as_numpy("text_output"))
    if not binary:  # tritonclient gives JSON strings as str, binary BYTES as bytes
        got = [item.encode() for item in got]
    assert got == expected_texts


def test_generate_http_outputs_unnamed(http_client: Any, expected_texts: list[bytes]) -> None:
    # Without outputs, tritonclient asks for every output in binary (binary_data_output).
    prompts = _prompts()
    text = httpclient.InferInput("text_input", [len(prompts)], "BYTES")
    text.set_data_from_numpy(prompts)
    result = http_client.infer(TEXT, [text], parameters=PARAMETERS)
    assert list(result.as_numpy("text_output")) == expected_texts


def test_embed_grpc(grpc_client: Any, expected_embeddings: np.ndarray) -> None:
    prompts = _prompts()
    text = grpcclient.InferInput("text", [len(prompts)], "BYTES")
    text.set_data_from_numpy(prompts)
    got = grpc_client.infer(TEXT, [text]).as_numpy("embedding")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected_embeddings, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_embed_http(http_client: Any, expected_embeddings: np.ndarray, binary: bool) -> None:
    prompts = _prompts()
    text = httpclient.InferInput("text", [len(prompts)], "BYTES")
    text.set_data_from_numpy(prompts, binary_data=binary)
    output = httpclient.InferRequestedOutput("embedding", binary_data=binary)
    got = http_client.infer(TEXT, [text], outputs=[output]).as_numpy("embedding")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected_embeddings, rtol=1e-5, atol=1e-6)


def test_bad_parameter_is_a_client_error(grpc_client: Any, http_client: Any) -> None:
    prompts = _prompts()
    text = grpcclient.InferInput("text_input", [len(prompts)], "BYTES")
    text.set_data_from_numpy(prompts)
    with pytest.raises(InferenceServerException) as info:
        grpc_client.infer(TEXT, [text], parameters={"max_new_tokens": -3})
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "max_new_tokens" in info.value.message()
    text = httpclient.InferInput("text_input", [len(prompts)], "BYTES")
    text.set_data_from_numpy(prompts)
    with pytest.raises(InferenceServerException) as info:
        http_client.infer(TEXT, [text], parameters={"max_new_tokens": -3})
    assert info.value.status() == "400"
    assert "max_new_tokens" in info.value.message()
