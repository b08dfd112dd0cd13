"""InferenceService over a real port: what a client sees on the wire."""

from __future__ import annotations

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from protoserve.inference.v1 import inference_service_pb2 as pb
from tests._observe import Generations, SlowCancelled, counted, wait_until
from tests.server.models_for_tests import Scripted


def params(**kw: object) -> pb.GenerationParameters:
    return pb.GenerationParameters(**kw)  # type: ignore[arg-type]


def error_of(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value


def field_violations(err: grpc.RpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status details on the error"
    found = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.description for v in bad.field_violations})
    return found


def test_list_models_describes_each_model(stub) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    bytelm = models["bytelm"]
    assert bytelm.state == pb.MODEL_STATE_READY
    assert set(bytelm.tasks) == {pb.TASK_TEXT_GENERATION, pb.TASK_EMBEDDING}
    specs = {p.name: p for p in bytelm.parameters}
    assert set(specs) == {
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "seed",
        "stop_sequences",
    }
    assert specs["max_new_tokens"].type == pb.PARAMETER_TYPE_INTEGER
    assert specs["max_new_tokens"].default_value.number_value == 64
    assert specs["max_new_tokens"].HasField("maximum")
    assert specs["temperature"].minimum == 0 and specs["top_p"].maximum == 1
    assert not specs["top_k"].HasField("maximum")
    assert specs["seed"].default_value.HasField("null_value")
    assert specs["stop_sequences"].type == pb.PARAMETER_TYPE_STRING_LIST
    assert {i.name for i in bytelm.inputs} == {"inputs"}
    assert models["doubler"].tasks == [pb.TASK_TENSOR_PREDICTION]
    assert models["doubler"].inputs[0].data_type == pb.DATA_TYPE_FLOAT32
    assert list(models["doubler"].inputs[0].shape) == [-1]
    assert models["broken"].state == pb.MODEL_STATE_FAILED
    assert "weights missing" in models["broken"].state_message


def test_get_model_and_not_found(stub) -> None:
    assert stub.GetModel(pb.GetModelRequest(name="bytelm"), timeout=10).model.name == "bytelm"
    err = error_of(lambda: stub.GetModel(pb.GetModelRequest(name="gpt-9"), timeout=10))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "gpt-9" in err.details() and "bytelm" in err.details()


def test_generate_returns_text_usage_and_is_reproducible_with_a_seed(stub) -> None:
    request = pb.GenerateRequest(
        model="bytelm", inputs="def ", parameters=params(max_new_tokens=24, seed=7)
    )
    first = stub.Generate(request, timeout=30)
    assert first.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_END_OF_TEXT)
    assert first.usage.prompt_tokens == 4
    assert first.usage.completion_tokens == len(first.token_ids) <= 24
    assert first.usage.total_tokens == 4 + len(first.token_ids)
    assert stub.Generate(request, timeout=30).generated_text == first.generated_text
    other = stub.Generate(
        pb.GenerateRequest(
            model="bytelm",
            inputs="def ",
            parameters=params(max_new_tokens=24, seed=8, temperature=1.5),
        ),
        timeout=30,
    )
    assert other.token_ids != first.token_ids


def test_stream_yields_token_by_token_and_matches_unary(stub) -> None:
    p = params(max_new_tokens=32, seed=3)
    messages = list(
        stub.GenerateStream(
            pb.GenerateStreamRequest(model="bytelm", inputs="import ", parameters=p), timeout=30
        )
    )
    assert len(messages) >= 2
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    assert all(not m.HasField("usage") for m in messages[:-1])
    last = messages[-1]
    assert last.finish_reason != pb.FINISH_REASON_UNSPECIFIED and last.HasField("usage")
    ids = [t for m in messages for t in m.token_ids]
    assert last.usage.completion_tokens == len(ids)
    unary = stub.Generate(
        pb.GenerateRequest(model="bytelm", inputs="import ", parameters=p), timeout=30
    )
    assert "".join(m.text for m in messages) == unary.generated_text
    assert ids == list(unary.token_ids)


def test_stop_sequence_ends_before_it_and_holds_back_partial_matches(stub) -> None:
    messages = list(
        stub.GenerateStream(
            pb.GenerateStreamRequest(
                model="scripted",
                parameters=params(stop_sequences=["STOP", "zzz"]),
            ),
            timeout=10,
        )
    )
    text = "".join(m.text for m in messages)
    assert text == "héllo wörld. "
    assert messages[-1].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert all("S" not in m.text for m in messages)  # "S" could start "STOP": held back
    # Multi-byte characters arrive whole, never as broken halves.
    assert all("\ufffd" not in m.text for m in messages)


def test_end_of_text_and_length(stub) -> None:
    whole = stub.Generate(pb.GenerateRequest(model="scripted"), timeout=10)
    assert whole.generated_text == Scripted.script.decode()
    assert whole.finish_reason == pb.FINISH_REASON_END_OF_TEXT
    cut = stub.Generate(
        pb.GenerateRequest(model="scripted", parameters=params(max_new_tokens=2)), timeout=10
    )
    # The limit cut "é" after its first byte: the half character shows as U+FFFD.
    assert cut.generated_text == "h\ufffd" and cut.finish_reason == pb.FINISH_REASON_LENGTH


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        (params(temperature=-1), "parameters.temperature"),
        (params(temperature=float("nan")), "parameters.temperature"),
        (params(top_p=1.5), "parameters.top_p"),
        (params(max_new_tokens=0), "parameters.max_new_tokens"),
        (params(max_new_tokens=10**6), "parameters.max_new_tokens"),
        (params(stop_sequences=[""]), "parameters.stop_sequences"),
        (params(stop_sequences=["a"] * 50), "parameters.stop_sequences"),
    ],
)
def test_bad_parameters_are_invalid_argument_naming_the_field(stub, parameters, field) -> None:
    err = error_of(
        lambda: stub.Generate(
            pb.GenerateRequest(model="bytelm", inputs="x", parameters=parameters), timeout=10
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details()
    assert field in field_violations(err)


def test_every_bad_parameter_is_reported_at_once(stub) -> None:
    err = error_of(
        lambda: stub.Generate(
            pb.GenerateRequest(model="bytelm", parameters=params(temperature=-1, top_p=2)),
            timeout=10,
        )
    )
    assert set(field_violations(err)) == {"parameters.temperature", "parameters.top_p"}


def test_wrong_task_and_missing_model_name(stub) -> None:
    err = error_of(lambda: stub.Predict(pb.PredictRequest(model="bytelm"), timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(err) == {
        "model": "model 'bytelm' does not serve tensor prediction (Predict)"
    }
    err = error_of(lambda: stub.Embed(pb.EmbedRequest(inputs=["a"]), timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "model" in field_violations(err)


def test_failed_model_is_unavailable(stub) -> None:
    err = error_of(lambda: stub.Embed(pb.EmbedRequest(model="broken", inputs=["a"]), timeout=10))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "weights missing" in err.details()


def test_model_exception_is_internal_with_request_id_and_no_traceback(stub, running) -> None:
    for call in (
        lambda: stub.Generate(
            pb.GenerateRequest(model="exploding"),
            timeout=10,
            metadata=[("x-request-id", "req-123")],
        ),
        lambda: list(
            stub.GenerateStream(
                pb.GenerateStreamRequest(model="exploding"),
                timeout=10,
                metadata=[("x-request-id", "req-123")],
            )
        ),
        lambda: stub.Embed(
            pb.EmbedRequest(model="exploding", inputs=["a"]),
            timeout=10,
            metadata=[("x-request-id", "req-123")],
        ),
    ):
        err = error_of(call)
        assert err.code() == grpc.StatusCode.INTERNAL
        assert "req-123" in err.details()
        assert "secret" not in err.details() and "Traceback" not in err.details()
    # The server goes on serving.
    assert (
        stub.Generate(
            pb.GenerateRequest(model="scripted", parameters=params(max_new_tokens=1)), timeout=10
        ).generated_text
        == "h"
    )


def test_request_id_is_echoed_or_made(stub) -> None:
    _, call = stub.GetModel.with_call(
        pb.GetModelRequest(name="bytelm"), timeout=10, metadata=[("x-request-id", "abc-1")]
    )
    assert dict(call.initial_metadata())["x-request-id"] == "abc-1"
    _, call = stub.GetModel.with_call(pb.GetModelRequest(name="bytelm"), timeout=10)
    assert len(dict(call.initial_metadata())["x-request-id"]) == 32


def test_embed_one_unit_vector_per_text(stub) -> None:
    texts = ["def f(x):", "import os", ""]
    response = stub.Embed(pb.EmbedRequest(model="bytelm", inputs=texts), timeout=10)
    vectors = torch.tensor([list(e.values) for e in response.embeddings])
    assert vectors.shape[0] == 3 and vectors.shape[1] > 8
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-4)
    alone = stub.Embed(pb.EmbedRequest(model="bytelm", inputs=["import os"]), timeout=10)
    # Alone and in a padded batch of 3: equal to rounding only, which varies by CPU
    # (measured: at most 3e-8 on every dispatch path; the three rows differ by > 0.18).
    assert torch.allclose(torch.tensor(alone.embeddings[0].values), vectors[1], atol=1e-4)
    raw = stub.Embed(
        pb.EmbedRequest(
            model="bytelm", inputs=["import os"], parameters=pb.EmbedParameters(normalize=False)
        ),
        timeout=10,
    )
    assert abs(torch.tensor(raw.embeddings[0].values).norm().item() - 1.0) > 1e-3
    assert response.usage.prompt_tokens == sum(len(t.encode()) for t in texts)


def test_embed_rejects_empty_and_oversized_batches(stub) -> None:
    err = error_of(lambda: stub.Embed(pb.EmbedRequest(model="bytelm"), timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "inputs" in field_violations(err)
    err = error_of(
        lambda: stub.Embed(pb.EmbedRequest(model="bytelm", inputs=["a"] * 1000), timeout=10)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_predict_round_trips_raw_little_endian_bytes(stub) -> None:
    x = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32)
    response = stub.Predict(
        pb.PredictRequest(
            model="doubler",
            inputs=[
                pb.Tensor(
                    name="x",
                    data_type=pb.DATA_TYPE_FLOAT32,
                    shape=[3],
                    raw_data=x.numpy().tobytes(),
                )
            ],
        ),
        timeout=10,
    )
    (y,) = response.outputs
    assert (y.name, y.data_type, list(y.shape)) == ("y", pb.DATA_TYPE_FLOAT32, [3])
    assert y.raw_data == (x * 2).numpy().astype("<f4").tobytes()


def test_predict_parameters_reach_the_model(stub) -> None:
    from google.protobuf import struct_pb2

    parameters = struct_pb2.Struct()
    parameters.update({"factor": 10})
    response = stub.Predict(
        pb.PredictRequest(
            model="doubler",
            parameters=parameters,
            inputs=[
                pb.Tensor(
                    name="x",
                    data_type=pb.DATA_TYPE_FLOAT32,
                    shape=[1],
                    raw_data=torch.tensor([1.0]).numpy().tobytes(),
                )
            ],
        ),
        timeout=10,
    )
    assert (
        torch.frombuffer(bytearray(response.outputs[0].raw_data), dtype=torch.float32).item() == 10
    )


@pytest.mark.parametrize(
    ("tensor", "field"),
    [
        (
            pb.Tensor(name="x", data_type=pb.DATA_TYPE_FLOAT32, shape=[3], raw_data=b"\0" * 8),
            "inputs[0].raw_data",
        ),
        (
            pb.Tensor(name="x", data_type=pb.DATA_TYPE_STRING, shape=[1], raw_data=b"a"),
            "inputs[0].data_type",
        ),
        (
            pb.Tensor(name="x", data_type=pb.DATA_TYPE_FLOAT32, shape=[-1], raw_data=b""),
            "inputs[0].shape",
        ),
        (
            pb.Tensor(name="", data_type=pb.DATA_TYPE_FLOAT32, shape=[1], raw_data=b"\0" * 4),
            "inputs[0].name",
        ),
        (
            pb.Tensor(name="x", data_type=pb.DATA_TYPE_INT32, shape=[1], raw_data=b"\0" * 4),
            "inputs[x].data_type",
        ),
        (
            pb.Tensor(name="x", data_type=pb.DATA_TYPE_FLOAT32, shape=[1, 1], raw_data=b"\0" * 4),
            "inputs[x].shape",
        ),
    ],
)
def test_malformed_tensors_are_invalid_argument(stub, tensor, field) -> None:
    err = error_of(
        lambda: stub.Predict(pb.PredictRequest(model="doubler", inputs=[tensor]), timeout=10)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(err)


def test_message_over_the_limit_is_refused_and_the_server_survives(running) -> None:
    big = pb.EmbedRequest(model="bytelm", inputs=["x" * (17 * 1024 * 1024)])
    err = error_of(lambda: running.stub.Embed(big, timeout=30))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert running.stub.GetModel(pb.GetModelRequest(name="bytelm"), timeout=10).model.name


def test_cancelling_a_stream_stops_the_work_on_the_server(running) -> None:
    cancelled = SlowCancelled(running.server)
    stream = running.stub.GenerateStream(
        pb.GenerateStreamRequest(model="slow", parameters=params(max_new_tokens=1000)), timeout=30
    )
    for _, _message in zip(range(5), stream, strict=False):
        pass
    stream.cancel()
    cancelled.wait()  # it stopped long before its 1000 tokens


def test_deadline_stops_the_work_on_the_server(running) -> None:
    cancelled = SlowCancelled(running.server)
    # 1 s: the call reaches the model on a busy machine; the generation would take 20 s.
    err = error_of(
        lambda: running.stub.Generate(
            pb.GenerateRequest(model="slow", parameters=params(max_new_tokens=1000)), timeout=1.0
        )
    )
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    cancelled.wait()


def test_full_queue_is_resource_exhausted_at_once_with_retry_info(running) -> None:
    # max_active=2, max_queue=4: six slow streams fill the model; the seventh is refused.
    scheduler = running.server.runtime.get_model("slow").scheduler
    rejected = counted(running.server, "protoserve_rejections_total", model="slow")
    streams = [
        running.stub.GenerateStream(
            pb.GenerateStreamRequest(model="slow", parameters=params(max_new_tokens=1000)),
            timeout=30,
        )
        for _ in range(6)
    ]
    try:
        wait_until(lambda: scheduler.depth + scheduler.active == 6, "six streams on the model")
        err = error_of(
            lambda: running.stub.Generate(
                pb.GenerateRequest(model="slow", parameters=params(max_new_tokens=1)), timeout=10
            )
        )
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
        assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
        # At once: refused on arrival and counted so, never queued behind the six.
        assert counted(running.server, "protoserve_rejections_total", model="slow") == rejected + 1
        assert scheduler.depth + scheduler.active == 6
    finally:
        for s in streams:
            s.cancel()
    # Capacity comes back once the cancelled streams are gone.
    wait_until(lambda: scheduler.depth + scheduler.active == 0, "the cancelled streams left")
    assert (
        running.stub.Generate(
            pb.GenerateRequest(model="slow", parameters=params(max_new_tokens=1)), timeout=10
        ).generated_text
        == "x"
    )


def test_concurrent_streams_interleave(running) -> None:
    """A short request is not stuck behind a long stream on the same model."""
    generations = Generations(running.server, "slow")
    scheduler = running.server.runtime.get_model("slow").scheduler
    long = running.stub.GenerateStream(
        pb.GenerateStreamRequest(model="slow", parameters=params(max_new_tokens=1000)), timeout=30
    )
    next(long)
    try:
        short = running.stub.Generate(
            pb.GenerateRequest(model="slow", parameters=params(max_new_tokens=3)), timeout=30
        )
        assert short.generated_text == "xxx"
        # The long stream still runs: the short one did not wait for its 1000 tokens.
        assert scheduler.active == 1
    finally:
        long.cancel()
    generations.wait_cancelled()
