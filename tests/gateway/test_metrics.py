"""The gateway's ``/metrics``: requests by route template, streams in flight, upstream errors."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protoserve.gateway import build_gateway
from tests import _sse
from tests._observe import wait_until
from tests._threads import UvicornThread

SECRET = "no-such-model-a1b2c3"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def gateway(stack) -> Iterator[tuple[httpx.Client, list[str]]]:
    """A gateway of its own in front of the shared server, so its counts start at zero."""
    app = build_gateway(stack.grpc_target, keepalive=0.5)
    served = UvicornThread(app)
    patterns = sorted({b.template.pattern for b in app.state.gateway.bindings})
    with httpx.Client(base_url=served.url, timeout=30) as client:
        yield client, patterns
    served.stop()


def scrape(http: httpx.Client) -> Samples:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert SECRET not in response.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_by_route_template(gateway) -> None:
    http, patterns = gateway
    assert "/v1/models/{name}" in patterns
    assert http.get("/v1/models").status_code == 200
    assert http.get("/v1/models/scripted").status_code == 200
    assert http.get(f"/v1/models/{SECRET}").status_code == 404
    generate = "/v1/models/scripted:generate"
    body = {"inputs": "", "parameters": {"max_new_tokens": 2}}
    assert http.post(generate, json=body).status_code == 200
    assert http.post(f"/v1/models/{SECRET}:generate", json=body).status_code == 404
    assert http.get(f"/nowhere/{SECRET}").status_code == 404
    with http.stream(
        "POST",
        "/v1/models/scripted:generateStream",
        json=body,
        headers={"Accept": "text/event-stream"},
    ) as response:
        assert response.status_code == 200
        assert [e.event for e in _sse.events(response.read())][-1] == "done"

    s = scrape(http)
    requests = "protoserve_gateway_requests_total"
    assert value(s, requests, route="/v1/models", method="GET", status="200") == 1
    assert value(s, requests, route="/v1/models/{name}", method="GET", status="200") == 1
    assert value(s, requests, route="/v1/models/{name}", method="GET", status="404") == 1
    generate_route = next(p for p in patterns if p.endswith(":generate"))
    assert value(s, requests, route=generate_route, method="POST", status="200") == 1
    assert value(s, requests, route=generate_route, method="POST", status="404") == 1
    assert value(s, requests, route="<unmatched>", method="GET", status="404") == 1
    stream_route = next(p for p in patterns if p.endswith(":generateStream"))
    assert value(s, requests, route=stream_route, method="POST", status="200") == 1
    assert (
        value(
            s,
            "protoserve_gateway_request_duration_seconds_count",
            route="/v1/models/{name}",
            method="GET",
        )
        == 2
    )
    assert value(s, "protoserve_gateway_upstream_errors_total", code="NOT_FOUND") == 2
    assert value(s, "protoserve_gateway_streams_in_flight") == 0

    # Routes are templates (or <unmatched>), never raw paths.
    routes = {dict(labels).get("route") for _, labels in s} - {None}
    assert routes <= {*patterns, "<unmatched>"}


def test_streams_in_flight(gateway) -> None:
    http, _ = gateway
    body = {"inputs": "", "parameters": {"max_new_tokens": 1000}}
    with http.stream(
        "POST", "/v1/models/slow:generateStream", json=body, headers={"Accept": "text/event-stream"}
    ) as response:
        # Held in a variable: a dropped generator would close the response with it.
        received = _sse.events(response.iter_bytes())
        assert next(received).event == "message"
        assert value(scrape(http), "protoserve_gateway_streams_in_flight") == 1
    # The client left: the stream ends and the gauge comes back down.
    wait_until(
        lambda: value(scrape(http), "protoserve_gateway_streams_in_flight") == 0,
        "the gateway's streams in flight back to 0",
    )
