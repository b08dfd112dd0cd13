"""The server's logs: JSON and text lines, the request id on every line of a call, access lines."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from protoserve.common import logs
from protoserve.common.logs import (
    REQUEST_ID,
    JsonFormatter,
    RequestIdFilter,
    TextFormatter,
    configure,
)
from protoserve.inference.v1 import inference_service_pb2 as pb
from protoserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests._observe import wait_until
from tests.server.conftest import Running


def _handler(formatter: logging.Formatter) -> tuple[logging.Handler, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    handler.addFilter(RequestIdFilter())
    return handler, out


def _emit(formatter: logging.Formatter, emit: Callable[[logging.Logger], None]) -> str:
    handler, out = _handler(formatter)
    logger = logging.getLogger("protoserve.server.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        emit(logger)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    return out.getvalue()


def test_json_line_has_time_level_logger_message_and_extra_fields() -> None:
    before = datetime.now(UTC)
    line = _emit(
        JsonFormatter(), lambda log: log.info("hello %s", "world", extra={"code": "OK", "n": 3})
    )
    after = datetime.now(UTC)
    record = json.loads(line)
    assert list(record)[:4] == ["time", "level", "logger", "message"]
    assert record["level"] == "INFO"
    assert record["logger"] == "protoserve.server.test_logs"
    assert record["message"] == "hello world"
    assert record["code"] == "OK" and record["n"] == 3
    # Outside a call there is no id, and no empty field for it.
    assert "request_id" not in record
    assert record["time"].endswith("Z")
    logged = datetime.fromisoformat(record["time"])
    assert logged.utcoffset() == timedelta(0)
    # When it was logged, to the millisecond (the line's precision, truncated).
    assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= logged <= after


def test_json_line_takes_the_request_id_of_the_call_and_keeps_tracebacks() -> None:
    def emit(log: logging.Logger) -> None:
        token = REQUEST_ID.set("abc-123")
        try:
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("it failed")
        finally:
            REQUEST_ID.reset(token)
        log.warning("after", extra={"request_id": "given"})

    first, second = (json.loads(line) for line in _emit(JsonFormatter(), emit).splitlines())
    assert first["request_id"] == "abc-123" and first["level"] == "ERROR"
    assert "ValueError: boom" in first["exc_info"]
    # A line that names its request keeps that id.
    assert second["request_id"] == "given"


def test_text_line_ends_with_the_request_id_when_there_is_one() -> None:
    def emit(log: logging.Logger) -> None:
        log.info("outside")
        token = REQUEST_ID.set("abc-123")
        try:
            log.info("inside")
        finally:
            REQUEST_ID.reset(token)

    outside, inside = _emit(TextFormatter(), emit).splitlines()
    assert re.fullmatch(r"\S+ \S+ INFO protoserve\.server\.test_logs: outside", outside)
    assert inside.endswith("INFO protoserve.server.test_logs: inside [request_id=abc-123]")


def test_configure_installs_one_handler_on_the_root() -> None:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    out = io.StringIO()
    try:
        configure("debug", "text", stream=io.StringIO())
        handler = configure("info", "json", stream=out)
        assert [h for h in root.handlers if h not in handlers] == [handler]
        assert root.level == logging.INFO
        logging.getLogger("some.library").info("via the root", extra={"x": 1})
        # A writer thread writes the lines: flush() waits for it.
        assert handler.drain()
        assert json.loads(out.getvalue())["x"] == 1
        with pytest.raises(ValueError, match="xml"):
            configure("info", "xml")
    finally:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(level)
        logging.captureWarnings(False)


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[str], list[dict[str, Any]]]]:
    """The JSON lines of the in-process server so far, by request id."""
    caplog.set_level(logging.INFO)
    handler, out = _handler(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)

    def lines(rid: str) -> list[dict[str, Any]]:
        parsed = [json.loads(line) for line in out.getvalue().splitlines()]
        return [line for line in parsed if line.get("request_id") == rid]

    yield lines
    root.removeHandler(handler)


def _access(lines: Callable[[str], list[dict[str, Any]]], rid: str) -> list[dict[str, Any]]:
    # A call's line is logged as it ends; the client may see the end a moment before.
    def found() -> list[dict[str, Any]]:
        return [line for line in lines(rid) if line["logger"] == "protoserve.server.access"]

    wait_until(found, f"the access line of {rid}")
    return found()


def test_one_access_line_per_call_with_its_fields(
    stub: pb_grpc.InferenceServiceStub, logged: Callable[[str], list[dict[str, Any]]]
) -> None:
    stub.Generate(
        pb.GenerateRequest(
            model="bytelm", inputs="def ", parameters=pb.GenerationParameters(max_new_tokens=2)
        ),
        timeout=10,
        metadata=[("x-request-id", "logs-unary")],
    )
    (line,) = _access(logged, "logs-unary")
    assert line["level"] == "INFO"
    assert line["method"] == "Generate" and line["code"] == "OK"
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] > 0
    assert line["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:"))
    assert "error" not in line

    # A stream's line comes when it ends.
    chunks = list(
        stub.GenerateStream(
            pb.GenerateStreamRequest(
                model="scripted", parameters=pb.GenerationParameters(max_new_tokens=3)
            ),
            timeout=10,
            metadata=[("x-request-id", "logs-stream")],
        )
    )
    assert len(chunks) == 3
    (line,) = _access(logged, "logs-stream")
    assert line["method"] == "GenerateStream" and line["code"] == "OK"

    # An error of ours: its code, and its message on the same line (no second line).
    with pytest.raises(grpc.RpcError):
        stub.GetModel(
            pb.GetModelRequest(name="nope"), timeout=10, metadata=[("x-request-id", "logs-404")]
        )
    (line,) = _access(logged, "logs-404")
    assert line["code"] == "NOT_FOUND" and "nope" in line["error"]
    assert logged("logs-404") == [line]


def test_every_line_of_a_call_carries_its_id(
    stub: pb_grpc.InferenceServiceStub,
    running: Running,
    logged: Callable[[str], list[dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime = running.server.runtime
    get_model = runtime.get_model

    def noisy_get_model(name: str) -> Any:
        # A module that knows nothing of request ids logs while the call runs.
        logging.getLogger("tests.deeper").warning("looking up %s", name)
        return get_model(name)

    monkeypatch.setattr(runtime, "get_model", noisy_get_model)
    stub.GetModel(
        pb.GetModelRequest(name="bytelm"), timeout=10, metadata=[("x-request-id", "logs-deep")]
    )
    _access(logged, "logs-deep")
    assert [line["logger"] for line in logged("logs-deep")] == [
        "tests.deeper",
        "protoserve.server.access",
    ]

    monkeypatch.undo()

    # An unexpected failure: the traceback line and the access line, both with the id.
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(
            pb.GenerateRequest(model="exploding"),
            timeout=10,
            metadata=[("x-request-id", "logs-boom")],
        )
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    (access,) = _access(logged, "logs-boom")
    assert access["code"] == "INTERNAL"
    (failed,) = [line for line in logged("logs-boom") if line != access]
    assert failed["level"] == "ERROR" and "secret internal detail" in failed["exc_info"]


def test_a_log_stream_nobody_reads_does_not_stop_the_server(
    stub: pb_grpc.InferenceServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stderr a pipe whose reader stopped: once it is full, the server still answers every
    call; the access lines it cannot write are counted, and a line says how many once
    the pipe is read again."""
    monkeypatch.setattr(logs, "QUEUE_LINES", 50)
    read_fd, write_fd = os.pipe()
    with contextlib.suppress(AttributeError, OSError):  # Linux: a pipe of one page fills soon
        import fcntl

        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)  # type: ignore[attr-defined]
    stream = open(write_fd, "w", encoding="utf-8")
    root = logging.getLogger()
    level = root.level
    handler = configure("info", "text", stream=stream)
    read: list[bytes] = []

    def read_all() -> None:
        read.extend(iter(lambda: os.read(read_fd, 65536), b""))

    reader = threading.Thread(target=read_all)
    try:
        calls = 0
        while handler.dropped == 0:
            assert calls < 20_000, "the log queue never filled"
            stub.GetModel(pb.GetModelRequest(name="bytelm"), timeout=10)
            calls += 1
        # The writer thread is stuck in write(), the queue full: calls are still answered.
        for _ in range(100):
            assert (
                stub.GetModel(pb.GetModelRequest(name="bytelm"), timeout=10).model.name == "bytelm"
            )
        assert handler.dropped >= 100
        reader.start()  # the pipe is read again
        assert handler.drain()
        logging.getLogger("tests.after").warning("read again")
        assert handler.drain()
    finally:
        if not reader.is_alive():
            reader.start()
        root.removeHandler(handler)
        handler.close()
        stream.close()
        reader.join(30)
        os.close(read_fd)
        root.setLevel(level)
        logging.captureWarnings(False)
    lines = b"".join(read).decode().splitlines()
    # Every line that came out is whole, and says so when lines were dropped before it.
    assert all(re.fullmatch(r"\S+ \S+ [A-Z]+ \S+: .*", line) for line in lines), lines
    assert lines[-1].endswith("WARNING tests.after: read again")
    assert f"WARNING protoserve.logs: {handler.dropped} log lines dropped" in lines[-2]
    access = [line for line in lines if "protoserve.server.access: GetModel OK" in line]
    assert len(access) + handler.dropped >= calls + 100
