"""OpenAI's HTTP API (models, chat completions, completions, embeddings), as a gateway codec.

``protoserve.openai.v1.OpenAIService`` mirrors OpenAI's JSON objects field for
field, and its ``google.api.http`` rules put them under ``/openai/v1``. What
protobuf's JSON mapping would get wrong for an OpenAI SDK is this codec's:

- requests: ``"stream": true`` selects the streaming method of a route the create
  and stream methods share (:meth:`OpenAICodec.choose_binding`); ``stop``,
  ``prompt`` and ``input`` may be a string or a list; chat ``content`` may be a
  list of text parts (joined); ``null`` means unset; parameters the models cannot
  honour (tools, audio, images, response formats other than text, penalties...)
  are refused with a 400 that names them, never ignored, and only those whose
  value changes nothing are accepted and ignored (``store: false``,
  ``metadata``...). A parameter OpenAI does not have is refused as OpenAI does:
  "Unrecognized request argument supplied: X".
- responses: ``created`` a number, ``finish_reason`` lower-case or ``null``,
  ``logprobs: null`` unless asked, token ``bytes`` as a list of numbers,
  ``usage: null`` on stream chunks before the usage chunk when it was asked for,
  embeddings as numbers or as base64 of little-endian float32.
- streams: ``data: {json}`` events and ``data: [DONE]``, whatever ``Accept`` says
  (the SDKs send ``Accept: application/json``); a failure after the stream started
  is one ``data: {"error": {...}}`` event, which ends it.
- errors: ``{"error": {"message", "type", "param", "code"}}`` with the gateway's
  HTTP status: ``param`` from the first ``google.rpc.BadRequest`` field violation
  (the server names OpenAI's parameters), ``type`` and ``code`` by status as
  OpenAI's API answers them.

It reads and writes messages by field name, so it serves descriptors from a
server's reflection as well as the compiled ones. Methods it does not know keep
the base codec's protobuf JSON mapping and the gateway's stream formats.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from protoserve.gateway._body import check_content_type
from protoserve.gateway._codecs import Codec, CodecRequest, CodecResponse, ErrorInfo
from protoserve.gateway._errors import HTTP_STATUS, GatewayError, bad_request
from protoserve.gateway._rules import Binding
from protoserve.gateway._streaming import KEEPALIVE, StreamFormat
from protoserve.gateway._transcode import build_request
from protoserve.gateway.inference._openai_openapi import OPENAI_SCHEMAS, openai_operation

__all__ = ["OPENAI_EVENTS", "OpenAICodec", "OpenAIEvents", "openai_error"]

Json = dict[str, Any]
_F = FieldDescriptor
#: The request body, parsed once per request (by choose_binding or decode_request).
_STATE_BODY = "openai.body"
#: Whether the request asked for logprobs: then every choice has its logprobs object.
_STATE_LOGPROBS = "openai.logprobs"
#: Whether stream chunks carry ``usage`` (null until the usage chunk).
_STATE_USAGE = "openai.include_usage"
_STATE_BASE64 = "openai.base64"
#: OpenAI's stand-in for a log probability of minus infinity (JSON has no infinities).
_LOGPROB_FLOOR = -9999.0
_UINT32_MAX = 2**32 - 1
_INT64 = (-(2**63), 2**63 - 1)


# Errors ------------------------------------------------------------------------------


def openai_error(status: int, status_json: Mapping[str, Any]) -> Json:
    """OpenAI's error body for an error answered with HTTP ``status``, given its
    ``google.rpc.Status`` JSON (the gateway's ``ErrorInfo.status_json``).

    ``type`` and ``code`` are the strings OpenAI's API answers: 401
    ``authentication_error``/``invalid_api_key``, 403 ``permission_error``, 429
    ``requests``/``rate_limit_exceeded`` (OpenAI names the limit that was hit, here
    the server's queue of requests), a 404 for a model ``invalid_request_error``/
    ``model_not_found``, other 4xx ``invalid_request_error``, 5xx ``server_error``.
    """
    param: str | None = None
    resource = ""
    for detail in status_json.get("details", ()):
        kind = str(detail.get("@type", "")).rpartition("/")[2]
        if kind == "google.rpc.BadRequest" and param is None:
            violations = detail.get("fieldViolations") or [{}]
            param = violations[0].get("field") or None
        elif kind == "google.rpc.ResourceInfo" and not resource:
            resource = str(detail.get("resourceType", ""))
    code: str | None = None
    if status == 401:
        kind, code = "authentication_error", "invalid_api_key"
    elif status == 403:
        kind = "permission_error"
    elif status == 429:
        kind, code = "requests", "rate_limit_exceeded"
    elif 400 <= status < 500:
        kind = "invalid_request_error"
        if status == 404 and resource.startswith("model"):
            code = "model_not_found"
    else:
        kind = "server_error"
    message = str(status_json.get("message", ""))
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


class OpenAIEvents(StreamFormat):
    """OpenAI's stream: ``data: {json}`` per message, then ``data: [DONE]``."""

    media_type = "text/event-stream"
    content_type = "text/event-stream; charset=utf-8"
    keepalive = KEEPALIVE
    description = (
        "Server-Sent Events as OpenAI sends them, whatever `Accept` says: one `data: {json}` "
        "event per chunk (no `event:` or `id:` lines), then `data: [DONE]`. A failure after "
        'the stream started is one `data: {"error": {...}}` event, which ends the stream. '
        "Lines starting with `:` are keep-alive comments."
    )

    def message(self, index: int, data: Any) -> bytes:
        # Compact JSON has no raw newline, so one data line always suffices.
        return b"data: " + _dumps(data) + b"\n\n"

    def done(self) -> bytes:
        return b"data: [DONE]\n\n"

    def error(self, status: Mapping[str, Any]) -> bytes:
        code = next((c for c in grpc.StatusCode if c.value[0] == status.get("code")), None)
        http_status = HTTP_STATUS.get(code, 500) if code is not None else 500
        return self.message(0, openai_error(http_status, status))


OPENAI_EVENTS = OpenAIEvents()


# The codec ---------------------------------------------------------------------------


class OpenAICodec(Codec):
    """OpenAI's JSON, stream framing and errors, for ``protoserve.openai.v1.OpenAIService``."""

    serves_streams = True

    @property
    def name(self) -> str:
        return "openai"

    def choose_binding(self, request: CodecRequest, bindings: Sequence[Binding]) -> Binding:
        """The streaming method when the body says ``"stream": true``, else the unary one."""
        stream = _document(request).get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise _invalid_type("stream", "a boolean", stream)
        for binding in bindings:
            if binding.method.server_streaming == bool(stream):
                return binding
        raise bad_request(
            f"'stream': {json.dumps(stream)} is not served on this route", "stream", "not served"
        )

    def decode_request(self, request: CodecRequest, message_class: type[Message]) -> Message:
        decode = _DECODERS.get(request.binding.method.name)
        if decode is None:
            return super().decode_request(request, message_class)
        return decode(request, message_class)

    def encode_response(self, request: CodecRequest, message: Message) -> CodecResponse:
        encode = _ENCODERS.get(request.binding.method.name)
        if encode is None:
            return super().encode_response(request, message)
        return CodecResponse.json(encode(message, request.state))

    def encode_error(self, binding: Binding, error: ErrorInfo) -> CodecResponse:
        return CodecResponse.json(
            openai_error(error.status, error.status_json), status=error.status
        )

    def stream_format(self, request: CodecRequest) -> StreamFormat:
        if request.binding.method.name in _STREAM_ENCODERS:
            return OPENAI_EVENTS
        return super().stream_format(request)

    def encode_stream_message(self, request: CodecRequest, message: Message) -> Any:
        encode = _STREAM_ENCODERS.get(request.binding.method.name)
        if encode is None:
            return super().encode_stream_message(request, message)
        return encode(message, request.state)

    def openapi_operation(self, binding: Binding) -> dict[str, Any] | None:
        return openai_operation(binding)

    def openapi_schemas(self) -> dict[str, Any]:
        return OPENAI_SCHEMAS


# Requests: errors ---------------------------------------------------------------------


def _kind(value: Any) -> str:
    """A JSON value's kind, in the words of OpenAI's messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _invalid_type(param: str, expected: str, value: Any) -> GatewayError:
    return bad_request(
        f"Invalid type for '{param}': expected {expected}, but got {_kind(value)} instead.",
        param,
        f"expected {expected}",
    )


def _invalid(param: str, problem: str) -> GatewayError:
    return bad_request(f"Invalid '{param}': {problem}", param, problem)


def _unsupported(param: str, value: Any) -> GatewayError:
    shown = json.dumps(value, ensure_ascii=False)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return bad_request(
        f"Unsupported parameter: '{param}' ({shown}) is not supported by this server.",
        param,
        "not supported",
    )


def _unrecognized(param: str) -> GatewayError:
    return bad_request(
        f"Unrecognized request argument supplied: {param}", param, "unrecognized argument"
    )


def _missing(param: str) -> GatewayError:
    return bad_request(f"Missing required parameter: '{param}'.", param, "required")


# Requests: the body --------------------------------------------------------------------


def _refuse_constant(text: str) -> Any:
    raise ValueError(f"{text} is not a JSON number")


def _document(request: CodecRequest) -> Json:
    """The body as a JSON object, parsed once per request."""
    found = request.state.get(_STATE_BODY)
    if found is not None:
        return dict(found)
    check_content_type(request.headers.get("content-type", ""))
    try:
        document = json.loads(request.body.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        problem = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise bad_request(
            f"We could not parse the JSON body of your request ({problem}). The API expects "
            "a JSON object.",
            "",
            "not JSON",
        ) from None
    if not isinstance(document, dict):
        raise bad_request(
            f"The request body must be a JSON object, not {_kind(document)}.", "", "not an object"
        )
    for key in document:
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate (\ud800 in the JSON) is no field name, and no text to echo.
            raise _unrecognized(key.encode("utf-8", "backslashreplace").decode()) from None
    request.state[_STATE_BODY] = document
    return dict(document)


def _string(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise _invalid_type(param, "a string", value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(param, "holds a lone UTF-16 surrogate") from None
    return value


def _integer(value: Any, param: str, low: int, high: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 2.0 is an integer in JSON
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid_type(param, "an integer", value)
    if not low <= value <= high:
        side, bound = (
            ("below minimum", f">= {low}") if value < low else ("above maximum", f"<= {high}")
        )
        raise _invalid(
            param, f"integer {side} value. Expected a value {bound}, but got {value} instead."
        )
    return value


def _number(value: Any, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid_type(param, "a decimal", value)
    number = float(value)
    if not math.isfinite(number) or abs(number) > 3.4e38:
        raise _invalid(param, f"{value} does not fit a 32-bit float.")
    return number


def _texts(value: Any, param: str) -> list[str]:
    """``stop``, ``prompt``, ``input``: a string, or an array of strings."""
    if isinstance(value, str):
        return [_string(value, param)]
    if not isinstance(value, list):
        raise _invalid_type(param, "a string or an array of strings", value)
    texts = []
    for index, item in enumerate(value):
        if isinstance(item, int | list) and not isinstance(item, bool):
            # Token ids: OpenAI takes them, but the server's models are given text.
            raise bad_request(
                f"Invalid '{param}': token ids are not supported; send the text instead.",
                param,
                "token ids are not supported",
            )
        texts.append(_string(item, f"{param}[{index}]"))
    return texts


def _set_field(message: Any, field: FieldDescriptor, value: Any, param: str) -> None:
    """A scalar or repeated-string field from its JSON value (never null here)."""
    name = field.name
    if field.is_repeated:
        if field.type != _F.TYPE_STRING:
            raise _unrecognized(param)  # no such field in OpenAI's API
        getattr(message, name).extend(_texts(value, param))
    elif field.type == _F.TYPE_STRING:
        setattr(message, name, _string(value, param))
    elif field.type == _F.TYPE_BOOL:
        if not isinstance(value, bool):
            raise _invalid_type(param, "a boolean", value)
        setattr(message, name, value)
    elif field.type in (_F.TYPE_UINT32, _F.TYPE_FIXED32):
        setattr(message, name, _integer(value, param, 0, _UINT32_MAX))
    elif field.type in (_F.TYPE_INT64, _F.TYPE_SINT64, _F.TYPE_SFIXED64):
        setattr(message, name, _integer(value, param, *_INT64))
    elif field.type in (_F.TYPE_FLOAT, _F.TYPE_DOUBLE):
        setattr(message, name, _number(value, param))
    else:
        raise _unrecognized(param)


# What a value must be for a parameter the models cannot honour to change nothing;
# None: no value does. Any other value is refused with the parameter's name.
_Harmless = Callable[[Any], bool] | None


def _equals(*allowed: Any) -> Callable[[Any], bool]:
    # By type too: True == 1 and 0 == False in Python, not in JSON.
    return lambda value: any(type(value) is type(a) and value == a for a in allowed)


def _zero(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and value == 0


def _any(kind: type) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, kind)


_PENALTIES: dict[str, _Harmless] = {
    "logit_bias": _equals({}),
    "presence_penalty": _zero,
    "frequency_penalty": _zero,
}
_CHAT_EXTRAS: dict[str, _Harmless] = {
    **_PENALTIES,
    "tools": _equals([]),
    "tool_choice": _equals("none", "auto"),
    "functions": _equals([]),
    "function_call": _equals("none", "auto"),
    # Tools are refused, so whether they may run in parallel changes nothing.
    "parallel_tool_calls": _any(bool),
    "response_format": _equals({"type": "text"}),
    "modalities": _equals(["text"]),
    "audio": None,
    "prediction": None,
    "web_search_options": None,
    "reasoning_effort": None,
    "store": _equals(False),
    "metadata": _any(dict),
    "service_tier": _equals("auto", "default"),
    # Who asks, and hints for OpenAI's own prompt cache: like user, nothing to generate by.
    "safety_identifier": _any(str),
    "prompt_cache_key": _any(str),
    "prompt_cache_retention": _any(str),
    # How long a reasoning model's answer is; the default asks for nothing else.
    "verbosity": _equals("medium"),
}
_COMPLETION_EXTRAS: dict[str, _Harmless] = {
    **_PENALTIES,
    "echo": _equals(False),
    "suffix": _equals(""),
    # best_of is checked against n in _fill.
    "best_of": None,
}
_EMBEDDING_EXTRAS: dict[str, _Harmless] = {"dimensions": None}


def _fill(
    message: Any,
    document: Json,
    extras: Mapping[str, _Harmless],
    required: Sequence[str],
    own: frozenset[str] = frozenset(),
) -> None:
    """Every field of ``document`` into ``message``, by OpenAI's rules (module docstring),
    but those in ``own``, which the caller fills, and ``stream_options``."""
    fields = message.DESCRIPTOR.fields_by_name
    for param in required:
        if document.get(param) is None:
            raise _missing(param)
    for param, value in document.items():
        if value is None or param in own or (param == "stream_options" and param in fields):
            continue
        if param in extras:
            harmless = extras[param]
            if param == "best_of":
                harmless = _equals(_integer(document.get("n") or 1, "n", 0, _UINT32_MAX))
            if harmless is None or not harmless(value):
                raise _unsupported(param, value)
            continue
        field = fields.get(param)
        if field is None or field.message_type is not None:
            raise _unrecognized(param)
        _set_field(message, field, value, param)
    options = document.get("stream_options")
    if options is not None:
        if document.get("stream") is not True:
            raise bad_request(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "stream_options",
                "only with stream",
            )
        if not isinstance(options, dict):
            raise _invalid_type("stream_options", "an object", options)
        for key, value in options.items():
            if value is None:
                continue
            if key == "include_obfuscation" and isinstance(value, bool):
                continue  # padding against a side channel of OpenAI's; none to pad here
            if key != "include_usage":
                raise _unrecognized(f"stream_options.{key}")
            _set_field(
                message.stream_options,
                message.stream_options.DESCRIPTOR.fields_by_name[key],
                value,
                f"stream_options.{key}",
            )


def _content(value: Any, param: str) -> str:
    """A message's content: a string, or text parts joined (with nothing between)."""
    if isinstance(value, str):
        return _string(value, param)
    if not isinstance(value, list):
        raise _invalid_type(param, "a string or an array of content parts", value)
    texts = []
    for index, part in enumerate(value):
        where = f"{param}[{index}]"
        if not isinstance(part, dict):
            raise _invalid_type(where, "an object", part)
        kind = part.get("type")
        if kind != "text":
            raise bad_request(
                f"Invalid '{where}.type': content parts of type {json.dumps(kind)} are not "
                "supported; this server's models take text parts only.",
                f"{where}.type",
                "only text parts",
            )
        for key, item in part.items():
            if key not in ("type", "text") and item is not None:
                raise _unrecognized(f"{where}.{key}")
        if part.get("text") is None:
            raise _missing(f"{where}.text")
        texts.append(_string(part["text"], f"{where}.text"))
    return "".join(texts)


def _messages(message: Any, value: Any) -> None:
    if not isinstance(value, list):
        raise _invalid_type("messages", "an array", value)
    for index, item in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise _invalid_type(where, "an object", item)
        if item.get("role") is None:
            raise _missing(f"{where}.role")
        entry = message.messages.add()
        for key, part in item.items():
            if part is None:
                continue
            if key == "content":
                entry.content = _content(part, f"{where}.content")
            elif key in ("role", "name"):
                setattr(entry, key, _string(part, f"{where}.{key}"))
            else:
                # tool_calls, tool_call_id, function_call, audio, refusal...: what the
                # models cannot read is refused, never dropped.
                raise _unsupported(f"{where}.{key}", part)


def _body_message(request: CodecRequest, message_class: type[Message]) -> tuple[Any, Json]:
    message: Any = message_class()
    return message, _document(request)


def _decode_chat(request: CodecRequest, message_class: type[Message]) -> Message:
    message, document = _body_message(request, message_class)
    _fill(message, document, _CHAT_EXTRAS, ("model", "messages"), frozenset({"messages"}))
    _messages(message, document["messages"])
    request.state[_STATE_LOGPROBS] = message.logprobs
    request.state[_STATE_USAGE] = message.stream_options.include_usage
    result: Message = message
    return result


def _decode_completion(request: CodecRequest, message_class: type[Message]) -> Message:
    message, document = _body_message(request, message_class)
    _fill(message, document, _COMPLETION_EXTRAS, ("model", "prompt"))
    request.state[_STATE_LOGPROBS] = message.HasField("logprobs")
    request.state[_STATE_USAGE] = message.stream_options.include_usage
    result: Message = message
    return result


def _decode_embedding(request: CodecRequest, message_class: type[Message]) -> Message:
    message, document = _body_message(request, message_class)
    _fill(message, document, _EMBEDDING_EXTRAS, ("model", "input"), frozenset({"encoding_format"}))
    encoding = document.get("encoding_format")
    if encoding is not None:
        if encoding not in ("float", "base64"):
            raise bad_request(
                f"Invalid 'encoding_format': {json.dumps(encoding)}; expected 'float' or 'base64'.",
                "encoding_format",
                "float or base64",
            )
        message.encoding_format = encoding
    request.state[_STATE_BASE64] = encoding == "base64"
    result: Message = message
    return result


def _decode_path_only(request: CodecRequest, message_class: type[Message]) -> Message:
    # GET routes: the path says everything; OpenAI's take no query parameters.
    return build_request(request.binding, request.path_params, (), b"", message_class)


_DECODERS: dict[str, Callable[[CodecRequest, type[Message]], Message]] = {
    "ListModels": _decode_path_only,
    "RetrieveModel": _decode_path_only,
    "CreateChatCompletion": _decode_chat,
    "StreamChatCompletion": _decode_chat,
    "CreateCompletion": _decode_completion,
    "StreamCompletion": _decode_completion,
    "CreateEmbedding": _decode_embedding,
}


# Responses ----------------------------------------------------------------------------


def _f32(value: float) -> float:
    """A float32 as the shortest decimal that reads back as it (0.1, not 0.100000001)."""
    for digits in (6, 7, 8, 9):
        short = float(f"{value:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", short))[0] == value:
            return short
    return value


def _logprob(value: float) -> float:
    return _f32(value) if math.isfinite(value) else _LOGPROB_FLOOR


def _finish_reason(choice: Any) -> str | None:
    """``FINISH_REASON_STOP`` -> ``"stop"``; UNSPECIFIED (the choice goes on) -> None."""
    field = choice.DESCRIPTOR.fields_by_name["finish_reason"]
    value = field.enum_type.values_by_number.get(choice.finish_reason)
    if value is None or value.number == 0:
        return None
    name: str = value.name
    return name.removeprefix("FINISH_REASON_").lower()


def _usage(usage: Any) -> Json:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _head(message: Any, kind: str) -> Json:
    return {
        "id": message.id,
        "object": message.object or kind,
        "created": message.created,
        "model": message.model,
        "system_fingerprint": message.system_fingerprint or None,
    }


def _stream_usage(message: Any, state: Mapping[str, Any], out: Json) -> Json:
    """A chunk's ``usage``: null until the usage chunk when asked for; absent when not."""
    if state.get(_STATE_USAGE) or message.HasField("usage"):
        out["usage"] = _usage(message.usage) if message.HasField("usage") else None
    return out


def _token(token: Any) -> Json:
    return {"token": token.token, "logprob": _logprob(token.logprob), "bytes": list(token.bytes)}


def _chat_logprobs(choice: Any, state: Mapping[str, Any]) -> Json | None:
    if not (state.get(_STATE_LOGPROBS) or choice.HasField("logprobs")):
        return None
    content = [
        {**_token(t), "top_logprobs": [_token(top) for top in t.top_logprobs]}
        for t in choice.logprobs.content
    ]
    return {"content": content, "refusal": None}


def _chat_completion(message: Any, state: Mapping[str, Any]) -> Json:
    choices = [
        {
            "index": choice.index,
            "message": {
                "role": choice.message.role or "assistant",
                "content": choice.message.content,
                "refusal": None,
            },
            "logprobs": _chat_logprobs(choice, state),
            "finish_reason": _finish_reason(choice),
        }
        for choice in message.choices
    ]
    return {**_head(message, "chat.completion"), "choices": choices, "usage": _usage(message.usage)}


def _chat_chunk(message: Any, state: Mapping[str, Any]) -> Json:
    choices = []
    for choice in message.choices:
        delta: Json = {}
        if choice.delta.role:
            delta["role"] = choice.delta.role
        if choice.delta.content or choice.delta.role:
            delta["content"] = choice.delta.content
        choices.append(
            {
                "index": choice.index,
                "delta": delta,
                "logprobs": _chat_logprobs(choice, state),
                "finish_reason": _finish_reason(choice),
            }
        )
    out = {**_head(message, "chat.completion.chunk"), "choices": choices}
    return _stream_usage(message, state, out)


def _completion_logprobs(choice: Any, state: Mapping[str, Any]) -> Json | None:
    if not (state.get(_STATE_LOGPROBS) or choice.HasField("logprobs")):
        return None
    logprobs = choice.logprobs
    return {
        "tokens": list(logprobs.tokens),
        "token_logprobs": [_logprob(v) for v in logprobs.token_logprobs],
        "top_logprobs": [
            {token: _logprob(v) for token, v in alternatives.logprobs.items()}
            for alternatives in logprobs.top_logprobs
        ],
        "text_offset": list(logprobs.text_offset),
    }


def _completion_choices(message: Any, state: Mapping[str, Any]) -> list[Json]:
    return [
        {
            "text": choice.text,
            "index": choice.index,
            "logprobs": _completion_logprobs(choice, state),
            "finish_reason": _finish_reason(choice),
        }
        for choice in message.choices
    ]


def _completion(message: Any, state: Mapping[str, Any]) -> Json:
    choices = _completion_choices(message, state)
    return {**_head(message, "text_completion"), "choices": choices, "usage": _usage(message.usage)}


def _completion_chunk(message: Any, state: Mapping[str, Any]) -> Json:
    out = {**_head(message, "text_completion"), "choices": _completion_choices(message, state)}
    return _stream_usage(message, state, out)


def _embeddings(message: Any, state: Mapping[str, Any]) -> Json:
    as_base64 = bool(state.get(_STATE_BASE64))
    data = []
    for item in message.data:
        values = list(item.embedding)
        vector: Any = (
            base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")
            if as_base64
            else [_f32(v) for v in values]
        )
        data.append(
            {"object": item.object or "embedding", "embedding": vector, "index": item.index}
        )
    usage = message.usage
    return {
        "object": message.object or "list",
        "data": data,
        "model": message.model,
        "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.total_tokens},
    }


def _model(model: Any) -> Json:
    return {
        "id": model.id,
        "object": model.object or "model",
        "created": model.created,
        "owned_by": model.owned_by,
    }


def _models(message: Any, state: Mapping[str, Any]) -> Json:
    return {"object": message.object or "list", "data": [_model(m) for m in message.data]}


_Encoder = Callable[[Any, Mapping[str, Any]], Json]
_ENCODERS: dict[str, _Encoder] = {
    "ListModels": _models,
    "RetrieveModel": lambda message, state: _model(message),
    "CreateChatCompletion": _chat_completion,
    "CreateCompletion": _completion,
    "CreateEmbedding": _embeddings,
}
_STREAM_ENCODERS: dict[str, _Encoder] = {
    "StreamChatCompletion": _chat_chunk,
    "StreamCompletion": _completion_chunk,
}
