"""JSON/URL to protobuf and back: build_request and render_response, by google/api/http.proto."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from protoserve.gateway._errors import GatewayError, status_json
from protoserve.gateway._rules import Binding
from protoserve.gateway._template import PathTemplate
from protoserve.gateway._transcode import build_request, render_message, render_response
from protoserve.inference.v1 import inference_service_pb2 as pb

EVERYTHING_PROTO = """
syntax = "proto3";
package transcode.test.v1;

import "google/protobuf/any.proto";
import "google/protobuf/duration.proto";
import "google/protobuf/field_mask.proto";
import "google/protobuf/struct.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";

enum Color {
  COLOR_UNSPECIFIED = 0;
  COLOR_RED = 1;
  COLOR_GREEN = 2;
}

message Leaf { string value = 1; }

message Inner {
  string name = 1;
  int32 count = 2;
  Leaf leaf = 3;
}

message Everything {
  double f_double = 1;
  float f_float = 2;
  int32 f_int32 = 3;
  int64 f_int64 = 4;
  uint32 f_uint32 = 5;
  uint64 f_uint64 = 6;
  sint32 f_sint32 = 7;
  sint64 f_sint64 = 8;
  fixed32 f_fixed32 = 9;
  fixed64 f_fixed64 = 10;
  sfixed32 f_sfixed32 = 11;
  sfixed64 f_sfixed64 = 12;
  bool f_bool = 13;
  string f_string = 14;
  bytes f_bytes = 15;
  Color color = 16;
  Inner inner = 17;
  repeated int32 r_int32 = 18;
  repeated string r_string = 19;
  repeated Color r_color = 20;
  repeated Inner r_inner = 21;
  map<string, int32> m_counts = 22;
  map<string, Inner> m_inner = 23;
  map<int32, string> m_by_id = 24;
  oneof choice {
    string choice_text = 25;
    int64 choice_number = 26;
    Inner choice_inner = 27;
  }
  google.protobuf.Timestamp ts = 28;
  google.protobuf.Duration dur = 29;
  google.protobuf.FieldMask mask = 30;
  google.protobuf.Int32Value w_int32 = 31;
  google.protobuf.Int64Value w_int64 = 32;
  google.protobuf.UInt32Value w_uint32 = 33;
  google.protobuf.UInt64Value w_uint64 = 34;
  google.protobuf.FloatValue w_float = 35;
  google.protobuf.DoubleValue w_double = 36;
  google.protobuf.BoolValue w_bool = 37;
  google.protobuf.StringValue w_string = 38;
  google.protobuf.BytesValue w_bytes = 39;
  google.protobuf.Struct st = 40;
  google.protobuf.Value val = 41;
  google.protobuf.Any any = 42;
  optional int32 opt_int32 = 43;
  repeated google.protobuf.Timestamp r_ts = 44;
  string name = 45;
}

service EverythingService {
  rpc Do(Everything) returns (Everything);
}
"""


@dataclass(frozen=True)
class Compiled:
    """The test proto, loaded into a pool of its own (never the default pool)."""

    pool: descriptor_pool.DescriptorPool
    everything: type[Message]
    method: MethodDescriptor


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    folder = tmp_path_factory.mktemp("everything")
    (folder / "everything.proto").write_text(EVERYTHING_PROTO)
    out = folder / "everything.binpb"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{folder}", "--include_imports",
         f"--descriptor_set_out={out}", str(folder / "everything.proto")],
        check=True,
    )  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        pool.Add(file)
    everything = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("transcode.test.v1.Everything")
    )
    method = pool.FindServiceByName("transcode.test.v1.EverythingService").methods_by_name["Do"]
    return Compiled(pool, everything, method)


def bind(
    method: MethodDescriptor, verb: str, pattern: str, body: str, response_body: str = ""
) -> Binding:
    return Binding(method, verb, PathTemplate.parse(pattern), body, response_body)


INFERENCE = pb.DESCRIPTOR.services_by_name["InferenceService"]
GENERATE = bind(INFERENCE.methods_by_name["Generate"], "POST", "/v1/models/{model}:generate", "*")
STREAM_GET = bind(
    INFERENCE.methods_by_name["GenerateStream"], "GET", "/v1/models/{model}:generateStream", ""
)


def generate(body: bytes, query: list[tuple[str, str]] | None = None) -> pb.GenerateRequest:
    message = build_request(GENERATE, {"model": "bytelm"}, query or [], body, pb.GenerateRequest)
    assert isinstance(message, pb.GenerateRequest)
    return message


def stream_get(query: list[tuple[str, str]], body: bytes = b"") -> pb.GenerateStreamRequest:
    message = build_request(STREAM_GET, {"model": "bytelm"}, query, body, pb.GenerateStreamRequest)
    assert isinstance(message, pb.GenerateStreamRequest)
    return message


def violation(error: pytest.ExceptionInfo[GatewayError]) -> tuple[str, str, str]:
    """(field, description, reason) of the error's one BadRequest field violation."""
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.http_status == 400
    (detail,) = error.value.details
    (found,) = detail.field_violations  # type: ignore[attr-defined]
    return found.field, found.description, found.reason


# The request body --------------------------------------------------------------------


def test_body_star_fills_the_whole_message_and_the_path_its_field() -> None:
    body = {
        "inputs": "Once upon",
        "parameters": {
            "max_new_tokens": 5,
            "temperature": 0.5,
            "seed": "18446744073709551615",
            "stop_sequences": ["\n", "."],
        },
    }
    message = generate(json.dumps(body).encode())
    assert message.model == "bytelm"
    assert message.inputs == "Once upon"
    assert message.parameters.max_new_tokens == 5
    assert message.parameters.temperature == 0.5
    assert message.parameters.seed == 2**64 - 1
    assert list(message.parameters.stop_sequences) == ["\n", "."]
    assert not message.parameters.HasField("top_k")


def test_body_takes_json_names_too() -> None:
    message = generate(b'{"inputs": "x", "parameters": {"maxNewTokens": 3, "topP": 0.9}}')
    assert message.parameters.max_new_tokens == 3
    assert math.isclose(message.parameters.top_p, 0.9, rel_tol=1e-6)


def test_path_wins_over_the_body() -> None:
    assert generate(b'{"model": "other", "inputs": "x"}').model == "bytelm"


@pytest.mark.parametrize("body", [b"", b"  \r\n\t"])
def test_an_empty_body_is_an_empty_object(body: bytes) -> None:
    assert generate(body) == pb.GenerateRequest(model="bytelm")


def test_explicit_zero_of_an_optional_field_is_kept() -> None:
    message = generate(b'{"parameters": {"temperature": 0}}')
    assert message.parameters.HasField("temperature")
    assert message.parameters.temperature == 0


def test_a_leading_byte_order_mark_is_ignored() -> None:
    assert generate('\ufeff{"inputs": "x"}'.encode()).inputs == "x"


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (b'{\n  "inputs": "x",\n}', "line 3 column 1"),
        (b'{"inputs": "x"', "line 1 column 15"),
        (b"inputs=x", "line 1 column 1"),
    ],
)
def test_malformed_json_says_where(body: bytes, where: str) -> None:
    with pytest.raises(GatewayError) as error:
        generate(body)
    field, description, reason = violation(error)
    assert (field, reason) == ("", "INVALID_JSON")
    assert where in description
    assert where in error.value.message


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"inputs": "a", "inputs": "b"}', 'key "inputs" appears twice'),
        (b'{"parameters": {"temperature": NaN}}', 'send it as the string "NaN"'),
        (b"[" * 100_000, "nested too deeply"),
    ],
)
def test_json_that_python_would_take_is_refused(body: bytes, words: str) -> None:
    with pytest.raises(GatewayError) as error:
        generate(body)
    assert words in error.value.message
    assert violation(error)[2] == "INVALID_JSON"


def test_invalid_utf8_is_a_400() -> None:
    with pytest.raises(GatewayError) as error:
        generate(b'{"inputs": "caf\xe9"}')
    assert violation(error)[2] == "INVALID_UTF8"
    assert "byte 15" in error.value.message


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"42", b"null"])
def test_the_body_of_a_message_must_be_an_object(body: bytes) -> None:
    with pytest.raises(GatewayError) as error:
        generate(body)
    assert "must be a JSON object" in error.value.message
    assert violation(error)[2] == "INVALID_TYPE"


@pytest.mark.parametrize(
    ("body", "field", "reason", "words"),
    [
        (b'{"prompt": "x"}', "prompt", "UNKNOWN_FIELD", 'unknown field "prompt"'),
        (b'{"parameters": {"max_tokens": 1}}', "parameters.max_tokens", "UNKNOWN_FIELD",
         "protoserve.inference.v1.GenerationParameters"),
        (b'{"inputs": 5}', "inputs", "INVALID_VALUE", "expected a string, not 5"),
        (b'{"parameters": {"maxNewTokens": "lots"}}', "parameters.max_new_tokens",
         "INVALID_VALUE", 'integer from 0 to 4294967295 (uint32), not "lots"'),
        (b'{"parameters": {"max_new_tokens": -1}}', "parameters.max_new_tokens",
         "INVALID_VALUE", "not -1"),
        (b'{"parameters": {"temperature": "hot"}}', "parameters.temperature",
         "INVALID_VALUE", "a number (float)"),
        (b'{"parameters": {"stop_sequences": "x"}}', "parameters.stop_sequences",
         "INVALID_TYPE", "expected a JSON array"),
        (b'{"parameters": {"stop_sequences": ["a", 1]}}', "parameters.stop_sequences[1]",
         "INVALID_VALUE", "expected a string, not 1"),
        (b'{"parameters": {"stop_sequences": [null]}}', "parameters.stop_sequences[0]",
         "INVALID_VALUE", "null is not allowed"),
        (b'{"parameters": 7}', "parameters", "INVALID_TYPE", "expected a JSON object"),
        (b'{"parameters": {"top_k": 1, "topK": 2}}', "parameters.top_k", "DUPLICATE_FIELD",
         'given twice, as "top_k" and "topK"'),
    ],
)  # fmt: skip
def test_a_wrong_field_is_named(body: bytes, field: str, reason: str, words: str) -> None:
    with pytest.raises(GatewayError) as error:
        generate(body)
    found_field, description, found_reason = violation(error)
    assert (found_field, found_reason) == (field, reason)
    assert words in description
    assert f'"{field}"' in error.value.message


@pytest.mark.parametrize(
    "body", [b'{"\\ud800": 1}', b'{"inputs": "a\\udc00"}', b'{"x": [{"\\uDBFF": 1}]}']
)
def test_a_lone_surrogate_is_refused(body: bytes) -> None:
    with pytest.raises(GatewayError) as error:
        generate(body)
    assert violation(error)[2] == "INVALID_UTF8"
    rendered = status_json(error.value.code, error.value.message, error.value.details, None)
    json.dumps(rendered, ensure_ascii=False).encode()  # would raise on a surrogate


def test_a_surrogate_pair_is_text() -> None:
    assert generate(b'{"inputs": "\\ud83d\\ude00 \\\\ud800"}').inputs == "\U0001f600 \\ud800"


def test_query_parameters_are_refused_when_the_body_is_star() -> None:
    with pytest.raises(GatewayError) as error:
        generate(b'{"inputs": "x"}', [("inputs", "y")])
    field, description, reason = violation(error)
    assert (field, reason) == ("inputs", "FIELD_BOUND_BY_BODY")
    assert "set by the request body" in description


# The query string (GET binding, no body) ---------------------------------------------


def test_query_fills_nested_and_repeated_fields() -> None:
    message = stream_get(
        [
            ("inputs", "hello world"),
            ("parameters.max_new_tokens", "3"),
            ("parameters.temperature", "0"),
            ("parameters.stop_sequences", "a"),
            ("parameters.stop_sequences", "b"),
            ("parameters.seed", "18446744073709551615"),
        ]
    )
    assert message.model == "bytelm"
    assert message.inputs == "hello world"
    assert message.parameters.max_new_tokens == 3
    assert message.parameters.HasField("temperature")
    assert list(message.parameters.stop_sequences) == ["a", "b"]
    assert message.parameters.seed == 2**64 - 1


def test_query_takes_json_names_too() -> None:
    assert stream_get([("parameters.maxNewTokens", "4")]).parameters.max_new_tokens == 4


@pytest.mark.parametrize(
    ("key", "reason", "words"),
    [
        ("model", "FIELD_BOUND_BY_PATH", "set by the URL path"),
        ("prompt", "UNKNOWN_FIELD", 'has no field "prompt"'),
        ("parameters.max_tokens", "UNKNOWN_FIELD", 'has no field "max_tokens"'),
        ("parameters", "UNSUPPORTED_FIELD", 'set its fields, as in "parameters.<field>"'),
        ("inputs.length", "UNKNOWN_FIELD", '"inputs" (string) has no fields'),
    ],
)
def test_a_wrong_query_key_is_named(key: str, reason: str, words: str) -> None:
    with pytest.raises(GatewayError) as error:
        stream_get([(key, "1")])
    field, description, found_reason = violation(error)
    assert (field, found_reason) == (key, reason)
    assert words in description
    assert f'query parameter "{key}"' in error.value.message


def test_a_single_field_given_twice_is_refused() -> None:
    with pytest.raises(GatewayError) as error:
        stream_get([("inputs", "a"), ("inputs", "b")])
    assert violation(error) == ("inputs", '"inputs" takes one value, not 2', "TOO_MANY_VALUES")


def test_a_rule_without_body_refuses_one() -> None:
    with pytest.raises(GatewayError) as error:
        stream_get([], b'{"inputs": "x"}')
    assert violation(error)[2] == "BODY_NOT_ALLOWED"
    assert "takes no request body" in error.value.message


def test_a_rule_naming_a_missing_field_is_the_servers_fault(compiled: Compiled) -> None:
    broken = bind(compiled.method, "POST", "/v1/{nope}", "missing")
    with pytest.raises(GatewayError) as error:
        build_request(broken, {"nope": "x"}, [], b"{}", compiled.everything)
    assert error.value.code == grpc.StatusCode.INTERNAL
    assert error.value.http_status == 500


# Every type, through the query string ------------------------------------------------


def everything_get(compiled: Compiled, query: list[tuple[str, str]]) -> Any:
    binding = bind(compiled.method, "GET", "/v1/things/{name}", "")
    return build_request(binding, {"name": "n1"}, query, b"", compiled.everything)


def test_query_sets_every_scalar_type(compiled: Compiled) -> None:
    message = everything_get(
        compiled,
        [
            ("f_double", "1.5"), ("f_float", "-Infinity"), ("f_int32", "-2147483648"),
            ("f_int64", "-9223372036854775808"), ("f_uint32", "4294967295"),
            ("f_uint64", "18446744073709551615"), ("f_sint32", "-7"), ("f_sint64", "-8"),
            ("f_fixed32", "9"), ("f_fixed64", "10"), ("f_sfixed32", "-11"),
            ("f_sfixed64", "-12"), ("f_bool", "true"), ("f_string", "héllo wörld"),
            ("f_bytes", "-_8"), ("color", "COLOR_RED"),
        ],
    )  # fmt: skip
    assert message.name == "n1"
    assert message.f_double == 1.5
    assert message.f_float == -math.inf
    assert (message.f_int32, message.f_int64) == (-(2**31), -(2**63))
    assert (message.f_uint32, message.f_uint64) == (2**32 - 1, 2**64 - 1)
    assert (message.f_sint32, message.f_sint64, message.f_fixed32) == (-7, -8, 9)
    assert (message.f_fixed64, message.f_sfixed32, message.f_sfixed64) == (10, -11, -12)
    assert message.f_bool is True
    assert message.f_string == "héllo wörld"
    assert message.f_bytes == b"\xfb\xff"
    assert message.color == 1


@pytest.mark.parametrize("text", ["+/8=", "+/8", " /8="])
def test_query_bytes_take_standard_base64_and_a_plus_decoded_as_space(
    compiled: Compiled, text: str
) -> None:
    assert everything_get(compiled, [("f_bytes", text)]).f_bytes == b"\xfb\xff"


def test_query_sets_enums_repeated_nested_and_oneofs(compiled: Compiled) -> None:
    message = everything_get(
        compiled,
        [
            ("color", "2"), ("r_int32", "1"), ("r_int32", "2"), ("r_color", "COLOR_RED"),
            ("r_color", "2"), ("inner.name", "x"), ("inner.leaf.value", "deep"),
            ("choice_inner.count", "3"), ("opt_int32", "0"),
        ],
    )  # fmt: skip
    assert message.color == 2
    assert list(message.r_int32) == [1, 2]
    assert list(message.r_color) == [1, 2]
    assert (message.inner.name, message.inner.leaf.value) == ("x", "deep")
    assert message.WhichOneof("choice") == "choice_inner"
    assert message.choice_inner.count == 3
    assert message.HasField("opt_int32")


def test_query_sets_well_known_types(compiled: Compiled) -> None:
    message = everything_get(
        compiled,
        [
            ("ts", "2024-05-01T12:00:00.5+02:00"), ("dur", "1.5s"),
            ("mask", "fooBar,baz_qux,a.bC"), ("w_int32", "5"), ("w_int64", "-9000000000"),
            ("w_uint32", "7"), ("w_uint64", "18446744073709551615"), ("w_float", "NaN"),
            ("w_double", "2.5e-3"), ("w_bool", "false"), ("w_string", ""),
            ("w_bytes", "AAE"),
        ],
    )  # fmt: skip
    assert message.ts.ToJsonString() == "2024-05-01T10:00:00.500Z"
    assert (message.dur.seconds, message.dur.nanos) == (1, 500_000_000)
    assert list(message.mask.paths) == ["foo_bar", "baz_qux", "a.b_c"]
    assert (message.w_int32.value, message.w_int64.value) == (5, -9_000_000_000)
    assert (message.w_uint32.value, message.w_uint64.value) == (7, 2**64 - 1)
    assert math.isnan(message.w_float.value)
    assert message.w_double.value == 0.0025
    # Wrappers set to their zero value are still set: that is what they are for.
    for name in ("w_bool", "w_string"):
        assert message.HasField(name)
    assert message.w_bytes.value == b"\x00\x01"


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("f_int32", "1_000", "integer from -2147483648 to 2147483647 (int32)"),
        ("f_int32", "0x10", "(int32)"),
        ("f_int32", "2147483648", "(int32)"),
        ("f_int32", " 7", "(int32)"),
        ("f_uint32", "-1", "(uint32)"),
        ("f_int64", "1.5", "(int64)"),
        ("f_double", "infinity", '"Infinity"'),
        ("f_float", "1e40", "(float)"),
        ("f_bool", "1", "true or false"),
        ("f_bool", "True", "true or false"),
        ("w_bool", "yes", "true or false"),
        ("f_bytes", "a!b=", "base64"),
        ("f_bytes", "abcde", "base64"),
        ("color", "COLOR_PURPLE", "transcode.test.v1.Color name or number"),
        ("ts", "yesterday", "RFC 3339"),
        ("dur", "5", "duration in seconds"),
        ("mask", "a,b c", "is not a field path"),
        ("w_int32", "five", "(int32)"),
    ],
)
def test_a_bad_query_value_is_named(compiled: Compiled, key: str, value: str, words: str) -> None:
    with pytest.raises(GatewayError) as error:
        everything_get(compiled, [(key, value)])
    field, description, reason = violation(error)
    assert (field, reason) == (key, "INVALID_VALUE")
    assert words in description
    assert f'query parameter "{key}"' in error.value.message


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("m_counts", "is a map"),
        ("m_counts.a", "is a map"),
        ("r_inner.name", "is a repeated message"),
        ("r_ts", "is a repeated message"),
        ("st", "google.protobuf.Struct"),
        ("val", "google.protobuf.Value"),
        ("any", "google.protobuf.Any"),
        ("inner", "is a message"),
        ("ts.seconds", "has no fields"),
        ("inner.leaf.value.x", "has no fields"),
    ],
)
def test_fields_a_url_cannot_set_are_refused(compiled: Compiled, key: str, words: str) -> None:
    with pytest.raises(GatewayError) as error:
        everything_get(compiled, [(key, "1")])
    field, description, _ = violation(error)
    assert field == key
    assert words in description


def test_the_bad_one_of_repeated_query_values_is_named(compiled: Compiled) -> None:
    with pytest.raises(GatewayError) as error:
        everything_get(compiled, [("r_int32", "1"), ("r_int32", "99999999999"), ("r_int32", "3")])
    field, description, _ = violation(error)
    assert field == "r_int32"
    assert description.endswith('not "99999999999"')


def test_two_members_of_a_oneof_in_the_query_are_refused(compiled: Compiled) -> None:
    with pytest.raises(GatewayError) as error:
        everything_get(compiled, [("choice_text", "a"), ("choice_number", "1")])
    field, description, reason = violation(error)
    assert (field, reason) == ("choice_number", "ONEOF_CONFLICT")
    assert 'oneof "choice"' in description


def test_a_query_oneof_member_conflicting_with_the_path_is_refused(compiled: Compiled) -> None:
    binding = bind(compiled.method, "GET", "/v1/texts/{choice_text}", "")
    with pytest.raises(GatewayError) as error:
        build_request(binding, {"choice_text": "a"}, [("choice_inner.name", "b")], b"",
                      compiled.everything)  # fmt: skip
    field, description, reason = violation(error)
    assert (field, reason) == ("choice_inner.name", "ONEOF_CONFLICT")
    assert '"choice_text" is already set' in description


def test_path_parameters_are_converted_like_query_values(compiled: Compiled) -> None:
    binding = bind(compiled.method, "GET", "/v1/{f_int64}/{color}/{inner.leaf.value}", "")
    params = {"f_int64": "-5", "color": "COLOR_GREEN", "inner.leaf.value": "a/b c"}
    message: Any = build_request(binding, params, [], b"", compiled.everything)
    assert (message.f_int64, message.color, message.inner.leaf.value) == (-5, 2, "a/b c")
    with pytest.raises(GatewayError) as error:
        build_request(binding, {**params, "f_int64": "five"}, [], b"", compiled.everything)
    field, _, reason = violation(error)
    assert (field, reason) == ("f_int64", "INVALID_VALUE")
    assert 'path parameter "f_int64"' in error.value.message


# A body bound to one field ------------------------------------------------------------


def test_body_field_sets_only_that_field(compiled: Compiled) -> None:
    binding = bind(compiled.method, "PATCH", "/v1/{inner.name=things/*}", "inner")
    message: Any = build_request(
        binding,
        {"inner.name": "things/1"},
        [("f_int32", "3")],
        b'{"name": "ignored", "count": 2, "leaf": {"value": "v"}}',
        compiled.everything,
    )
    assert message.inner.name == "things/1"  # the path wins
    assert (message.inner.count, message.inner.leaf.value) == (2, "v")
    assert message.f_int32 == 3
    with pytest.raises(GatewayError) as error:
        build_request(binding, {"inner.name": "things/1"}, [("inner.count", "2")], b"",
                      compiled.everything)  # fmt: skip
    assert violation(error)[::2] == ("inner.count", "FIELD_BOUND_BY_BODY")


@pytest.mark.parametrize(
    ("field", "body", "expected"),
    [
        ("r_int32", b"[1, 2, 3]", [1, 2, 3]),
        ("f_string", b'"hello"', "hello"),
        ("ts", b'"2024-05-01T12:00:00Z"', "2024-05-01T12:00:00Z"),
        ("m_counts", b'{"a": 1}', {"a": 1}),
        ("st", b'{"k": [1, null]}', {"k": [1.0, None]}),
    ],
)
def test_body_field_of_any_kind(compiled: Compiled, field: str, body: bytes, expected: Any) -> None:
    binding = bind(compiled.method, "POST", "/v1/do", field)
    message = build_request(binding, {}, [], body, compiled.everything)
    assert render_message(message)[field] == expected


def test_body_field_errors_name_the_path_from_the_message(compiled: Compiled) -> None:
    binding = bind(compiled.method, "POST", "/v1/do", "inner")
    with pytest.raises(GatewayError) as error:
        build_request(binding, {}, [], b'{"leaf": {"value": 1}}', compiled.everything)
    assert violation(error)[0] == "inner.leaf.value"


# Every type, through a body ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"mCounts": {"a": "x"}}, "m_counts[a]", "INVALID_VALUE"),
        ({"mInner": {"k": {"nope": 1}}}, "m_inner[k].nope", "UNKNOWN_FIELD"),
        ({"mById": {"abc": "x"}}, "m_by_id[abc]", "INVALID_KEY"),
        ({"mById": {"99999999999": "x"}}, "m_by_id[99999999999]", "INVALID_KEY"),
        ({"mCounts": [1]}, "m_counts", "INVALID_TYPE"),
        ({"rInner": [{}, {"count": "x"}]}, "r_inner[1].count", "INVALID_VALUE"),
        ({"choiceText": "a", "choiceNumber": "1"}, "choice_number", "ONEOF_CONFLICT"),
        ({"st": 5}, "st", "INVALID_VALUE"),
        ({"ts": "nope"}, "ts", "INVALID_VALUE"),
        ({"dur": 1.5}, "dur", "INVALID_VALUE"),
        ({"any": {"@type": "type.googleapis.com/nowhere.Type"}}, "any", "INVALID_VALUE"),
        ({"wInt32": "x"}, "w_int32", "INVALID_VALUE"),
        ({"color": "COLOR_PURPLE"}, "color", "INVALID_VALUE"),
        ({"fBool": "true"}, "f_bool", "INVALID_VALUE"),
        ({"fInt32": 1.5}, "f_int32", "INVALID_VALUE"),
        ({"fFloat": 1e39}, "f_float", "INVALID_VALUE"),
        ({"inner": {"leaf": ["x"]}}, "inner.leaf", "INVALID_TYPE"),
    ],
)
def test_body_errors_name_the_field(
    compiled: Compiled, body: dict[str, Any], field: str, reason: str
) -> None:
    binding = bind(compiled.method, "POST", "/v1/do", "*")
    with pytest.raises(GatewayError) as error:
        build_request(binding, {}, [], json.dumps(body).encode(), compiled.everything)
    assert violation(error)[::2] == (field, reason)


def test_a_body_too_deep_for_the_json_mapping_is_a_400(compiled: Compiled) -> None:
    binding = bind(compiled.method, "POST", "/v1/do", "*")
    body = '{"st": ' + '{"a": ' * 150 + "1" + "}" * 151
    with pytest.raises(GatewayError) as error:
        build_request(binding, {}, [], body.encode(), compiled.everything)
    assert violation(error) == ("", "messages nested more than 100 deep", "INVALID_JSON")


def test_json_body_round_trips_every_type(compiled: Compiled) -> None:
    body = {
        "fDouble": 1.5, "fFloat": "NaN", "fInt64": "-9223372036854775808",
        "fUint64": "18446744073709551615", "fBool": True, "fBytes": "+/8=",
        "color": "COLOR_GREEN", "inner": {"name": "x", "count": 0, "leaf": {"value": "y"}},
        "rInner": [{"name": "", "count": 1}], "mCounts": {"a": 1}, "mById": {"-3": "neg"},
        "choiceNumber": "12", "ts": "2024-05-01T12:00:00Z", "dur": "-0.500s",
        "mask": "fooBar", "wBool": False, "wBytes": "", "st": {"a": {"b": None}},
        "val": [1, "two"], "any": {"@type": "type.googleapis.com/google.protobuf.Duration",
                                    "value": "2s"},
        "optInt32": 0, "rTs": ["1970-01-01T00:00:01Z"],
    }  # fmt: skip
    binding = bind(compiled.method, "POST", "/v1/do", "*", "")
    message = build_request(binding, {}, [], json.dumps(body).encode(), compiled.everything)
    rendered = json.loads(render_response(binding, message, use_proto_names=False))
    for key, value in body.items():
        assert rendered[key] == value, key


# Responses -----------------------------------------------------------------------------


def test_response_emits_unpopulated_fields_with_proto_names() -> None:
    response = pb.GenerateResponse(generated_text="hé", token_ids=[1, 2])
    assert (
        render_response(GENERATE, response)
        == (
            '{"generated_text":"hé","token_ids":[1,2],'
            '"finish_reason":"FINISH_REASON_UNSPECIFIED","model":""}'
        ).encode()
    )


def test_response_in_lower_camel_case() -> None:
    response = pb.GenerateResponse(usage=pb.Usage(total_tokens=3))
    rendered = json.loads(render_response(GENERATE, response, use_proto_names=False))
    assert rendered["generatedText"] == ""
    assert rendered["finishReason"] == "FINISH_REASON_UNSPECIFIED"
    assert rendered["usage"] == {"promptTokens": 0, "completionTokens": 0, "totalTokens": 3}


@pytest.mark.parametrize(
    ("response_body", "expected"),
    [
        ("generated_text", b'"text"'),
        ("token_ids", b"[7]"),
        ("usage", b'{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}'),
    ],
)
def test_response_body_renders_only_that_field(response_body: str, expected: bytes) -> None:
    binding = bind(GENERATE.method, "POST", "/v1/x", "*", response_body)
    response = pb.GenerateResponse(generated_text="text", token_ids=[7])
    assert render_response(binding, response) == expected


def test_unset_optional_response_body_is_null(compiled: Compiled) -> None:
    binding = bind(compiled.method, "POST", "/v1/x", "*", "opt_int32")
    assert render_response(binding, compiled.everything()) == b"null"


def test_render_message_is_a_dict_for_streams() -> None:
    message = pb.GenerateStreamResponse(text="a", token_ids=[1])
    assert render_message(message) == {
        "text": "a",
        "token_ids": [1],
        "finish_reason": "FINISH_REASON_UNSPECIFIED",
    }
    assert "tokenIds" in render_message(message, use_proto_names=False)


def test_the_test_types_stay_out_of_the_default_pool(compiled: Compiled) -> None:
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindMessageTypeByName("transcode.test.v1.Everything")
    assert Path(compiled.method.containing_service.file.name).name == "everything.proto"
