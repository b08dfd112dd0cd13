"""The same application code against a model in this process and behind a server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from protoserve.clients import Client, InvalidArgument, LocalClient, NotFound
from tests.server.models_for_tests import Slow


def application(client: Any) -> dict[str, Any]:
    """An app written once against the client API."""
    reply = client.generate("def ", model="bytelm", max_new_tokens=16, seed=5)
    stream = client.generate_stream("import ", model="bytelm", max_new_tokens=12, seed=2)
    chunks = list(stream)
    vectors = client.embed(["a b", "c"], model="bytelm")
    doubled = client.predict({"x": np.arange(3, dtype=np.float32)}, model="doubler")
    return {
        "text": str(reply),
        "finish": reply.finish_reason,
        "usage": reply.usage,
        "stream": "".join(chunks),
        "stream_finish": stream.finish_reason,
        "stream_usage": stream.usage,
        "shape": tuple(vectors.shape),
        "y": doubled["y"].tolist(),
        "y_type": type(doubled["y"]),
        "models": {m.name: (m.state, m.tasks) for m in client.models()},
    }


@pytest.fixture(scope="module")
def local() -> Iterator[LocalClient]:
    with LocalClient(
        "bytelm", "tests.server.models_for_tests:Doubler", "tests.server.models_for_tests:Slow"
    ) as client:
        yield client


def test_same_code_same_results_locally_and_remotely(local: LocalClient, target: str) -> None:
    with Client(target) as remote:
        here, there = application(local), application(remote)
    assert here.pop("models")["bytelm"] == there.pop("models")["bytelm"]
    assert here == there


def test_same_exceptions(local: LocalClient, target: str) -> None:
    with Client(target) as remote:
        for client in (local, remote):
            with pytest.raises(NotFound):
                client.generate("x", model="gpt-9")
            with pytest.raises(InvalidArgument) as info:
                client.generate("x", model="bytelm", temperature=-1)
            assert [v.field for v in info.value.field_violations] == ["parameters.temperature"]
            with pytest.raises(TypeError, match="bogus"):
                client.generate("x", model="bytelm", bogus=1)


def test_leaving_a_local_stream_early_stops_the_model(local: LocalClient) -> None:
    Slow.closed.clear()
    before = Slow.steps
    for _ in zip(
        range(3), local.generate_stream("", model="slow", max_new_tokens=1000), strict=False
    ):
        pass
    assert Slow.closed.wait(5)
    assert Slow.steps - before < 20
