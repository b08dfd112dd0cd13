"""How each model's generations decode, as an operator sees it: the start-up log,
GetModel's ``decoding``, and ``protoserve_model_decoding`` on /metrics.

By default a model with a batch decoder decodes batched (to float rounding); with
``--batch-invariant`` only a decoder that promises bit-for-bit lone tokens is used;
where the model or this machine takes batching away, a warning says so and why.
"""

from __future__ import annotations

import contextlib
import logging
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from protoserve.server.models.bytelm import BatchedDecoding, load_pretrained
from tests._threads import start_grpc_server, stop_grpc_server

BATCHED = "tests.server.models_for_tests:Batched"
NO_EOT = "tests.server.models_for_tests:NoEndOfText"
DOUBLER = "tests.server.models_for_tests:Doubler"


@contextlib.contextmanager
def _serve(
    models: list[str], **config: object
) -> Iterator[tuple[pb_grpc.InferenceServiceStub, int]]:
    thread, server = start_grpc_server(models, metrics_port=0, **config)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield pb_grpc.InferenceServiceStub(channel), server.metrics_port
    finally:
        channel.close()
        stop_grpc_server(thread, server)


def _decoding(stub: pb_grpc.InferenceServiceStub, name: str) -> str:
    model = stub.GetModel(pb.GetModelRequest(name=name), timeout=10).model
    return pb.Decoding.Name(model.decoding)


def decoding_gauges(port: int) -> dict[tuple[str, str], float]:
    """protoserve_model_decoding by (model, decoding), scraped from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.labels["model"], s.labels["decoding"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "protoserve_model_decoding"
        for s in family.samples
    }


def _lines(caplog: pytest.LogCaptureFixture, model: str) -> list[tuple[int, str]]:
    prefix = f"model {model}: "
    return [
        (r.levelno, r.getMessage()) for r in caplog.records if r.getMessage().startswith(prefix)
    ]


def _generates(stub: pb_grpc.InferenceServiceStub, model: str) -> str:
    parameters = pb.GenerationParameters(max_new_tokens=8, seed=1)
    request = pb.GenerateRequest(model=model, inputs="def ", parameters=parameters)
    return stub.Generate(request, timeout=60).generated_text


def test_by_default_generations_decode_batched_and_the_server_says_how(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="protoserve.server")
    with _serve(["bytelm", BATCHED, NO_EOT, DOUBLER], max_active=8) as (stub, port):
        assert _decoding(stub, "bytelm") == "DECODING_BATCHED"
        assert _decoding(stub, "batched") == "DECODING_BATCHED"  # a decoder's own default
        assert _decoding(stub, "doubler") == "DECODING_UNSPECIFIED"  # generates nothing
        assert _decoding(stub, "no-eot") == "DECODING_SEQUENTIAL"
        gauges = decoding_gauges(port)
        assert gauges[("bytelm", "batched")] == 1.0
        assert gauges[("bytelm", "batched-exact")] == gauges[("bytelm", "sequential")] == 0.0
        assert gauges[("no-eot", "sequential")] == 1.0
        # A model that generates nothing: every value 0 (the labels are a bounded set).
        assert [v for (model, _), v in gauges.items() if model == "doubler"] == [0.0] * 3
        # The model whose batched step the check refused still serves, one at a time.
        assert len(_generates(stub, "no-eot").encode()) == 8
    assert _lines(caplog, "bytelm") == [
        (
            logging.INFO,
            "model bytelm: generations decode batched, up to 8 per step; each gets its lone "
            "tokens to float rounding (--batch-invariant: bit for bit)",
        )
    ]
    assert _lines(caplog, "doubler") == []
    [(level, warning)] = _lines(caplog, "no-eot")
    assert level == logging.WARNING
    # What happened, why, on which dispatch path, and what it costs.
    assert warning.startswith("model no-eot: generations decode one sequence at a time: ")
    assert "off by inf of the largest logit, more than float32 rounding allows (1e-04)" in warning
    assert ", on ATen " in warning and "MKL_ENABLE_INSTRUCTIONS=" in warning
    assert "runs the model once per sequence (for bytelm at 32 streams: a fifth" in warning


def test_batch_invariant_uses_only_decoders_that_promise_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="protoserve.server")
    # What bytelm's exact check finds on this CPU decides between the two outcomes.
    exact_here = BatchedDecoding(load_pretrained(), 4, exact=True).batched
    with _serve(["bytelm", BATCHED], max_active=4, batch_invariant=True) as (stub, port):
        want = "DECODING_BATCHED_EXACT" if exact_here else "DECODING_SEQUENTIAL"
        assert _decoding(stub, "bytelm") == want
        # LetterDecoder promises no more than rounding: generations take turns instead.
        assert _decoding(stub, "batched") == "DECODING_SEQUENTIAL"
        assert decoding_gauges(port)[("batched", "sequential")] == 1.0
        assert len(_generates(stub, "batched")) == 8
    [(level, line)] = _lines(caplog, "bytelm")
    if exact_here:
        assert (level, line) == (
            logging.INFO,
            "model bytelm: generations decode batched, up to 4 per step; each gets bit for "
            "bit its lone tokens",
        )
    else:
        assert level == logging.WARNING and "not bit-exact on this machine's kernels" in line
        assert "without --batch-invariant it decodes batched" in line
    [(level, line)] = _lines(caplog, "batched")
    assert level == logging.WARNING
    assert line.startswith("model batched: generations take turns, one step each: ")
    assert "--batch-invariant asks that each get bit for bit its lone tokens" in line
    assert "which its batch decoder does not promise" in line


def test_without_batching_generations_take_turns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="protoserve.server")
    with _serve(["bytelm"], batching=False) as (stub, _):
        assert _decoding(stub, "bytelm") == "DECODING_SEQUENTIAL"
    assert _lines(caplog, "bytelm") == [
        (logging.INFO, "model bytelm: generations take turns, one step each (batching is off)")
    ]
