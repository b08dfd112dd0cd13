"""Bindings read from ``google.api.http`` options, from the default pool and from
separate pools built from a ``FileDescriptorSet`` (as the gateway builds them)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor

from protoserve.gateway._rules import Binding, HttpRuleError, bindings_for
from protoserve.inference.v1 import inference_service_pb2

# protoc's include path for google/api/*.proto and google/protobuf/*.proto.
SITE_PACKAGES = Path(annotations_pb2.__file__).parents[2]
REPO_PROTOS = Path(__file__).parents[2] / "protos"

PACKAGE = "protoserve.testing.routing.v1"

ROUTING_PROTO = f"""
syntax = "proto3";
package {PACKAGE};

import "google/api/annotations.proto";
import "google/protobuf/wrappers.proto";

service ThingService {{
  rpc GetThing(GetThingRequest) returns (Thing) {{
    option (google.api.http) = {{get: "/v1/{{name=shelves/*/things/*}}"}};
  }}
  rpc CreateThing(CreateThingRequest) returns (Thing) {{
    option (google.api.http) = {{
      post: "/v1/{{parent.name=shelves/*}}/things"
      body: "thing"
    }};
  }}
  rpc ReplaceThing(ReplaceThingRequest) returns (Thing) {{
    option (google.api.http) = {{put: "/v1/things/{{thing.id}}" body: "*"}};
  }}
  rpc UpdateThing(UpdateThingRequest) returns (UpdateThingResponse) {{
    option (google.api.http) = {{
      patch: "/v1/things/{{thing.id}}"
      body: "thing"
      response_body: "thing"
    }};
  }}
  rpc DeleteThing(DeleteThingRequest) returns (Thing) {{
    option (google.api.http) = {{
      delete: "/v1/things/{{id}}"
      additional_bindings {{delete: "/v1/shelves/{{shelf}}/things/{{id}}"}}
      additional_bindings {{post: "/v1/things/{{id}}:delete" body: "*"}}
    }};
  }}
  rpc HeadThing(DeleteThingRequest) returns (Thing) {{
    option (google.api.http) = {{custom: {{kind: "head" path: "/v1/things/{{id}}"}}}};
  }}
  rpc FindThing(FindThingRequest) returns (Thing) {{
    option (google.api.http) = {{custom: {{kind: "*" path: "/v1/find/{{label}}/{{count}}"}}}};
  }}
  rpc WatchThing(DeleteThingRequest) returns (stream UpdateThingResponse) {{
    option (google.api.http) = {{get: "/v1/things/{{id}}:watch" response_body: "thing"}};
  }}
  rpc Touch(DeleteThingRequest) returns (Thing);
}}

message Thing {{
  string id = 1;
  string name = 2;
  repeated string tags = 3;
}}
message Parent {{
  string name = 1;
}}
message GetThingRequest {{
  string name = 1;
}}
message CreateThingRequest {{
  Parent parent = 1;
  Thing thing = 2;
}}
message ReplaceThingRequest {{
  Thing thing = 1;
}}
message UpdateThingRequest {{
  Thing thing = 1;
}}
message UpdateThingResponse {{
  Thing thing = 1;
}}
message DeleteThingRequest {{
  string id = 1;
  int64 shelf = 2;
}}
message FindThingRequest {{
  google.protobuf.StringValue label = 1;
  google.protobuf.Int32Value count = 2;
}}
"""

# One service per broken rule, so that each one fails on its own.
INVALID_PROTO = f"""
syntax = "proto3";
package {PACKAGE}.invalid;

import "google/api/annotations.proto";
import "google/protobuf/timestamp.proto";

message Request {{
  string id = 1;
  repeated string ids = 2;
  map<string, string> labels = 3;
  Inner inner = 4;
  google.protobuf.Timestamp when = 5;
  Color color = 6;
}}
message Inner {{
  string name = 1;
  repeated Inner children = 2;
}}
message Response {{
  string text = 1;
}}
enum Color {{
  COLOR_UNSPECIFIED = 0;
}}

service NoPattern {{
  rpc Call(Request) returns (Response) {{ option (google.api.http) = {{body: "*"}}; }}
}}
service BadTemplate {{
  rpc Call(Request) returns (Response) {{ option (google.api.http) = {{get: "/v1/{{id"}}; }}
}}
service UnknownField {{
  rpc Call(Request) returns (Response) {{ option (google.api.http) = {{get: "/v1/{{nope}}"}}; }}
}}
service UnknownNestedField {{
  rpc Call(Request) returns (Response) {{
    option (google.api.http) = {{get: "/v1/{{inner.nope}}"}};
  }}
}}
service RepeatedField {{
  rpc Call(Request) returns (Response) {{ option (google.api.http) = {{get: "/v1/{{ids}}"}}; }}
}}
service MapField {{
  rpc Call(Request) returns (Response) {{ option (google.api.http) = {{get: "/v1/{{labels}}"}}; }}
}}
service MessageField {{
  rpc Call(Request) returns (Response) {{ option (google.api.http) = {{get: "/v1/{{inner}}"}}; }}
}}
service NotWrapper {{
  rpc Call(Request) returns (Response) {{ option (google.api.http) = {{get: "/v1/{{when}}"}}; }}
}}
service ThroughScalar {{
  rpc Call(Request) returns (Response) {{ option (google.api.http) = {{get: "/v1/{{id.x}}"}}; }}
}}
service ThroughRepeated {{
  rpc Call(Request) returns (Response) {{
    option (google.api.http) = {{get: "/v1/{{inner.children.name}}"}};
  }}
}}
service BadBody {{
  rpc Call(Request) returns (Response) {{
    option (google.api.http) = {{post: "/v1/x" body: "nope"}};
  }}
}}
service NestedBody {{
  rpc Call(Request) returns (Response) {{
    option (google.api.http) = {{post: "/v1/x" body: "inner.name"}};
  }}
}}
service BadResponseBody {{
  rpc Call(Request) returns (Response) {{
    option (google.api.http) = {{get: "/v1/x" response_body: "nope"}};
  }}
}}
service StarResponseBody {{
  rpc Call(Request) returns (Response) {{
    option (google.api.http) = {{get: "/v1/x" response_body: "*"}};
  }}
}}
service NestedAdditional {{
  rpc Call(Request) returns (Response) {{
    option (google.api.http) = {{
      get: "/v1/x"
      additional_bindings {{
        get: "/v1/y"
        additional_bindings {{get: "/v1/z"}}
      }}
    }};
  }}
}}
service BadAdditional {{
  rpc Call(Request) returns (Response) {{
    option (google.api.http) = {{
      get: "/v1/x"
      additional_bindings {{get: "/v1/y"}}
      additional_bindings {{get: "/v1/{{ids}}"}}
    }};
  }}
}}
service EmptyCustomKind {{
  rpc Call(Request) returns (Response) {{
    option (google.api.http) = {{custom: {{kind: "" path: "/v1/x"}}}};
  }}
}}
service BadCustomKind {{
  rpc Call(Request) returns (Response) {{
    option (google.api.http) = {{custom: {{kind: "NOT A METHOD" path: "/v1/x"}}}};
  }}
}}
service EnumIsFine {{
  rpc Call(Request) returns (Response) {{ option (google.api.http) = {{get: "/v1/{{color}}"}}; }}
}}
"""


def compile_pool(directory: Path, files: dict[str, str]) -> descriptor_pool.DescriptorPool:
    """protoc ``files`` (name -> source, under ``directory``) into a fresh, separate pool."""
    for name, source in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(source)
    return pool_from_protoc([f"-I{directory}"], list(files), directory / "set.binpb")


def pool_from_protoc(
    includes: list[str], files: list[str], out: Path
) -> descriptor_pool.DescriptorPool:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "--include_imports",
            f"--descriptor_set_out={out}",
            *includes,
            f"-I{SITE_PACKAGES}",
            *files,
        ],
        check=True,
        capture_output=True,
    )
    file_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    # Never the default pool: other tests share this process.
    pool = descriptor_pool.DescriptorPool()
    for file in file_set.file:
        pool.Add(file)
    return pool


@pytest.fixture(scope="module")
def routing_pool(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pool.DescriptorPool:
    return compile_pool(
        tmp_path_factory.mktemp("routing"),
        {"protoserve/testing/routing/v1/routing.proto": ROUTING_PROTO},
    )


@pytest.fixture(scope="module")
def invalid_pool(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pool.DescriptorPool:
    return compile_pool(
        tmp_path_factory.mktemp("invalid"),
        {"protoserve/testing/routing/v1/invalid.proto": INVALID_PROTO},
    )


def summary(bindings: list[Binding]) -> list[tuple[str, str, str, str, str, int, bool]]:
    return [
        (
            b.method.name,
            b.verb,
            b.template.pattern,
            b.body,
            b.response_body,
            b.index,
            b.generated,
        )
        for b in bindings
    ]


PROTOSERVE_BINDINGS = [
    ("ListModels", "GET", "/v1/models", "", "", 0, False),
    ("GetModel", "GET", "/v1/models/{name}", "", "", 0, False),
    ("Generate", "POST", "/v1/models/{model}:generate", "*", "", 0, False),
    ("GenerateStream", "POST", "/v1/models/{model}:generateStream", "*", "", 0, False),
    ("GenerateStream", "GET", "/v1/models/{model}:generateStream", "", "", 1, False),
    ("Embed", "POST", "/v1/models/{model}:embed", "*", "", 0, False),
    ("Predict", "POST", "/v1/models/{model}:predict", "*", "", 0, False),
]


def test_protoserve_api_from_the_default_pool() -> None:
    service = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    bindings = bindings_for(service)
    assert summary(bindings) == PROTOSERVE_BINDINGS
    assert all(b.method.containing_service is service for b in bindings)


def test_protoserve_api_from_a_separate_pool(tmp_path: Path) -> None:
    pool = pool_from_protoc(
        [f"-I{REPO_PROTOS}"],
        ["protoserve/inference/v1/inference_service.proto"],
        tmp_path / "set.binpb",
    )
    service = pool.FindServiceByName("protoserve.inference.v1.InferenceService")
    default = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    assert service is not default
    bindings = bindings_for(service)
    assert summary(bindings) == PROTOSERVE_BINDINGS
    assert bindings[0].method is service.methods_by_name["ListModels"]


def test_every_kind_of_rule(routing_pool: descriptor_pool.DescriptorPool) -> None:
    service = routing_pool.FindServiceByName(f"{PACKAGE}.ThingService")
    assert summary(bindings_for(service)) == [
        ("GetThing", "GET", "/v1/{name=shelves/*/things/*}", "", "", 0, False),
        ("CreateThing", "POST", "/v1/{parent.name=shelves/*}/things", "thing", "", 0, False),
        ("ReplaceThing", "PUT", "/v1/things/{thing.id}", "*", "", 0, False),
        ("UpdateThing", "PATCH", "/v1/things/{thing.id}", "thing", "thing", 0, False),
        ("DeleteThing", "DELETE", "/v1/things/{id}", "", "", 0, False),
        ("DeleteThing", "DELETE", "/v1/shelves/{shelf}/things/{id}", "", "", 1, False),
        ("DeleteThing", "POST", "/v1/things/{id}:delete", "*", "", 2, False),
        # A custom kind is upper-cased; "*" (any method) stays.
        ("HeadThing", "HEAD", "/v1/things/{id}", "", "", 0, False),
        ("FindThing", "*", "/v1/find/{label}/{count}", "", "", 0, False),
        ("WatchThing", "GET", "/v1/things/{id}:watch", "", "thing", 0, False),
        # No rule: reachable at POST /{package.Service}/{Method}, body "*".
        ("Touch", "POST", f"/{PACKAGE}.ThingService/Touch", "*", "", 0, True),
    ]


def test_generated_binding_template_matches_the_grpc_path(
    routing_pool: descriptor_pool.DescriptorPool,
) -> None:
    service = routing_pool.FindServiceByName(f"{PACKAGE}.ThingService")
    touch = bindings_for(service)[-1]
    assert touch.template.match(f"/{PACKAGE}.ThingService/Touch") == {}
    assert touch.template.fields == ()


def test_options_unresolved_when_first_read_are_still_found(tmp_path: Path) -> None:
    # In a fresh process, read a method's options before google.api.annotations_pb2
    # is imported: upb then keeps google.api.http as an unknown field, and only
    # the re-parse in bindings_for finds it.
    pool_from_protoc(
        [f"-I{REPO_PROTOS}"],
        ["protoserve/inference/v1/inference_service.proto"],
        tmp_path / "set.binpb",
    )
    script = textwrap.dedent(
        f"""
        import sys
        from google.protobuf import descriptor_pb2, descriptor_pool
        data = open({str(tmp_path / "set.binpb")!r}, "rb").read()
        pool = descriptor_pool.DescriptorPool()
        for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
            pool.Add(file)
        service = pool.FindServiceByName("protoserve.inference.v1.InferenceService")
        service.methods_by_name["GetModel"].GetOptions()
        assert "google.api.annotations_pb2" not in sys.modules
        from protoserve.gateway._rules import bindings_for
        print(*(f"{{b.verb}} {{b.template.pattern}}" for b in bindings_for(service)), sep="\\n")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    )
    assert result.stdout.splitlines() == [f"{b[1]} {b[2]}" for b in PROTOSERVE_BINDINGS]


@pytest.mark.parametrize(
    ("service", "message"),
    [
        ("NoPattern", "rule of {m}: sets no pattern (get, put, post, delete, patch or custom)"),
        ("BadTemplate", "rule of {m}: invalid path template '/v1/{{id': variable 'id' is not"),
        ("UnknownField", "path variable {{nope}}: {p}.Request has no field 'nope'"),
        ("UnknownNestedField", "path variable {{inner.nope}}: {p}.Inner has no field 'nope'"),
        ("RepeatedField", "path variable {{ids}}: {p}.Request.ids is repeated"),
        ("MapField", "path variable {{labels}}: {p}.Request.labels is repeated"),
        (
            "MessageField",
            "path variable {{inner}}: {p}.Request.inner is a {p}.Inner message, "
            "not a scalar or wrapper",
        ),
        ("NotWrapper", "{p}.Request.when is a google.protobuf.Timestamp message"),
        ("ThroughScalar", "{p}.Request.id is not a message, so it has no field 'x'"),
        (
            "ThroughRepeated",
            "path variable {{inner.children.name}}: {p}.Inner.children is repeated",
        ),
        ("BadBody", "body 'nope' is not '*' or a top-level field of {p}.Request"),
        ("NestedBody", "body 'inner.name' is not '*' or a top-level field of {p}.Request"),
        ("BadResponseBody", "response_body 'nope' is not a top-level field of {p}.Response"),
        ("StarResponseBody", "response_body '*' is not a top-level field of {p}.Response"),
        ("NestedAdditional", "additional_bindings[0] of {m}: additional_bindings must not nest"),
        ("BadAdditional", "additional_bindings[1] of {m}: path variable {{ids}}"),
        ("EmptyCustomKind", "rule of {m}: custom kind '' is not an HTTP method"),
        ("BadCustomKind", "rule of {m}: custom kind 'NOT A METHOD' is not an HTTP method"),
    ],
)
def test_invalid_rules_are_rejected_naming_the_method(
    invalid_pool: descriptor_pool.DescriptorPool, service: str, message: str
) -> None:
    package = f"{PACKAGE}.invalid"
    descriptor: ServiceDescriptor = invalid_pool.FindServiceByName(f"{package}.{service}")
    expected = message.format(m=f"{package}.{service}.Call", p=package)
    with pytest.raises(HttpRuleError) as info:
        bindings_for(descriptor)
    assert expected in str(info.value)
    assert str(info.value).startswith("google.api.http ")
    assert isinstance(info.value, ValueError)


def test_enum_fields_can_be_path_variables(invalid_pool: descriptor_pool.DescriptorPool) -> None:
    service = invalid_pool.FindServiceByName(f"{PACKAGE}.invalid.EnumIsFine")
    assert [b.template.fields for b in bindings_for(service)] == [("color",)]
