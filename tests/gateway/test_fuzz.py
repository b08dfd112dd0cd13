"""Requests generated from the gateway's own ``/openapi.json`` (schemathesis), sent to a
real server behind a gateway built from each descriptor source.

What a user must never see, whatever they send: a 5xx, a dropped connection, or a
body that is not JSON where the document declares JSON. Each source gets a few
hundred requests here, derandomized so that a run is repeatable; ``nox -s fuzz`` runs
many more, with fresh randomness (``PROTOSERVE_FUZZ_EXAMPLES``, ``PROTOSERVE_FUZZ_SEEDED``).
Each source's run is bounded in time as well (``PROTOSERVE_FUZZ_SECONDS``, 90 s).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from protoserve.gateway import Descriptors, build_gateway, from_reflection
from tests._threads import LoopThread, UvicornThread, start_grpc_server, stop_grpc_server
from tests.gateway._sources import SOURCES, descriptors_for

#: Generated requests per operation and generation mode (valid and invalid inputs).
EXAMPLES = int(os.environ.get("PROTOSERVE_FUZZ_EXAMPLES", "12"))
#: Seconds one source's run may take: past it, generated requests are no longer sent,
#: so a slow or busy machine sends fewer rather than running long (the suite's run
#: takes about 15 s a source on 2 cores).
SECONDS = float(os.environ.get("PROTOSERVE_FUZZ_SECONDS", "90"))
#: Derandomized (the same requests every run) unless the longer run asks otherwise.
DERANDOMIZE = os.environ.get("PROTOSERVE_FUZZ_SEEDED", "1") != "0"
#: Well-behaved models only: none that raises, blocks or sleeps by design.
MODELS = (
    "bytelm",
    "tests.server.models_for_tests:Doubler",
    "tests.server.models_for_tests:EchoText",
)
MODEL_NAMES = ("bytelm", "doubler", "echo-text")
#: Path parameters that name a model: half the requests name one that exists.
MODEL_PARAMETERS = ("model", "name", "model_name")

#: Operations left out, each with the reason. Keep this list short and narrow.
EXCLUDED = {
    # A watch streams the serving status until the client leaves, by design: it never
    # ends by itself, so there is no whole response to check.
    ("POST", "/grpc.health.v1.Health/Watch"),
}


@dataclass
class Upstream:
    thread: LoopThread
    server: Any

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    # A server of its own, with model control on: the generated requests load and unload.
    thread, server = start_grpc_server(MODELS, max_queue=4, max_active=4, model_control=True)
    yield Upstream(thread, server)
    stop_grpc_server(thread, server)


def fuzz_descriptors(source: str, target: str) -> Descriptors:
    # Reflection as `protoserve gateway --from-reflection` does it: every service the
    # upstream lists (Health too), which is what the fuzzing found broken.
    return from_reflection(target) if source == "reflection" else descriptors_for(source, target)


@pytest.fixture(params=SOURCES)
def gateway(request: pytest.FixtureRequest, upstream: Upstream) -> Iterator[str]:
    served = UvicornThread(
        build_gateway(
            upstream.target,
            descriptors=fuzz_descriptors(str(request.param), upstream.target),
            keepalive=0.5,
            max_body_bytes=64 * 1024,
        )
    )
    yield served.url
    served.stop()


def declared_types(operation: Any, status: int) -> list[str]:
    """The media types the document declares for ``status`` (else for ``default``)."""
    responses = operation.definition.raw.get("responses", {})
    declared = responses.get(str(status)) or responses.get("default") or {}
    return list(declared.get("content", {}))


def problem_with(operation: Any, response: schemathesis.Response) -> str | None:
    """What a user would call broken in ``response``, or None."""
    if response.status_code >= 500:
        return f"HTTP {response.status_code}: {response.content[:300]!r}"
    declared = declared_types(operation, response.status_code)
    if "application/json" not in declared:
        return None
    media_type = (response.headers.get("content-type") or [""])[0].split(";")[0].strip()
    if media_type not in declared:
        return f"HTTP {response.status_code} as {media_type!r}, not one of {declared}"
    if media_type == "application/json":
        try:
            json.loads(response.content)
        except ValueError:
            return f"HTTP {response.status_code}, not JSON: {response.content[:300]!r}"
    return None


def cases(operation: Any, mode: GenerationMode) -> st.SearchStrategy[Any]:
    """Requests for ``operation``: any path values, or a model that exists."""
    names = [p.name for p in operation.path_parameters if p.name in MODEL_PARAMETERS]
    anything = operation.as_strategy(mode)
    if not names:
        return anything
    existing = st.sampled_from(MODEL_NAMES).flatmap(
        lambda model: operation.as_strategy(mode, path_parameters=dict.fromkeys(names, model))
    )
    return st.one_of(anything, existing)


def modes(operation: Any) -> tuple[GenerationMode, ...]:
    """Valid requests for every operation; invalid ones where there is something to get
    wrong besides the path, whose values are any string: a body, query parameters."""
    if len(operation.body) or len(operation.query):
        return (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    return (GenerationMode.POSITIVE,)


def fuzz(
    operation: Any,
    mode: GenerationMode,
    base_url: str,
    found: Callable[[str], None],
    until: float = math.inf,
) -> int:
    """Send up to ``EXAMPLES`` requests of ``mode`` until ``until`` (time.monotonic());
    report each problem; returns how many were sent."""
    sent = 0
    with requests.Session() as session:  # keep-alive: a dropped connection shows

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=DERANDOMIZE,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=cases(operation, mode))
        def run(case: Any) -> None:
            nonlocal sent
            if time.monotonic() > until:
                return
            sent += 1
            try:
                response = case.call(base_url=base_url, session=session, timeout=30)
            except requests.RequestException as exc:
                found(f"{case.as_curl_command()}\n    no response: {exc}")
                return
            problem = problem_with(operation, response)
            if problem is not None:
                found(f"{case.as_curl_command()}\n    {problem}")

        try:
            run()
        except Unsatisfiable:
            # Nothing in this body or query can be made invalid (all optional strings).
            assert mode is GenerationMode.NEGATIVE, f"no valid request for {operation.label}"
    assert sent or mode is GenerationMode.NEGATIVE or time.monotonic() > until, (
        f"no request sent to {operation.label}"
    )
    return sent


def test_generated_requests_get_no_5xx_and_json_where_declared(gateway: str) -> None:
    document = httpx.get(f"{gateway}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(document)
    problems: list[str] = []
    sent = 0
    until = time.monotonic() + SECONDS
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in EXCLUDED:
            continue
        for mode in modes(operation):
            sent += fuzz(operation, mode, gateway, problems.append, until)
    print(f"{sent} requests")  # shown with -s, as `nox -s fuzz` runs it
    assert not problems, f"{len(problems)} of {sent} requests:\n" + "\n".join(problems[:20])
