"""The OpenAPI document: valid 3.1, the proto comments in it, JSON-mapping schemas."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from openapi_spec_validator import OpenAPIV31SpecValidator

from protoserve.gateway._openapi import build_openapi, comments_from_descriptor_set
from protoserve.gateway._rules import bindings_for
from protoserve.inference.v1 import inference_service_pb2

ROOT = Path(__file__).resolve().parents[2]
# The folder holding google/api/*.proto (googleapis-common-protos ships them).
GOOGLEAPIS = Path(annotations_pb2.__file__).resolve().parents[2]
SERVICE = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"]
PKG = "protoserve.inference.v1"

EDGE_PROTO = """\
syntax = "proto3";

package edge.v1;

import "google/api/annotations.proto";
import "google/api/field_behavior.proto";
import "google/protobuf/any.proto";
import "google/protobuf/duration.proto";
import "google/protobuf/empty.proto";
import "google/protobuf/field_mask.proto";
import "google/protobuf/struct.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";

// ShelfService keeps books on shelves.
service ShelfService {
  // GetBook returns one book.
  rpc GetBook(GetBookRequest) returns (Book) {
    option (google.api.http) = {get: "/v1/{name=shelves/*/books/*}"};
  }
  // UpdateBook replaces a book.
  rpc UpdateBook(UpdateBookRequest) returns (Book) {
    option deprecated = true;
    option (google.api.http) = {patch: "/v1/{book.name=shelves/*/books/*}" body: "book"};
  }
  // ListBooks streams the books of a shelf, a page per message.
  rpc ListBooks(ListBooksRequest) returns (stream ListBooksResponse) {
    option (google.api.http) = {get: "/v1/{parent=shelves/*}/books" response_body: "books"};
  }
  // Ping has no HTTP rule.
  rpc Ping(google.protobuf.Empty) returns (google.protobuf.Empty);
  // Upload takes a stream, which the gateway cannot.
  rpc Upload(stream Book) returns (google.protobuf.Empty) {
    option (google.api.http) = {post: "/v1/upload" body: "*"};
  }
}

// Book is a book on a shelf.
message Book {
  // Chapter is one chapter.
  message Chapter {
    // Kind is what a chapter is.
    enum Kind {
      // KIND_UNSPECIFIED is unknown.
      KIND_UNSPECIFIED = 0;
      // KIND_PROLOGUE comes first.
      KIND_PROLOGUE = 1;
    }
    // title of the chapter.
    string title = 1;
    // sections of the chapter, which are chapters too.
    repeated Chapter sections = 2;
    // kind of chapter.
    Kind kind = 3;
  }
  // name is the resource name.
  string name = 1;
  // title of the book.
  string title = 2 [(google.api.field_behavior) = REQUIRED];
  // create_time is when the book was added.
  google.protobuf.Timestamp create_time = 3 [(google.api.field_behavior) = OUTPUT_ONLY];
  // loan_period is how long the book may be borrowed.
  google.protobuf.Duration loan_period = 4;
  // pages counts the pages; null when unknown.
  google.protobuf.Int32Value pages = 5;
  // isbn is too large for a JavaScript number.
  fixed64 isbn = 6;
  // ratings by reader.
  map<string, sint64> ratings = 7;
  // chapters by number.
  map<int32, Chapter> chapters = 8;
  // format of the book.
  oneof format {
    // paper is the binding of the paper edition.
    string paper = 9;
    // ebook is the ebook's file.
    bytes ebook = 10;
  }
  // extra is any message.
  google.protobuf.Any extra = 11;
  // old is not used any more.
  string old = 12 [deprecated = true];
  // related books, which may refer back to this one.
  repeated Book related = 13;
  // subtitle is optional.
  optional string subtitle = 14;
}

// Page selects a page of results.
message Page {
  // size of the page.
  int32 size = 1;
  // token of the page.
  string token = 2;
  // next page, a cycle that query parameters cannot follow.
  Page next = 3;
}

// GetBookRequest names a book.
message GetBookRequest {
  // name of the book.
  string name = 1;
  // view selects chapters of a kind.
  Book.Chapter.Kind view = 2;
  // read_mask lists the fields to return.
  google.protobuf.FieldMask read_mask = 3;
  // filter is free-form JSON, which has no query form.
  google.protobuf.Struct filter = 4;
  // page selects a page.
  Page page = 5;
  // tags the book must have.
  repeated string tags = 6;
  // labels, a map, which has no query form.
  map<string, string> labels = 7;
}

// UpdateBookRequest carries the new book.
message UpdateBookRequest {
  // book replaces the book of the same name.
  Book book = 1;
  // update_mask lists the fields to replace.
  google.protobuf.FieldMask update_mask = 2;
}

// ListBooksRequest names a shelf.
message ListBooksRequest {
  // parent is the shelf.
  string parent = 1;
}

// ListBooksResponse is one page of books.
message ListBooksResponse {
  // books on the page.
  repeated Book books = 1;
}
"""


def compile_descriptor_set(out: Path, include: Path, proto: str) -> bytes:
    """protoc's FileDescriptorSet for ``proto``, with imports and source info (comments)."""
    target = out / "set.binpb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={target}",
            f"-I{include}",
            f"-I{GOOGLEAPIS}",
            proto,
        ],
        check=True,
    )
    return target.read_bytes()


def validate(document: dict[str, Any]) -> None:
    # Raises OpenAPIValidationError with the path of the first problem.
    OpenAPIV31SpecValidator(document).validate()


@pytest.fixture(scope="module")
def comments(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    data = compile_descriptor_set(
        tmp_path_factory.mktemp("protos"),
        ROOT / "protos",
        "protoserve/inference/v1/inference_service.proto",
    )
    return comments_from_descriptor_set(data)


@pytest.fixture(scope="module")
def document(comments: dict[str, str]) -> dict[str, Any]:
    return build_openapi(bindings_for(SERVICE), title="protoserve", version="1", comments=comments)


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> tuple[ServiceDescriptor, dict[str, str]]:
    """The edge-case service, from a separate pool (as descriptor sets and reflection give)."""
    folder = tmp_path_factory.mktemp("edge")
    (folder / "edge.proto").write_text(EDGE_PROTO)
    data = compile_descriptor_set(folder, folder, "edge.proto")
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        pool.Add(file)
    return pool.FindServiceByName("edge.v1.ShelfService"), comments_from_descriptor_set(data)


@pytest.fixture(scope="module")
def edge_document(edge: tuple[ServiceDescriptor, dict[str, str]]) -> dict[str, Any]:
    service, comments = edge
    return build_openapi(bindings_for(service), title="edge", version="2", comments=comments)


def operations(document: dict[str, Any]) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """operationId -> (path, verb, operation)."""
    return {
        op["operationId"]: (path, verb, op)
        for path, item in document["paths"].items()
        for verb, op in item.items()
    }


def schema(document: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = document["components"]["schemas"][name]
    return found


def ref(name: str) -> str:
    return f"#/components/schemas/{name}"


def test_document_validates_as_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] == "protoserve"
    validate(document)


def test_document_without_comments_validates_and_has_no_summaries() -> None:
    document = build_openapi(bindings_for(SERVICE), title="t", version="1")
    validate(document)
    assert all("summary" not in op for _, _, op in operations(document).values())


def test_every_binding_is_one_operation(document: dict[str, Any]) -> None:
    found = {op_id: (path, verb) for op_id, (path, verb, _) in operations(document).items()}
    assert found == {
        "InferenceService_ListModels": ("/v1/models", "get"),
        "InferenceService_GetModel": ("/v1/models/{name}", "get"),
        "InferenceService_Generate": ("/v1/models/{model}:generate", "post"),
        "InferenceService_GenerateStream": ("/v1/models/{model}:generateStream", "post"),
        "InferenceService_GenerateStream_1": ("/v1/models/{model}:generateStream", "get"),
        "InferenceService_Embed": ("/v1/models/{model}:embed", "post"),
        "InferenceService_Predict": ("/v1/models/{model}:predict", "post"),
    }
    assert document["tags"] == [
        {
            "name": "InferenceService",
            "description": "InferenceService serves the models a protoserve server holds.",
        }
    ]


def test_every_rpc_carries_its_proto_comment(document: dict[str, Any]) -> None:
    by_method = {op["x-grpc-method"]: op for _, _, op in operations(document).values()}
    for method in SERVICE.methods:
        op = by_method[f"/{PKG}.InferenceService/{method.name}"]
        # The protos' comments start with the element's name (buf's COMMENTS rule).
        assert op["description"].startswith(f"{method.name} "), method.name
        # The summary is the first sentence, on one line.
        assert " ".join(op["description"].split()).startswith(op["summary"])
        assert op["summary"].endswith(".")
    generate_stream = operations(document)["InferenceService_GenerateStream"][2]
    assert generate_stream["summary"] == (
        "GenerateStream continues a text and streams the continuation as it is produced."
    )
    assert "browser's EventSource can call it" in generate_stream["description"]


def test_generate_request_schema_follows_the_json_mapping(document: dict[str, Any]) -> None:
    request = schema(document, f"{PKG}.GenerateRequest")
    assert request["type"] == "object"
    assert request["description"] == "GenerateRequest asks a model to continue a text."
    assert set(request["properties"]) == {"model", "inputs", "parameters"}
    assert request["properties"]["parameters"] == {
        "$ref": ref(f"{PKG}.GenerationParameters"),
        "description": "parameters control the generation.",
    }
    parameters = schema(document, f"{PKG}.GenerationParameters")["properties"]
    # uint64 is a string in proto3 JSON; uint32 stays a number.
    assert parameters["seed"]["type"] == "string"
    assert parameters["seed"]["format"] == "uint64"
    assert parameters["max_new_tokens"]["type"] == "integer"
    assert parameters["temperature"] == {
        "type": "number",
        "format": "float",
        "description": "temperature scales the logits before sampling; 0 means greedy decoding.",
    }
    assert parameters["stop_sequences"]["type"] == "array"
    assert parameters["stop_sequences"]["items"] == {"type": "string"}


def test_nothing_is_required_and_optional_is_not_a_oneof(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert [name for name, s in schemas.items() if "required" in s] == []
    # proto3 `optional` makes a synthetic oneof, which is no oneof to a JSON user.
    assert "oneof" not in str(schemas[f"{PKG}.GenerationParameters"])


def test_int64_enums_bytes_and_well_known_types(document: dict[str, Any]) -> None:
    tensor = schema(document, f"{PKG}.Tensor")["properties"]
    assert tensor["shape"]["items"] == {"type": "string", "format": "int64"}
    assert tensor["raw_data"]["contentEncoding"] == "base64"
    assert tensor["raw_data"]["format"] == "byte"
    assert tensor["data_type"]["$ref"] == ref(f"{PKG}.DataType")
    state = schema(document, f"{PKG}.ModelState")
    assert state["type"] == "string"
    assert state["enum"] == [
        "MODEL_STATE_UNSPECIFIED",
        "MODEL_STATE_LOADING",
        "MODEL_STATE_READY",
        "MODEL_STATE_FAILED",
    ]
    assert (
        "- `MODEL_STATE_READY`: MODEL_STATE_READY means the model is loaded"
        in (state["description"])
    )
    spec = schema(document, f"{PKG}.ParameterSpec")["properties"]
    assert "type" not in spec["default_value"]  # google.protobuf.Value: any JSON value
    assert spec["minimum"]["type"] == "number"
    predict = schema(document, f"{PKG}.PredictRequest")["properties"]
    assert predict["parameters"]["type"] == "object"  # google.protobuf.Struct
    assert "google.protobuf.Struct" not in document["components"]["schemas"]


def test_path_and_body_split_the_request(document: dict[str, Any]) -> None:
    _, _, generate = operations(document)["InferenceService_Generate"]
    assert generate["parameters"] == [
        {
            "name": "model",
            "in": "path",
            "required": True,
            "description": "model is the name of the model to run.",
            "schema": {"type": "string"},
        }
    ]
    body = generate["requestBody"]["content"]["application/json"]["schema"]
    # body "*" is the message minus what the path binds.
    assert set(body["properties"]) == {"inputs", "parameters"}
    assert "`model`" in body["description"]
    _, _, embed = operations(document)["InferenceService_Embed"]
    assert "required" not in embed["requestBody"]


def test_get_binding_takes_the_request_as_query_parameters(document: dict[str, Any]) -> None:
    _, _, op = operations(document)["InferenceService_GenerateStream_1"]
    assert "requestBody" not in op
    params = {p["name"]: p for p in op["parameters"]}
    assert [(p["name"], p["in"]) for p in op["parameters"]] == [
        ("model", "path"),
        ("inputs", "query"),
        ("parameters.max_new_tokens", "query"),
        ("parameters.temperature", "query"),
        ("parameters.top_k", "query"),
        ("parameters.top_p", "query"),
        ("parameters.seed", "query"),
        ("parameters.stop_sequences", "query"),
    ]
    assert params["parameters.seed"]["schema"] == {"type": "string", "format": "uint64"}
    assert params["parameters.stop_sequences"]["schema"]["type"] == "array"
    assert params["parameters.top_k"]["description"].startswith("top_k samples only")
    _, _, get_model = operations(document)["InferenceService_GetModel"]
    assert [p["name"] for p in get_model["parameters"]] == ["name"]


def test_streaming_answers_sse_or_ndjson(document: dict[str, Any]) -> None:
    _, _, op = operations(document)["InferenceService_GenerateStream"]
    ok = op["responses"]["200"]
    assert set(ok["content"]) == {"text/event-stream", "application/x-ndjson"}
    assert "event: done" in ok["description"]
    assert "event: error" in ok["content"]["text/event-stream"]["schema"]["description"]
    line = ok["content"]["application/x-ndjson"]["schema"]["anyOf"]
    assert line[0] == {"$ref": ref(f"{PKG}.GenerateStreamResponse")}
    assert line[1]["properties"]["error"] == {"$ref": ref("google.rpc.Status")}
    _, _, unary = operations(document)["InferenceService_Generate"]
    assert unary["responses"]["200"]["content"] == {
        "application/json": {"schema": {"$ref": ref(f"{PKG}.GenerateResponse")}}
    }


def test_errors_are_google_rpc_status(document: dict[str, Any]) -> None:
    for _, _, op in operations(document).values():
        error = op["responses"]["default"]["content"]["application/json"]["schema"]
        assert error == {"$ref": ref("google.rpc.Status")}
    status = schema(document, "google.rpc.Status")["properties"]
    assert status["code"]["type"] == "integer"
    assert status["details"]["items"]["required"] == ["@type"]


def test_comments_are_keyed_by_full_name(comments: dict[str, str]) -> None:
    assert comments[f"{PKG}.InferenceService"].startswith("InferenceService serves")
    assert comments[f"{PKG}.InferenceService.Embed"] == (
        "Embed turns each text of a batch into one vector."
    )
    assert comments[f"{PKG}.Usage"] == "Usage counts the tokens of a generation."
    assert comments[f"{PKG}.Usage.total_tokens"] == (
        "total_tokens is prompt_tokens plus completion_tokens."
    )
    assert comments[f"{PKG}.Task"] == "Task is a kind of work a model can do."
    assert comments[f"{PKG}.Task.TASK_EMBEDDING"] == "TASK_EMBEDDING is served by Embed."
    # Multi-line comments keep their line breaks, without protoc's leading spaces.
    assert comments[f"{PKG}.GenerationParameters.top_p"] == (
        "top_p samples only among the most likely tokens whose probabilities add\n"
        "up to p (nucleus sampling); 1 means no limit, 0 keeps only the most likely\n"
        "token (greedy)."
    )


def test_comments_of_nested_elements(edge: tuple[ServiceDescriptor, dict[str, str]]) -> None:
    _, comments = edge
    assert comments["edge.v1.Book.Chapter"] == "Chapter is one chapter."
    assert comments["edge.v1.Book.Chapter.sections"].startswith("sections of the chapter")
    assert comments["edge.v1.Book.Chapter.Kind"] == "Kind is what a chapter is."
    assert comments["edge.v1.Book.Chapter.Kind.KIND_PROLOGUE"] == "KIND_PROLOGUE comes first."
    assert comments["edge.v1.Book.format"] == "format of the book."
    assert comments["edge.v1.ShelfService.Ping"] == "Ping has no HTTP rule."


def test_descriptor_set_without_source_info_gives_no_comments(tmp_path: Path) -> None:
    target = tmp_path / "bare.binpb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--descriptor_set_out={target}",
            f"-I{ROOT / 'protos'}",
            f"-I{GOOGLEAPIS}",
            "protoserve/inference/v1/inference_service.proto",
        ],
        check=True,
    )
    assert comments_from_descriptor_set(target.read_bytes()) == {}


def test_edge_document_validates(edge_document: dict[str, Any]) -> None:
    validate(edge_document)
    assert set(operations(edge_document)) == {
        "ShelfService_GetBook",
        "ShelfService_UpdateBook",
        "ShelfService_ListBooks",
        "ShelfService_Ping",
    }  # Upload, client streaming, has no HTTP form in the gateway


def test_multi_segment_path_variables(edge_document: dict[str, Any]) -> None:
    path, verb, op = operations(edge_document)["ShelfService_GetBook"]
    assert (path, verb) == ("/v1/{name}", "get")
    name = op["parameters"][0]
    assert name["schema"]["pattern"] == "^shelves/[^/]+/books/[^/]+$"
    assert "`shelves/*/books/*`" in name["description"]


def test_query_parameters_flatten_and_skip_what_has_no_query_form(
    edge_document: dict[str, Any],
) -> None:
    _, _, op = operations(edge_document)["ShelfService_GetBook"]
    params = {p["name"]: p for p in op["parameters"] if p["in"] == "query"}
    # Struct, maps and the Page.next cycle have no query form.
    assert list(params) == ["view", "read_mask", "page.size", "page.token", "tags"]
    assert params["view"]["schema"] == {"$ref": ref("edge.v1.Book.Chapter.Kind")}
    assert params["read_mask"]["schema"]["type"] == "string"
    assert params["tags"]["schema"] == {"type": "array", "items": {"type": "string"}}


def test_body_field_and_response_body(edge_document: dict[str, Any]) -> None:
    path, verb, update = operations(edge_document)["ShelfService_UpdateBook"]
    assert (path, verb) == ("/v1/{book.name}", "patch")
    assert update["deprecated"] is True
    assert [(p["name"], p["in"]) for p in update["parameters"]] == [
        ("book.name", "path"),
        ("update_mask", "query"),
    ]
    body = update["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"] == ref("edge.v1.Book")
    _, _, listing = operations(edge_document)["ShelfService_ListBooks"]
    line = listing["responses"]["200"]["content"]["application/x-ndjson"]["schema"]["anyOf"][0]
    assert line == {
        "type": "array",
        "items": {"$ref": ref("edge.v1.Book")},
        "description": "books on the page.",
    }


def test_generated_binding_and_empty(edge_document: dict[str, Any]) -> None:
    path, verb, ping = operations(edge_document)["ShelfService_Ping"]
    assert (path, verb) == ("/edge.v1.ShelfService/Ping", "post")
    assert "no `google.api.http` rule" in ping["description"]
    body = ping["requestBody"]["content"]["application/json"]["schema"]
    assert body["type"] == "object"
    assert "google.protobuf.Empty" not in edge_document["components"]["schemas"]


def test_message_schema_edge_cases(edge_document: dict[str, Any]) -> None:
    book = schema(edge_document, "edge.v1.Book")
    props = book["properties"]
    assert book["required"] == ["title"]  # google.api.field_behavior = REQUIRED
    assert "At most one of `paper`, `ebook` is set (oneof `format`)." in book["description"]
    assert props["paper"]["description"].endswith("Member of oneof `format`.")
    assert "oneof" not in props["subtitle"].get("description", "")
    assert props["create_time"]["format"] == "date-time"
    assert props["create_time"]["readOnly"] is True
    assert props["loan_period"]["pattern"] == r"^-?[0-9]+(\.[0-9]{1,9})?s$"
    assert props["pages"]["type"] == ["integer", "null"]
    assert props["isbn"]["type"] == "string"
    assert props["ratings"]["additionalProperties"] == {"type": "string", "format": "int64"}
    assert props["chapters"]["propertyNames"] == {"pattern": "^-?[0-9]+$"}
    assert props["chapters"]["additionalProperties"] == {"$ref": ref("edge.v1.Book.Chapter")}
    assert props["ebook"]["contentEncoding"] == "base64"
    assert props["extra"]["properties"]["@type"]["type"] == "string"
    assert props["old"]["deprecated"] is True
    # Recursion goes through $ref, never expanded.
    assert props["related"]["items"] == {"$ref": ref("edge.v1.Book")}
    chapter = schema(edge_document, "edge.v1.Book.Chapter")
    assert chapter["properties"]["sections"]["items"] == {"$ref": ref("edge.v1.Book.Chapter")}
    kind = schema(edge_document, "edge.v1.Book.Chapter.Kind")
    assert kind["enum"] == ["KIND_UNSPECIFIED", "KIND_PROLOGUE"]


def test_json_names_when_the_gateway_writes_them(
    edge: tuple[ServiceDescriptor, dict[str, str]],
) -> None:
    service, comments = edge
    document = build_openapi(
        bindings_for(service), title="edge", version="2", comments=comments, use_proto_names=False
    )
    validate(document)
    assert "createTime" in schema(document, "edge.v1.Book")["properties"]
