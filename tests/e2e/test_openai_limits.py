"""The ``openai`` package against a server that is full: ``--max-streams 1``, so that one
open stream of the ``slow`` test model (20 ms a token, never done by itself) fills it.

``--max-streams`` bounds streaming calls, so the requests here stream. The SDK turns
the 429 into ``RateLimitError`` when told not to retry, and when it may,
waits for the ``Retry-After`` the gateway sends (1 s, the server's RetryInfo) and tries
again. What frees the server is the test's own move (it closes the open stream when the
429 arrives), never a clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

from tests._observe import wait_until
from tests.e2e.test_openai_sdk import CHAT, TEST_MODELS, Stack, start_stack, stop_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A server that takes one stream at a time (no tokens needed), and its gateway."""
    tmp = tmp_path_factory.mktemp("openai-limits")
    started = start_stack(tmp, "--model", f"{TEST_MODELS}:Slow", "--max-streams", "1")
    yield started
    stop_stack(started)


def open_stream(full: Stack, client: openai.OpenAI) -> Any:
    """A stream of ``slow``, under way (its first chunk read): the server is full."""
    stream = client.chat.completions.create(
        model="slow", messages=CHAT, max_tokens=1000, stream=True
    )
    next(iter(stream))
    assert full.in_flight("slow") == 1
    return stream


def test_a_full_server_is_a_rate_limit_error_with_retry_after(full: Stack) -> None:
    with full.client() as client:
        blocker = open_stream(full, client)
        try:
            with pytest.raises(openai.RateLimitError) as info:
                client.chat.completions.create(
                    model="slow", messages=CHAT, max_tokens=2, stream=True
                )
            assert info.value.status_code == 429
            assert info.value.response.headers["retry-after"] == "1"
            assert info.value.type and info.value.message
        finally:
            blocker.close()
    wait_until(lambda: full.in_flight("slow") == 0, "the blocking stream ended")


def test_more_choices_than_the_server_ever_holds_are_a_bad_request(full: Stack) -> None:
    # Two streams can never be in flight at once here: a 429 would be retried in vain.
    with full.client() as client:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model="slow", messages=CHAT, max_tokens=2, stream=True, n=2
            )
    assert info.value.param == "n"
    assert "holds at most 1 at a time" in info.value.message


def test_the_sdk_waits_for_retry_after_and_tries_again(full: Stack) -> None:
    statuses: list[int] = []

    with full.client() as client:
        blocker = open_stream(full, client)

        def on_response(response: httpx2.Response) -> None:
            """Free the server once it said 429: the SDK's retry then finds room."""
            statuses.append(response.status_code)
            if response.status_code == 429:
                blocker.close()
                wait_until(lambda: full.in_flight("slow") == 0, "the blocking stream ended")

        hooks = {"response": [on_response]}
        with full.client(
            max_retries=1, http_client=openai.DefaultHttpxClient(event_hooks=hooks)
        ) as retrying:
            with retrying.chat.completions.create(
                model="slow", messages=CHAT, max_tokens=3, stream=True
            ) as stream:
                chunks = [c for c in stream if c.choices]
    assert statuses == [429, 200]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "xxx"
    assert chunks[-1].choices[0].finish_reason == "length"
