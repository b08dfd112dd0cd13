"""Prometheus metrics, scraped over real HTTP from a server's ``/metrics`` endpoint."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import grpc
import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from protoserve.server.config import add_arguments, from_arguments
from protoserve.server.runtime.model import Decoding
from tests._observe import wait_until
from tests._threads import start_grpc_server, stop_grpc_server

RID = "request-id-that-must-not-be-a-label"
METHODS = {m.name for m in pb.DESCRIPTOR.services_by_name["InferenceService"].methods}
CODES = {c.name for c in grpc.StatusCode}
MODELS = {"scripted", "slow"}


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, pb_grpc.InferenceServiceStub]]:
    thread, server = start_grpc_server(
        ("tests.server.models_for_tests:Scripted", "tests.server.models_for_tests:Slow"),
        max_queue=1,
        max_active=1,
        metrics_port=0,
    )
    assert server.metrics_port
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield f"http://127.0.0.1:{server.metrics_port}/metrics", pb_grpc.InferenceServiceStub(channel)
    channel.close()
    stop_grpc_server(thread, server)


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample: (name, labels) -> value."""
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    assert RID not in response.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str):
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(url: str, name: str, want: float, **labels: str):
    """Scrape until the sample is ``want``; that scrape's samples."""
    scraped: list[dict[tuple[str, frozenset[tuple[str, str]]], float]] = []

    def reached() -> bool:
        scraped.append(scrape(url))
        return value(scraped[-1], name, **labels) == want

    wait_until(reached, f"{name}{labels} == {want}")
    return scraped[-1]


def params(n: int) -> pb.GenerationParameters:
    return pb.GenerationParameters(max_new_tokens=n)


def test_metrics_count_calls_tokens_cancellations_and_rejections(served) -> None:
    url, stub = served
    md = (("x-request-id", RID),)
    before = scrape(url)
    assert value(before, "protoserve_queue_depth", model="slow") == 0
    assert value(before, "protoserve_rejections_total", model="slow") == 0

    completion = 0
    for n in (3, 3):
        reply = stub.Generate(
            pb.GenerateRequest(model="scripted", parameters=params(n)), metadata=md, timeout=10
        )
        completion += reply.usage.completion_tokens
    *_, last = stub.GenerateStream(
        pb.GenerateStreamRequest(model="scripted", parameters=params(2)), metadata=md, timeout=10
    )
    assert last.HasField("usage"), "the last message of a stream carries its usage"
    completion += last.usage.completion_tokens
    with pytest.raises(grpc.RpcError) as unknown:
        stub.Generate(pb.GenerateRequest(model=RID), metadata=md, timeout=10)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    # max_active=1, max_queue=1: one slow stream runs, one waits, a third is refused.
    running = stub.GenerateStream(
        pb.GenerateStreamRequest(model="slow", parameters=params(1000)), metadata=md, timeout=30
    )
    next(running)
    waiting = stub.GenerateStream(
        pb.GenerateStreamRequest(model="slow", parameters=params(1000)), metadata=md, timeout=30
    )
    samples = wait_for(url, "protoserve_queue_depth", 1, model="slow")
    assert value(samples, "protoserve_queue_depth", model="slow") == 1
    assert value(samples, "protoserve_streams_in_flight", model="slow") == 2
    with pytest.raises(grpc.RpcError) as full:
        stub.Generate(pb.GenerateRequest(model="slow", parameters=params(1)), timeout=10)
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The waiting one first: cancelled the other way round, the queue could admit it
    # between the two cancels, and it would no longer have been cancelled in the queue.
    waiting.cancel()
    wait_for(url, "protoserve_queue_depth", 0, model="slow")
    running.cancel()

    s = wait_for(url, "protoserve_cancellations_total", 2, model="slow")
    s = wait_for(url, "protoserve_requests_total", 2, method="GenerateStream", code="CANCELLED")
    assert value(s, "protoserve_requests_total", method="Generate", code="OK") == 2
    assert value(s, "protoserve_requests_total", method="GenerateStream", code="OK") == 1
    assert value(s, "protoserve_requests_total", method="Generate", code="NOT_FOUND") == 1
    assert value(s, "protoserve_requests_total", method="Generate", code="RESOURCE_EXHAUSTED") == 1
    assert value(s, "protoserve_requests_total", method="GenerateStream", code="CANCELLED") == 2
    assert value(s, "protoserve_request_duration_seconds_count", method="Generate") == 4
    assert value(s, "protoserve_rejections_total", model="slow") == 1
    assert value(s, "protoserve_cancellations_total", model="slow") == 2
    assert value(s, "protoserve_cancellations_total", model="scripted") == 0
    assert value(s, "protoserve_streams_in_flight", model="slow") == 0
    assert value(s, "protoserve_queue_depth", model="slow") == 0
    assert completion == 8
    assert value(s, "protoserve_generated_tokens_total", model="scripted") == completion
    assert value(s, "protoserve_time_to_first_token_seconds_count", model="scripted") == 3
    # A gap between successive chunks read: the scripted model yields one token per
    # chunk, so at most one before every token but each generation's first (5); a reader
    # that fell behind reads several tokens as one chunk (ADR 20), as a busy machine
    # makes happen, and then there are fewer.
    gaps = value(s, "protoserve_inter_token_latency_seconds_count", model="scripted")
    assert 0 < gaps <= completion - 3
    assert value(s, "protoserve_queue_duration_seconds_count", model="scripted") == 3
    # The waiting stream was cancelled in the queue: it never started, so no queue time.
    assert value(s, "protoserve_queue_duration_seconds_count", model="slow") == 1
    # How each model's generations decode: these models have no batch decoder.
    assert value(s, "protoserve_model_decoding", model="scripted", decoding="sequential") == 1
    # Exported at 0 for the others (present, not merely absent).
    labels = frozenset({("model", "slow"), ("decoding", "batched")})
    assert s[("protoserve_model_decoding", labels)] == 0

    # Labels come from bounded sets only: never a request id or an unknown model's name.
    decodings = {d.value for d in Decoding}
    # Where each model runs (protoserve_model_device): this machine's devices, 3 dtypes.
    devices = {"cpu"} | {f"cuda:{i}" for i in range(torch.cuda.device_count())}
    allowed = {
        "method": METHODS,
        "code": CODES,
        "model": MODELS,
        "decoding": decodings,
        "device": devices,
        "dtype": {"float32", "float16", "bfloat16"},
    }
    seen = {(key, label) for _, series in s for key, label in series if key != "le"}
    assert {key for key, _ in seen} == set(allowed)
    assert {(key, label) for key, label in seen if label not in allowed[key]} == set()


def test_metrics_port_flag_and_environment() -> None:
    def parse(argv: list[str], env: dict[str, str]) -> int | None:
        parser = argparse.ArgumentParser()
        add_arguments(parser, env)
        return from_arguments(parser.parse_args(argv), env).metrics_port

    assert parse([], {}) is None
    assert parse([], {"PROTOSERVE_METRICS_PORT": "0"}) == 0
    assert parse(["--metrics-port", "9100"], {"PROTOSERVE_METRICS_PORT": "0"}) == 9100


def test_metrics_endpoint_is_off_by_default(running) -> None:
    assert running.server.metrics_port is None
