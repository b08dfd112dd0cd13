"""Errors over HTTP: the code table, the google.rpc.Status body, and real upstream errors."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, duration_pb2, message_factory
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from starlette.responses import Response

from protoserve.gateway._call import answer_error
from protoserve.gateway._errors import (
    HTTP_STATUS,
    GatewayError,
    bad_request,
    error_info,
    status_json,
)

Code = grpc.StatusCode


def from_grpc_error(
    error: grpc.RpcError, pool: descriptor_pool.DescriptorPool | None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(HTTP status, body, headers): what the gateway answers for a failed upstream call."""
    info, headers = error_info(error, pool)
    return info.status, info.status_json, headers


def error_response(
    error: GatewayError | grpc.RpcError, *, headers: dict[str, str] | None = None
) -> Response:
    """The gateway's answer to ``error`` where no codec is registered, with ``headers``
    added as ``RequestIdMiddleware`` adds ``X-Request-Id``."""
    response = answer_error(error, None)
    for key, value in (headers or {}).items():
        response.headers.setdefault(key, value)
    return response


def test_every_code_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(grpc.StatusCode)


def test_the_table_is_google_rpc_code_protos() -> None:
    assert {code.name: status for code, status in HTTP_STATUS.items()} == {
        "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400,
        "DEADLINE_EXCEEDED": 504, "NOT_FOUND": 404, "ALREADY_EXISTS": 409,
        "PERMISSION_DENIED": 403, "UNAUTHENTICATED": 401, "RESOURCE_EXHAUSTED": 429,
        "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400,
        "UNIMPLEMENTED": 501, "INTERNAL": 500, "UNAVAILABLE": 503, "DATA_LOSS": 500,
    }  # fmt: skip


def test_the_table_cannot_be_changed() -> None:
    with pytest.raises(TypeError):
        HTTP_STATUS[Code.NOT_FOUND] = 410  # type: ignore[index]


# A type that only a pool of the test's own knows --------------------------------------


@pytest.fixture(scope="module")
def pool() -> descriptor_pool.DescriptorPool:
    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="errors_test/quota_hint.proto",
        package="errors.test.v1",
        syntax="proto3",
        message_type=[
            descriptor_pb2.DescriptorProto(
                name="QuotaHint",
                field=[
                    field(
                        name="spare_tokens",
                        json_name="spareTokens",
                        number=1,
                        type=field.TYPE_INT32,
                        label=field.LABEL_OPTIONAL,
                    ),
                ],
            )
        ],
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return pool


def quota_hint(pool: descriptor_pool.DescriptorPool, spare: int) -> Message:
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("errors.test.v1.QuotaHint"))
    return cls(spare_tokens=spare)


def packed(message: Message) -> any_pb2.Any:
    result = any_pb2.Any()
    result.Pack(message)
    return result


BAD_REQUEST = error_details_pb2.BadRequest(
    field_violations=[
        error_details_pb2.BadRequest.FieldViolation(
            field="parameters.temperature", description="must be at most 2"
        )
    ]
)
BAD_REQUEST_JSON = {
    "@type": "type.googleapis.com/google.rpc.BadRequest",
    "fieldViolations": [{"field": "parameters.temperature", "description": "must be at most 2"}],
}
UNKNOWN_ANY = any_pb2.Any(type_url="type.googleapis.com/nowhere.v1.Secret", value=b"\x08\x2a")
UNKNOWN_JSON = {"@type": "type.googleapis.com/nowhere.v1.Secret", "value": "CCo="}


# status_json -------------------------------------------------------------------------


def test_status_json_without_details_still_has_the_list() -> None:
    assert status_json(Code.NOT_FOUND, "no model", []) == {
        "code": 5,
        "message": "no model",
        "details": [],
    }


def test_status_json_renders_messages_and_anys_typed() -> None:
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1, nanos=5))
    body = status_json(Code.INVALID_ARGUMENT, "bad", [BAD_REQUEST, packed(retry)])
    assert body["details"] == [
        BAD_REQUEST_JSON,
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1.000000005s"},
    ]


def test_status_json_puts_a_well_known_types_json_under_value() -> None:
    body = status_json(Code.INTERNAL, "x", [packed(duration_pb2.Duration(seconds=3))])
    assert body["details"] == [
        {"@type": "type.googleapis.com/google.protobuf.Duration", "value": "3s"}
    ]


def test_status_json_renders_an_unknown_any_as_base64() -> None:
    body = status_json(Code.INTERNAL, "x", [UNKNOWN_ANY])
    assert body["details"] == [UNKNOWN_JSON]


def test_status_json_renders_bytes_that_do_not_parse_as_base64() -> None:
    broken = any_pb2.Any(type_url="type.googleapis.com/google.rpc.BadRequest", value=b"\xff\xff")
    body = status_json(Code.INTERNAL, "x", [broken])
    assert body["details"] == [
        {"@type": broken.type_url, "value": base64.b64encode(b"\xff\xff").decode()}
    ]


def test_status_json_finds_other_types_in_the_pool(pool: descriptor_pool.DescriptorPool) -> None:
    hint = quota_hint(pool, 7)
    typed = {"@type": "type.googleapis.com/errors.test.v1.QuotaHint", "spareTokens": 7}
    assert status_json(Code.UNAVAILABLE, "x", [packed(hint)], pool)["details"] == [typed]
    assert status_json(Code.UNAVAILABLE, "x", [hint], None)["details"] == [typed]
    # Without the pool the Any's type is unknown: bytes, not an error.
    assert status_json(Code.UNAVAILABLE, "x", [packed(hint)])["details"] == [
        {"@type": typed["@type"], "value": base64.b64encode(b"\x08\x07").decode()}
    ]


# GatewayError and bad_request ------------------------------------------------------


def test_gateway_error_takes_its_http_status_from_the_table() -> None:
    error = GatewayError(Code.NOT_FOUND, "no route for GET /nope")
    assert (error.http_status, error.headers, error.details) == (404, {}, ())
    assert str(error) == "no route for GET /nope"


def test_gateway_error_overrides_for_what_http_says_better() -> None:
    error = GatewayError(
        Code.UNIMPLEMENTED, "PUT is not allowed", http_status=405, headers={"Allow": "GET, POST"}
    )
    response = error_response(error)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
    assert json.loads(bytes(response.body)) == {
        "code": 12,
        "message": "PUT is not allowed",
        "details": [],
    }


def test_bad_request_carries_one_field_violation() -> None:
    error = bad_request("bad seed", "parameters.seed", "expected uint64", reason="INVALID_VALUE")
    assert error.code == Code.INVALID_ARGUMENT
    assert status_json(error.code, error.message, error.details)["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [
                {
                    "field": "parameters.seed",
                    "description": "expected uint64",
                    "reason": "INVALID_VALUE",
                },
            ],
        }
    ]


def test_error_response_is_json() -> None:
    response = error_response(GatewayError(Code.INVALID_ARGUMENT, "é"), headers={"X-A": "1"})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-a"] == "1"
    assert response.body == '{"code":3,"message":"é","details":[]}'.encode()


# from_grpc_error, against a real grpc.aio server --------------------------------------

SERVICE = "errors.test.v1.Failing"


def status_trailer(code: Code, message: str, details: list[Message]) -> tuple[tuple[str, bytes]]:
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return (("grpc-status-details-bin", status.SerializeToString()),)


def retry(seconds: int, nanos: int = 0) -> Message:
    info: Message = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=seconds, nanos=nanos)
    )
    return info


def failing_methods(pool: descriptor_pool.DescriptorPool) -> dict[str, Any]:
    unknown_status = status_pb2.Status(code=3, message="bad input")
    unknown_status.details.add().Pack(BAD_REQUEST)
    unknown_status.details.append(UNKNOWN_ANY)
    unknown_status.details.add().Pack(quota_hint(pool, 3))
    cases: dict[str, tuple[Code, str, Any]] = {
        "BadRequest": (Code.INVALID_ARGUMENT, "bad input",
                       (("grpc-status-details-bin", unknown_status.SerializeToString()),)),
        "Exhausted": (Code.RESOURCE_EXHAUSTED, "queue full",
                      status_trailer(Code.RESOURCE_EXHAUSTED, "queue full", [retry(1, 200)])),
        "Unavailable": (Code.UNAVAILABLE, "loading",
                        status_trailer(Code.UNAVAILABLE, "loading", [retry(0)])),
        "NotRetryable": (Code.FAILED_PRECONDITION, "not ready",
                         status_trailer(Code.FAILED_PRECONDITION, "not ready", [retry(5)])),
        "Plain": (Code.NOT_FOUND, "no such model", ()),
        "Garbage": (Code.INTERNAL, "oops", (("grpc-status-details-bin", b"\xff\x00\xff"),)),
        "Mismatch": (Code.DATA_LOSS, "lost", status_trailer(Code.OK, "other", [BAD_REQUEST])),
    }  # fmt: skip

    def handler(code: Code, message: str, trailers: Any) -> Callable[..., Awaitable[bytes]]:
        async def fail(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            await context.abort(code, message, trailing_metadata=trailers)
            raise AssertionError("abort returned")

        return fail

    return {
        name: grpc.unary_unary_rpc_method_handler(handler(*case)) for name, case in cases.items()
    }


async def call_failing(
    pool: descriptor_pool.DescriptorPool, names: list[str]
) -> dict[str, tuple[grpc.aio.AioRpcError, grpc.RpcError]]:
    """Each method's error, as an aio client and as a sync client see it."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, failing_methods(pool)),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    errors = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for name in names:
                with pytest.raises(grpc.aio.AioRpcError) as aio_error:
                    await channel.unary_unary(f"/{SERVICE}/{name}", None, None)(b"", timeout=10)
                sync_error = await asyncio.to_thread(call_sync, port, name)
                errors[name] = (aio_error.value, sync_error)
    finally:
        await server.stop(None)
    return errors


def call_sync(port: int, name: str) -> grpc.RpcError:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as error:
            channel.unary_unary(f"/{SERVICE}/{name}", None, None)(b"", timeout=10)
    return error.value


@pytest.fixture(scope="module")
def upstream_errors(
    pool: descriptor_pool.DescriptorPool,
) -> dict[str, tuple[grpc.aio.AioRpcError, grpc.RpcError]]:
    names = ["BadRequest", "Exhausted", "Unavailable", "NotRetryable", "Plain", "Garbage",
             "Mismatch"]  # fmt: skip
    return asyncio.run(call_failing(pool, names))


@pytest.fixture(params=["aio", "sync"])
def errors(
    request: pytest.FixtureRequest,
    upstream_errors: dict[str, tuple[grpc.aio.AioRpcError, grpc.RpcError]],
) -> dict[str, grpc.RpcError]:
    index = 0 if request.param == "aio" else 1
    return {name: pair[index] for name, pair in upstream_errors.items()}


def test_upstream_details_are_typed_and_unknown_ones_kept_as_bytes(
    errors: dict[str, grpc.RpcError], pool: descriptor_pool.DescriptorPool
) -> None:
    status, body, headers = from_grpc_error(errors["BadRequest"], pool)
    assert (status, headers) == (400, {})
    assert body == {
        "code": 3,
        "message": "bad input",
        "details": [
            BAD_REQUEST_JSON,
            UNKNOWN_JSON,
            {"@type": "type.googleapis.com/errors.test.v1.QuotaHint", "spareTokens": 3},
        ],
    }


@pytest.mark.parametrize(
    ("name", "status", "retry_after"),
    [("Exhausted", 429, "2"), ("Unavailable", 503, "1"), ("NotRetryable", 400, None)],
)
def test_retry_info_becomes_retry_after(
    errors: dict[str, grpc.RpcError], name: str, status: int, retry_after: str | None
) -> None:
    found_status, body, headers = from_grpc_error(errors[name], None)
    assert found_status == status
    assert headers.get("Retry-After") == retry_after
    assert body["details"][0]["@type"] == "type.googleapis.com/google.rpc.RetryInfo"


def test_an_error_without_details_has_an_empty_list(errors: dict[str, grpc.RpcError]) -> None:
    assert from_grpc_error(errors["Plain"], None) == (
        404,
        {"code": 5, "message": "no such model", "details": []},
        {},
    )


def test_a_details_trailer_that_does_not_parse_is_ignored(
    errors: dict[str, grpc.RpcError],
) -> None:
    assert from_grpc_error(errors["Garbage"], None) == (
        500,
        {"code": 13, "message": "oops", "details": []},
        {},
    )


def test_the_calls_own_code_wins_over_a_disagreeing_trailer(
    errors: dict[str, grpc.RpcError],
) -> None:
    status, body, _ = from_grpc_error(errors["Mismatch"], None)
    assert (status, body["code"], body["message"]) == (500, 15, "lost")
    assert body["details"] == [BAD_REQUEST_JSON]


def test_error_response_of_an_upstream_error(errors: dict[str, grpc.RpcError]) -> None:
    response = error_response(errors["Exhausted"], headers={"X-Request-Id": "r1"})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.headers["x-request-id"] == "r1"
    assert response.headers["content-type"] == "application/json"
    assert json.loads(bytes(response.body))["message"] == "queue full"


def test_an_rpc_error_of_no_known_shape_says_nothing_of_itself() -> None:
    status, body, headers = from_grpc_error(grpc.RpcError("secret internals"), None)
    assert (status, headers) == (500, {})
    assert body == {"code": 2, "message": "the upstream call failed", "details": []}


def test_a_pool_whose_lookups_fail_still_renders_every_detail(
    errors: dict[str, grpc.RpcError],
) -> None:
    # The reflection-backed pool the gateway once kept asked its closed channel for every
    # name it had not seen, and raised ValueError: the answer was a plain-text 500.
    channel = grpc.insecure_channel("127.0.0.1:1")
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    channel.close()
    status, body, headers = from_grpc_error(errors["BadRequest"], pool)
    assert (status, headers) == (400, {})
    assert body["details"][:2] == [BAD_REQUEST_JSON, UNKNOWN_JSON]
    assert body["details"][2]["@type"] == "type.googleapis.com/errors.test.v1.QuotaHint"
