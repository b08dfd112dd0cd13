"""The gRPC clients against a real server: values, streams, cancellation, errors."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from protoserve.clients._channel import service_config
from protoserve.clients._errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from protoserve.clients._grpc import Client
from protoserve.clients._grpc_aio import AsyncClient
from protoserve.clients._types import FinishReason, Generation
from tests._observe import WITHIN, Generations, SlowCancelled, wait_until_async
from tests._threads import LoopThread, start_grpc_server, stop_grpc_server

PROMPT = "def main("


@pytest.fixture
def client(target: str) -> Iterator[Client]:
    with Client(target, model="bytelm", timeout=30) as client:
        yield client


def test_generate_returns_a_str_with_metadata(client: Client) -> None:
    text = client.generate(PROMPT, max_new_tokens=8, seed=1)
    assert isinstance(text, Generation) and isinstance(text, str)
    assert text.finish_reason in (FinishReason.LENGTH, FinishReason.END_OF_TEXT)
    assert text.usage.completion_tokens == len(text.token_ids) <= 8
    assert text.model == "bytelm"
    assert PROMPT + text == PROMPT + str(text)


def test_same_seed_same_text_and_stream_joins_to_it(client: Client) -> None:
    first = client.generate(PROMPT, max_new_tokens=16, seed=7, temperature=1.0)
    assert client.generate(PROMPT, max_new_tokens=16, seed=7, temperature=1.0) == first
    stream = client.generate_stream(PROMPT, max_new_tokens=16, seed=7, temperature=1.0)
    chunks = list(stream)
    assert all(chunks)
    assert "".join(chunks) == first
    assert stream.finish_reason == first.finish_reason
    assert stream.usage == first.usage
    assert stream.token_ids == first.token_ids


def test_unknown_keyword_is_a_type_error_before_any_call(client: Client) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'stop'"):
        client.generate(PROMPT, stop=["\n"])


def test_breaking_out_of_a_stream_stops_the_server(client: Client, server: Any) -> None:
    cancelled = SlowCancelled(server)
    # Kept referenced on purpose: the break itself must stop it, not garbage collection.
    stream = client.generate_stream("x", model="slow", max_new_tokens=1000)
    for _ in stream:
        break
    cancelled.wait()
    assert stream.finish_reason is FinishReason.CANCELLED


def test_closing_the_client_cancels_its_streams(target: str, server: Any) -> None:
    cancelled = SlowCancelled(server)
    client = Client(target, model="slow")
    stream = client.generate_stream("x", max_new_tokens=1000)
    assert next(stream)
    client.close()
    cancelled.wait()


def test_embed_shapes(client: Client) -> None:
    one = client.embed("hello")
    batch = client.embed(["hello", "world", "!"])
    assert one.dtype == torch.float32 and one.dim() == 1
    assert batch.shape == (3, one.shape[0])
    # Batched with padding: equal to rounding only, which varies by CPU (measured:
    # at most 3e-8 on every dispatch path; different texts differ by > 0.18).
    assert torch.allclose(batch[0], one, atol=1e-5)
    assert torch.allclose(batch.norm(dim=1), torch.ones(3), atol=1e-4)


def test_predict_torch_and_numpy(client: Client) -> None:
    out = client.predict({"x": torch.tensor([1.0, 2.5])}, model="doubler")
    assert isinstance(out["y"], torch.Tensor)
    assert torch.equal(out["y"], torch.tensor([2.0, 5.0]))
    out = client.predict(
        {"x": np.array([1.0, -1.0], dtype=np.float32)}, model="doubler", parameters={"factor": 3}
    )
    assert isinstance(out["y"], np.ndarray)
    np.testing.assert_array_equal(out["y"], [3.0, -3.0])


def test_model_defaults_to_the_only_one_else_value_error(target: str) -> None:
    with Client(target) as client:
        names = [m.name for m in client.models()]
        assert names == ["bytelm", "doubler", "slow", "scripted"]
        assert client.model("bytelm").ready
        with pytest.raises(ValueError, match="bytelm, doubler, slow, scripted"):
            client.generate("x")


def test_typed_errors(client: Client, server: Any) -> None:
    generations = Generations(server, "slow")
    with pytest.raises(NotFound) as not_found:
        client.generate("x", model="nope")
    assert not_found.value.__suppress_context__
    with pytest.raises(NotFound):
        client.model("nope")
    with pytest.raises(InvalidArgument) as invalid:
        client.generate("x", temperature=-1)
    assert [v.field for v in invalid.value.field_violations] == ["parameters.temperature"]
    with pytest.raises(DeadlineExceeded):
        client.generate("x", model="slow", max_new_tokens=1000, timeout=1.0)
    stream = client.generate_stream("x", model="slow", max_new_tokens=1000, timeout=1.0)
    with pytest.raises(DeadlineExceeded):
        list(stream)
    # Both deadlines reached the server; counted before the next test looks at the count.
    generations.wait_cancelled(2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_a_dead_server_is_unavailable_not_waited_for() -> None:
    # A client that waited for the server to come up would end at the deadline instead.
    target = f"127.0.0.1:{_free_port()}"
    with Client(target, model="bytelm", retries=1, timeout=WITHIN) as client:
        with pytest.raises(Unavailable):
            client.generate("x")


def test_retries_reach_a_server_that_comes_up_late() -> None:
    from protoserve.server import InferenceServer, ServerConfig
    from protoserve.server.runtime.loader import load_model_spec

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WITHIN)
    port = listener.getsockname()[1]
    thread = LoopThread()
    late: dict[str, Any] = {}

    async def start() -> None:
        server = InferenceServer(
            ServerConfig(port=port, shutdown_grace=1),
            [load_model_spec("tests.server.models_for_tests:Doubler")],
        )
        await server.start()
        late["server"] = server

    def come_up_after_the_first_attempt() -> None:
        # The client's first connection is closed on it, and only then does the server start.
        connection, _ = listener.accept()
        connection.close()
        listener.close()
        thread.run(start())

    starter = threading.Thread(target=come_up_after_the_first_attempt)
    starter.start()
    try:
        with Client(f"127.0.0.1:{port}", model="doubler", retries=5, timeout=WITHIN) as client:
            out = client.predict({"x": torch.ones(2)})
        np.testing.assert_array_equal(out["y"], [2.0, 2.0])
    finally:
        starter.join()
        if "server" in late:
            stop_grpc_server(thread, late["server"])
        else:
            thread.stop()


def test_service_config_retries_unavailable_on_every_method() -> None:
    config = service_config(retries=5, balance=True)
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "protoserve.inference.v1.InferenceService"}]
    assert method["retryPolicy"]["maxAttempts"] == 6
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    json.dumps(config)


def test_several_endpoints_survive_one_going_away() -> None:
    servers = [start_grpc_server(["tests.server.models_for_tests:Doubler"]) for _ in range(2)]
    endpoints = [f"127.0.0.1:{server.port}" for _, server in servers]
    try:
        with Client(endpoints, model="doubler", timeout=10) as client:
            for _ in range(4):
                client.predict({"x": torch.ones(1)})
            stop_grpc_server(*servers.pop())
            for _ in range(4):
                np.testing.assert_array_equal(client.predict({"x": torch.ones(1)})["y"], [2.0])
    finally:
        for thread, server in servers:
            stop_grpc_server(thread, server)


def test_several_endpoints_must_be_addresses() -> None:
    with pytest.raises(ValueError, match="dns:///"):
        Client(["a.example:1", "b.example:1"])


def test_async_client_mirrors_the_sync_one(target: str, server: Any) -> None:
    generations = Generations(server, "slow")

    async def main() -> None:
        async with AsyncClient(target, model="bytelm", timeout=30) as client:
            text = await client.generate(PROMPT, max_new_tokens=12, seed=3, temperature=1.0)
            assert isinstance(text, Generation) and text.finish_reason is not None
            stream = client.generate_stream(PROMPT, max_new_tokens=12, seed=3, temperature=1.0)
            assert "".join([chunk async for chunk in stream]) == text
            assert stream.usage == text.usage
            assert (await client.embed(["a", "b"])).shape[0] == 2
            out = await client.predict({"x": np.ones(2, dtype=np.float32)}, model="doubler")
            np.testing.assert_array_equal(out["y"], [2.0, 2.0])
            with pytest.raises(NotFound):
                await client.generate("x", model="nope")
            with pytest.raises(InvalidArgument):
                await client.generate("x", temperature=-1)
            with pytest.raises(DeadlineExceeded):
                await client.generate("x", model="slow", max_new_tokens=1000, timeout=1.0)
            with pytest.raises(TypeError):
                client.generate_stream("x", stop="\n")

    asyncio.run(main())
    generations.wait_cancelled()  # the deadline reached the server


def test_async_stream_early_exit_stops_the_server(target: str, server: Any) -> None:
    cancelled = SlowCancelled(server)

    async def main() -> None:
        async with AsyncClient(target, model="slow") as client:
            async for _ in client.generate_stream("x", max_new_tokens=1000):
                break
            # asyncio finalizes the abandoned iterator on this loop: it runs on meanwhile,
            # and the client stays open, so that the early exit alone stops the server.
            await wait_until_async(
                lambda: cancelled.generations.cancelled() > cancelled.generations.cancelled_before,
                "the early exit cancelled the generation",
            )

    asyncio.run(main())
    cancelled.wait()


def test_async_dead_server_is_unavailable() -> None:
    async def main() -> None:
        async with AsyncClient(f"127.0.0.1:{_free_port()}", model="x", retries=1) as client:
            with pytest.raises(Unavailable):
                await client.generate("x")

    asyncio.run(main())
