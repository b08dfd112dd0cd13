"""Path templates: the http.proto grammar, matching and percent-decoding."""

from __future__ import annotations

import pytest

from protoserve.gateway._template import PathTemplate, TemplateError, split_path


@pytest.mark.parametrize(
    ("pattern", "fields", "verb"),
    [
        ("/v1/models", (), None),
        ("/v1/models/{name}", ("name",), None),
        ("/v1/models/{model}:generate", ("model",), "generate"),
        ("/v1/{name=models/*}", ("name",), None),
        ("/v1/{name=shelves/*/books/*}:undelete", ("name",), "undelete"),
        ("/v1/{parent.child}/x/{other_field}", ("parent.child", "other_field"), None),
        ("/v1/{path=**}", ("path",), None),
        ("/v1/*/things/**", (), None),
        ("/v1/{name=files/**}:get", ("name",), "get"),
        ("/protoserve.inference.v1.InferenceService/ListModels", (), None),
        ("/v1/a%2Fb/~x_y-z.1/it's(+),;=@$&!", (), None),
    ],
)
def test_valid_templates_parse(pattern: str, fields: tuple[str, ...], verb: str | None) -> None:
    template = PathTemplate.parse(pattern)
    assert template.pattern == pattern
    assert template.fields == fields
    assert template.verb == verb


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("", "a template starts with '/' at offset 0"),
        ("v1/models", "a template starts with '/' at offset 0"),
        ("/", "an empty segment at offset 1"),
        ("/v1/", "an empty segment at offset 4"),
        ("/v1//models", "an empty segment at offset 4"),
        ("/v1/{name=}", "expected a segment, found '}' at offset 10"),
        ("/v1/{name", "variable 'name' is not closed with '}' at offset 9"),
        ("/v1/{name=models/*", "variable 'name' is not closed with '}' at offset 18"),
        ("/v1/{}", "'' is not a field path"),
        ("/v1/{1name}", "'1name' is not a field path"),
        ("/v1/{a..b}", "'a..b' is not a field path"),
        ("/v1/{a-b}", "'a-b' is not a field path"),
        ("/v1/{a={b}}", "a variable inside a variable at offset 7"),
        ("/v1/{a}/{a}", "field 'a' is bound twice"),
        ("/v1/**/x", "'**' must be the last segment (it is segment 2 of 3)"),
        ("/v1/{a=**}/{b}", "'**' must be the last segment"),
        ("/v1/models:", "expected a custom verb after ':', found the end at offset 11"),
        ("/v1/a:b/c", "unexpected '/' at offset 7"),
        ("/v1/a:b:c", "unexpected ':' at offset 7"),
        ("/v1/a b", "unexpected ' ' at offset 5"),
        ("/v1/a*", "unexpected '*' at offset 5"),
        ("/v1/***", "unexpected '*' at offset 6"),
        ("/v1/caf\u00e9", "unexpected '\u00e9' at offset 7"),
        ("/v1/models?x=1", "unexpected '?' at offset 10"),
    ],
)
def test_invalid_templates_say_what_and_where(pattern: str, message: str) -> None:
    with pytest.raises(TemplateError) as info:
        PathTemplate.parse(pattern)
    assert str(info.value).startswith(f"invalid path template {pattern!r}: ")
    assert message in str(info.value)


def test_template_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="starts with '/'"):
        PathTemplate.parse("models")


def test_templates_compare_by_pattern() -> None:
    assert PathTemplate.parse("/v1/{a}") == PathTemplate.parse("/v1/{a}")
    assert PathTemplate.parse("/v1/{a}") != PathTemplate.parse("/v1/{a=*}")
    assert len({PathTemplate.parse("/v1/{a}"), PathTemplate.parse("/v1/{a}")}) == 1
    assert repr(PathTemplate.parse("/v1/{a}")) == "PathTemplate.parse('/v1/{a}')"


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/v1/models", "/v1/models", {}),
        ("/v1/models", "/v1/models/", {}),
        ("/v1/models", "/v1/model", None),
        ("/v1/models", "/v1/models/x", None),
        ("/v1/models", "/v1//models", None),
        ("/v1/models", "v1/models", None),
        ("/v1/models/{name}", "/v1/models/bytelm", {"name": "bytelm"}),
        ("/v1/models/{name}", "/v1/models/", None),
        ("/v1/models/{name}", "/v1/models/a/b", None),
        ("/v1/{name=models/*}", "/v1/models/bytelm", {"name": "models/bytelm"}),
        ("/v1/{name=models/*}", "/v1/datasets/bytelm", None),
        ("/v1/*/{id}", "/v1/anything/7", {"id": "7"}),
        ("/v1/{a.b.c}/{d}", "/v1/x/y", {"a.b.c": "x", "d": "y"}),
        ("/v1/{name=models}", "/v1/models", {"name": "models"}),
    ],
)
def test_match(pattern: str, path: str, expected: dict[str, str] | None) -> None:
    assert PathTemplate.parse(pattern).match(path) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/models/a%20b", "a b"),
        # A single-segment value is fully decoded, "%2F" included.
        ("/v1/models/a%2Fb", "a/b"),
        ("/v1/models/a%2fb", "a/b"),
        ("/v1/models/caf%C3%A9", "caf\u00e9"),
        ("/v1/models/%3Agenerate", ":generate"),
        ("/v1/models/100%25", "100%"),
        # Not a percent-escape: kept as is.
        ("/v1/models/%zz", "%zz"),
    ],
)
def test_single_segment_values_are_percent_decoded(path: str, expected: str) -> None:
    assert PathTemplate.parse("/v1/models/{name}").match(path) == {"name": expected}


def test_values_that_are_not_utf8_do_not_match() -> None:
    assert PathTemplate.parse("/v1/models/{name}").match("/v1/models/%FF") is None
    assert PathTemplate.parse("/v1/{name=**}").match("/v1/a/%C3") is None


def test_literals_compare_decoded() -> None:
    assert PathTemplate.parse("/v1/models").match("/v1/mod%65ls") == {}
    assert PathTemplate.parse("/v1/a%20b").match("/v1/a%20b") == {}
    assert PathTemplate.parse("/v1/a%20b").match("/v1/a b") == {}
    # An encoded "/" is data inside one segment, never a separator.
    assert PathTemplate.parse("/v1/a/b").match("/v1/a%2Fb") is None
    assert PathTemplate.parse("/v1/a%2Fb").match("/v1/a%2Fb") == {}


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/v1/{path=**}", "/v1/a/b/c", {"path": "a/b/c"}),
        ("/v1/{path=**}", "/v1/a", {"path": "a"}),
        # "**" matches zero segments.
        ("/v1/{path=**}", "/v1", {"path": ""}),
        ("/v1/{path=**}", "/v1/", {"path": ""}),
        ("/v1/{name=files/**}", "/v1/files", {"name": "files"}),
        ("/v1/{name=files/**}", "/v1/files/x/y", {"name": "files/x/y"}),
        ("/v1/{name=files/**}", "/v1/blobs/x", None),
        ("/v1/{name=files/**}", "/v1/files/x//y", None),
        ("/v1/{name=shelves/*}/books/**", "/v1/shelves/s1/books/a/b", {"name": "shelves/s1"}),
        ("/{path=**}", "/", {"path": ""}),
        ("/{path=**}", "/a/b", {"path": "a/b"}),
    ],
)
def test_double_star_matches_the_rest(
    pattern: str, path: str, expected: dict[str, str] | None
) -> None:
    assert PathTemplate.parse(pattern).match(path) == expected


def test_multi_segment_values_keep_encoded_slashes() -> None:
    # http.proto: multi-segment values are decoded "except %2F and %2f".
    template = PathTemplate.parse("/v1/{name=files/**}")
    assert template.match("/v1/files/a%2Fb/c%20d") == {"name": "files/a%2Fb/c d"}
    assert template.match("/v1/files/a%2fb") == {"name": "files/a%2fb"}
    assert PathTemplate.parse("/v1/{name=shelves/*}").match("/v1/shelves/a%2Fb") == {
        "name": "shelves/a%2Fb"
    }


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/v1/models/{model}:generate", "/v1/models/bytelm:generate", {"model": "bytelm"}),
        ("/v1/models/{model}:generate", "/v1/models/bytelm:generate/", {"model": "bytelm"}),
        ("/v1/models/{model}:generate", "/v1/models/bytelm:embed", None),
        ("/v1/models/{model}:generate", "/v1/models/bytelm", None),
        ("/v1/models/{model}:generate", "/v1/models/:generate", None),
        # The verb is after the last ":"; earlier ones belong to the value.
        ("/v1/models/{model}:generate", "/v1/models/a:b:generate", {"model": "a:b"}),
        # An encoded ":" is data, not the verb's separator.
        ("/v1/models/{model}:generate", "/v1/models/bytelm%3Agenerate", None),
        ("/v1/{name=files/**}:get", "/v1/files/a/b:get", {"name": "files/a/b"}),
        ("/v1/{name=files/**}:get", "/v1/files:get", {"name": "files"}),
        ("/v1:batch", "/v1:batch", {}),
        # Without a verb in the template, a ":" is part of the value.
        ("/v1/models/{name}", "/v1/models/a:b", {"name": "a:b"}),
        ("/v1/models/{name}", "/v1/models/bytelm:generate", {"name": "bytelm:generate"}),
    ],
)
def test_custom_verbs(pattern: str, path: str, expected: dict[str, str] | None) -> None:
    assert PathTemplate.parse(pattern).match(path) == expected


@pytest.mark.parametrize(
    ("pattern", "openapi"),
    [
        ("/v1/models", "/v1/models"),
        ("/v1/models/{name}", "/v1/models/{name}"),
        ("/v1/models/{model=*}", "/v1/models/{model}"),
        ("/v1/models/{model}:generate", "/v1/models/{model}:generate"),
        ("/v1/{name=models/*}", "/v1/{name}"),
        ("/v1/{name=shelves/*/books/*}:undelete", "/v1/{name}:undelete"),
        ("/v1/{path=**}", "/v1/{path}"),
        ("/v1/{parent.name=shelves/*}/books", "/v1/{parent.name}/books"),
        ("/v1/a%20b/*/**", "/v1/a%20b/*/**"),
    ],
)
def test_openapi_path(pattern: str, openapi: str) -> None:
    assert PathTemplate.parse(pattern).openapi_path() == openapi


def test_shape_attributes() -> None:
    template = PathTemplate.parse("/v1/{name=models/*}/x/**")
    assert (template.literal_count, template.wildcard_count) == (3, 2)
    assert (template.segment_count, template.open_ended) == (5, True)
    assert template.fixed_segments == ("v1", "models", None, "x")
    assert PathTemplate.parse("/{a}/b%20c").fixed_segments == (None, "b c")


def test_split_path() -> None:
    assert split_path("/") == []
    assert split_path("/v1/a%2Fb/") == ["v1", "a%2Fb"]
    assert split_path("//") == [""]
    with pytest.raises(ValueError, match="starts with '/'"):
        split_path("v1")
