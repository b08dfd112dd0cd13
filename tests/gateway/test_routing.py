"""Routing a request (HTTP method, raw path) to a binding: 404, 405 and specificity."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import pytest

from protoserve.gateway._routing import (
    MethodNotAllowed,
    RouteMatch,
    RouteNotFound,
    Router,
    RoutingError,
)
from protoserve.gateway._rules import Binding, bindings_for
from protoserve.gateway._template import PathTemplate
from protoserve.inference.v1 import inference_service_pb2

SERVICE = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"]
# Any method will do for bindings made up here: the tests tell them by template.
METHOD = SERVICE.methods_by_name["GetModel"]


def binding(verb: str, pattern: str) -> Binding:
    return Binding(METHOD, verb, PathTemplate.parse(pattern), "")


def route(router: Router, verb: str, path: str) -> tuple[str, str, dict[str, str]]:
    match = router.match(verb, path)
    return match.binding.verb, match.binding.template.pattern, match.path_params


@pytest.fixture(scope="module")
def api() -> Router:
    return Router(bindings_for(SERVICE))


@pytest.mark.parametrize(
    ("verb", "path", "method", "params"),
    [
        ("GET", "/v1/models", "ListModels", {}),
        ("GET", "/v1/models/", "ListModels", {}),
        ("GET", "/v1/models/bytelm", "GetModel", {"name": "bytelm"}),
        ("get", "/v1/models/bytelm", "GetModel", {"name": "bytelm"}),
        ("POST", "/v1/models/bytelm:generate", "Generate", {"model": "bytelm"}),
        ("POST", "/v1/models/bytelm:generateStream", "GenerateStream", {"model": "bytelm"}),
        ("GET", "/v1/models/bytelm:generateStream", "GenerateStream", {"model": "bytelm"}),
        ("POST", "/v1/models/bytelm:embed", "Embed", {"model": "bytelm"}),
        ("POST", "/v1/models/bytelm:predict", "Predict", {"model": "bytelm"}),
        # A ":" that is no bound verb is part of the name.
        ("GET", "/v1/models/a:b", "GetModel", {"name": "a:b"}),
        ("GET", "/v1/models/org%2Fname", "GetModel", {"name": "org/name"}),
        ("POST", "/v1/models/org%2Fname:generate", "Generate", {"model": "org/name"}),
        # An encoded ":" is data, so this names a model and calls no verb.
        ("GET", "/v1/models/bytelm%3Agenerate", "GetModel", {"name": "bytelm:generate"}),
    ],
)
def test_protoserve_api(
    api: Router, verb: str, path: str, method: str, params: dict[str, str]
) -> None:
    match = api.match(verb, path)
    assert isinstance(match, RouteMatch)
    assert match.binding.method.name == method
    assert match.path_params == params


def test_get_binding_of_generate_stream_is_the_additional_one(api: Router) -> None:
    assert api.match("GET", "/v1/models/m:generateStream").binding.index == 1
    assert api.match("POST", "/v1/models/m:generateStream").binding.index == 0


def test_a_bound_verb_is_not_swallowed_by_a_verbless_template(api: Router) -> None:
    # GET /v1/models/{name} would match with name "bytelm:generate", but ":generate"
    # is a bound verb, so only the Generate binding is considered.
    with pytest.raises(MethodNotAllowed) as info:
        api.match("GET", "/v1/models/bytelm:generate")
    assert info.value.allowed == ("POST",)


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/v2/models",
        "/v1",
        "/v1/model",
        "/v1/models/a/b",
        "/v1//models",
        "/v1/models/x:unknown/y",
        "v1/models",
        "",
        # A verb-less template may not take a value that is not UTF-8.
        "/v1/models/%FF",
    ],
)
def test_not_found(api: Router, path: str) -> None:
    with pytest.raises(RouteNotFound) as info:
        api.match("GET", path)
    assert info.value.path == path
    assert isinstance(info.value, RoutingError)
    assert (info.value.http_status, info.value.code) == (404, grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize(
    ("verb", "path", "allowed"),
    [
        ("POST", "/v1/models", ("GET",)),
        ("DELETE", "/v1/models/bytelm", ("GET",)),
        ("HEAD", "/v1/models/bytelm", ("GET",)),
        ("GET", "/v1/models/bytelm:embed", ("POST",)),
        ("PUT", "/v1/models/bytelm:generateStream", ("GET", "POST")),
        ("OPTIONS", "/v1/models/bytelm:generateStream", ("GET", "POST")),
    ],
)
def test_method_not_allowed_lists_the_bound_methods(
    api: Router, verb: str, path: str, allowed: tuple[str, ...]
) -> None:
    with pytest.raises(MethodNotAllowed) as info:
        api.match(verb, path)
    assert info.value.allowed == allowed
    assert info.value.path == path
    assert isinstance(info.value, RoutingError)
    assert (info.value.http_status, info.value.code) == (405, grpc.StatusCode.UNIMPLEMENTED)
    assert ", ".join(allowed) in str(info.value)


def test_more_literal_segments_win_whatever_the_order() -> None:
    general = binding("GET", "/v1/{name=shelves/*/books/*}")
    wildcard = binding("GET", "/v1/*/{shelf}/books/{book}")
    special = binding("GET", "/v1/shelves/special/books/{book}")
    for bindings in ([general, wildcard, special], [special, wildcard, general]):
        router = Router(bindings)
        assert route(router, "GET", "/v1/shelves/special/books/b1") == (
            "GET",
            "/v1/shelves/special/books/{book}",
            {"book": "b1"},
        )
        assert route(router, "GET", "/v1/shelves/s1/books/b1") == (
            "GET",
            "/v1/{name=shelves/*/books/*}",
            {"name": "shelves/s1/books/b1"},
        )


def test_fewer_wildcards_win_then_single_before_double_star() -> None:
    # Same literal count: fewer wildcards win, and "**" weighs more than any "*"s.
    router = Router([binding("GET", "/v1/{p=**}"), binding("GET", "/v1/{x}")])
    assert route(router, "GET", "/v1/a") == ("GET", "/v1/{x}", {"x": "a"})
    assert route(router, "GET", "/v1/a/b") == ("GET", "/v1/{p=**}", {"p": "a/b"})
    router = Router([binding("GET", "/v1/a/**"), binding("GET", "/v1/a/*/*")])
    assert route(router, "GET", "/v1/a/b/c")[1] == "/v1/a/*/*"


def test_a_literal_branch_that_fails_deeper_leaves_the_wildcard_one() -> None:
    router = Router(
        [
            binding("GET", "/v1/shelves/x"),
            binding("GET", "/v1/{shelf}/y"),
            binding("GET", "/v1/shelves/{rest=**}"),
        ]
    )
    assert route(router, "GET", "/v1/shelves/y") == ("GET", "/v1/{shelf}/y", {"shelf": "shelves"})
    assert route(router, "GET", "/v1/shelves/x") == ("GET", "/v1/shelves/x", {})
    assert route(router, "GET", "/v1/shelves/z/w") == (
        "GET",
        "/v1/shelves/{rest=**}",
        {"rest": "z/w"},
    )


def test_declaration_order_breaks_ties() -> None:
    first = binding("GET", "/v1/models/{name}")
    second = binding("GET", "/v1/{name=models/*}")
    assert Router([first, second]).match("GET", "/v1/models/m").binding is first
    assert Router([second, first]).match("GET", "/v1/models/m").binding is second


def test_the_method_filters_before_specificity() -> None:
    # The specific template allows only POST; a GET still reaches the general one.
    router = Router([binding("POST", "/v1/models/special"), binding("GET", "/v1/models/{name}")])
    assert route(router, "GET", "/v1/models/special") == (
        "GET",
        "/v1/models/{name}",
        {"name": "special"},
    )
    assert route(router, "POST", "/v1/models/special") == ("POST", "/v1/models/special", {})
    with pytest.raises(MethodNotAllowed) as info:
        router.match("PUT", "/v1/models/special")
    assert info.value.allowed == ("GET", "POST")


def test_a_verb_that_matches_no_template_falls_back_to_verbless_ones() -> None:
    router = Router([binding("POST", "/v2/jobs/{id}:cancel"), binding("GET", "/v1/files/{name}")])
    assert route(router, "GET", "/v1/files/report:cancel") == (
        "GET",
        "/v1/files/{name}",
        {"name": "report:cancel"},
    )
    assert route(router, "POST", "/v2/jobs/7:cancel") == (
        "POST",
        "/v2/jobs/{id}:cancel",
        {"id": "7"},
    )


def test_a_verb_template_that_cannot_match_falls_back_too(api: Router) -> None:
    # "{model}" takes no empty segment, so ":generate" is GetModel's name.
    assert route(api, "GET", "/v1/models/:generate")[2] == {"name": ":generate"}


def test_custom_kind_star_takes_any_method() -> None:
    router = Router([binding("*", "/v1/any/{x}"), binding("DELETE", "/v1/any/special")])
    assert route(router, "PROPFIND", "/v1/any/special") == ("*", "/v1/any/{x}", {"x": "special"})
    assert route(router, "DELETE", "/v1/any/special") == ("DELETE", "/v1/any/special", {})


def test_custom_http_methods_route() -> None:
    router = Router([binding("HEAD", "/v1/things/{id}"), binding("GET", "/v1/things/{id}")])
    assert route(router, "HEAD", "/v1/things/7") == ("HEAD", "/v1/things/{id}", {"id": "7"})
    assert route(router, "GET", "/v1/things/7")[0] == "GET"


def test_nested_field_paths_and_double_star() -> None:
    router = Router(
        [
            binding("POST", "/v1/{parent.name=shelves/*}/books"),
            binding("GET", "/v1/{name=files/**}:download"),
            binding("GET", "/v1/{name=files/**}"),
        ]
    )
    assert route(router, "POST", "/v1/shelves/s1/books")[2] == {"parent.name": "shelves/s1"}
    assert route(router, "GET", "/v1/files/a/b%2Fc:download") == (
        "GET",
        "/v1/{name=files/**}:download",
        {"name": "files/a/b%2Fc"},
    )
    assert route(router, "GET", "/v1/files/a/b")[1:] == (
        "/v1/{name=files/**}",
        {"name": "files/a/b"},
    )
    assert route(router, "GET", "/v1/files")[2] == {"name": "files"}


def test_root_and_generated_bindings() -> None:
    router = Router(
        [
            binding("GET", "/{path=**}"),
            binding("POST", "/protoserve.inference.v1.InferenceService/ListModels"),
        ]
    )
    assert route(router, "GET", "/") == ("GET", "/{path=**}", {"path": ""})
    assert (
        route(router, "POST", "/protoserve.inference.v1.InferenceService/ListModels")[0] == "POST"
    )
    # The catch-all GET also matches the gRPC-style path, so GET is allowed there.
    assert route(router, "GET", "/protoserve.inference.v1.InferenceService/ListModels")[2] == {
        "path": "protoserve.inference.v1.InferenceService/ListModels"
    }


def test_empty_router_finds_nothing() -> None:
    with pytest.raises(RouteNotFound):
        Router([]).match("GET", "/v1/models")


def test_bindings_are_kept_in_order(api: Router) -> None:
    assert api.bindings == tuple(bindings_for(SERVICE))


def test_hundreds_of_bindings_are_narrowed_to_a_few_candidates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bindings = [binding("GET", f"/v1/collection{i}/{{id}}/items/{{item}}") for i in range(300)]
    bindings += [binding("POST", f"/v1/collection{i}/{{id}}:action{i}") for i in range(300)]
    bindings.append(binding("GET", "/v1/{name=**}"))
    router = Router(bindings)
    # Count the templates matched in full: the work per request, without a clock.
    matched: list[str] = []
    match_segments = PathTemplate.match_segments

    def counted(self: PathTemplate, segments: Sequence[str]) -> dict[str, str] | None:
        matched.append(str(self))
        return match_segments(self, segments)

    monkeypatch.setattr(PathTemplate, "match_segments", counted)
    assert route(router, "GET", "/v1/collection299/a/items/b")[2] == {"id": "a", "item": "b"}
    # The index leaves the one template with these literals and the catch-all, of 601.
    assert len(matched) == 2, matched
    matched.clear()
    assert route(router, "POST", "/v1/collection7/a:action7")[2] == {"id": "a"}
    assert len(matched) == 1, matched
