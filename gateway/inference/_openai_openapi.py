"""The OpenAPI description of the OpenAI codec's operations (``gateway/inference/_openai.py``).

Requests and responses as OpenAI's JSON, the subset this server serves: a
request's schema lists every parameter it takes (``additionalProperties: false``,
as any other is answered 400), responses list what the codec writes. The
streaming and the unary method of a route share one operation, whose 200 is
``application/json`` or ``text/event-stream`` by the body's ``stream``.
"""

from __future__ import annotations

from typing import Any

from protoserve.gateway._rules import Binding

__all__ = ["OPENAI_SCHEMAS", "openai_operation"]

Schema = dict[str, Any]
_PREFIX = "openai."


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{_PREFIX}{name}"}


def _nullable(schema: Schema, description: str = "") -> Schema:
    """``schema`` or null (OpenAI's SDKs send null for "unset")."""
    out: Schema = {"anyOf": [schema, {"type": "null"}]}
    if description:
        out["description"] = description
    return out


def _object(properties: dict[str, Schema], required: tuple[str, ...] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    return schema


_UINT32 = {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}
_INT64 = {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}
_FLOAT = {"type": "number"}
_TEXTS = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
_IGNORED = "Accepted and ignored: it changes nothing here."

_SAMPLING: dict[str, Schema] = {
    "model": {"type": "string", "description": "The model's name (`GET /openai/v1/models`)."},
    "max_tokens": _nullable(_UINT32, "The most tokens to generate per choice."),
    "temperature": _nullable(_FLOAT, "Scales the logits before sampling; 0 is greedy."),
    "top_p": _nullable(_FLOAT, "Nucleus sampling: the most likely tokens up to this mass."),
    "top_k": _nullable(_UINT32, "Only the k most likely tokens (vLLM's extension); 0: all."),
    "seed": _nullable(_INT64, "The same request with the same seed gives the same choices."),
    "stop": _nullable(_TEXTS, "A choice ends before the first of these texts it generates."),
    "n": _nullable(_UINT32, "How many choices to generate (per prompt)."),
    "user": _nullable({"type": "string"}, "The end user; accepted, written to the access log."),
    "stream": _nullable(
        {"type": "boolean"},
        "true: the answer streams as `text/event-stream`, whatever `Accept` says.",
    ),
    "stream_options": _nullable(
        _object({"include_usage": _nullable({"type": "boolean"})}, additionalProperties=False),
        "With `stream`: `include_usage` adds a last chunk, with no choices, carrying the "
        "usage; the chunks before it have `usage: null`.",
    ),
    "logit_bias": _nullable(
        {"type": "object", "maxProperties": 0}, "Only empty: biases are not supported."
    ),
    "presence_penalty": _nullable({"const": 0}, "Only 0: penalties are not supported."),
    "frequency_penalty": _nullable({"const": 0}, "Only 0: penalties are not supported."),
}

_TEXT_PART = _object(
    {"type": {"const": "text"}, "text": {"type": "string"}},
    ("type", "text"),
    additionalProperties=False,
)
_CHAT_MESSAGE = _object(
    {
        "role": {
            "type": "string",
            "description": "`system`, `developer`, `user` or `assistant`.",
        },
        "content": _nullable(
            {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]},
            "The text, or text parts (joined). Other part types are answered 400.",
        ),
        "name": _nullable({"type": "string"}),
    },
    ("role",),
    additionalProperties=False,
)

_CHAT_REQUEST = _object(
    {
        **_SAMPLING,
        "messages": {"type": "array", "items": _ref("ChatMessage")},
        "max_completion_tokens": _nullable(_UINT32, "As max_tokens; set one of them only."),
        "logprobs": _nullable({"type": "boolean"}, "Each token's log probability."),
        "top_logprobs": _nullable(
            {"type": "integer", "minimum": 0, "maximum": 20},
            "With logprobs: the most likely tokens at each position.",
        ),
        "tools": _nullable({"type": "array", "maxItems": 0}, "Only empty: no tool calls."),
        "tool_choice": _nullable({"enum": ["none", "auto"]}),
        "functions": _nullable({"type": "array", "maxItems": 0}),
        "function_call": _nullable({"enum": ["none", "auto"]}),
        "parallel_tool_calls": _nullable({"type": "boolean"}, _IGNORED),
        "response_format": _nullable(
            _object({"type": {"const": "text"}}, ("type",), additionalProperties=False),
            "Only text.",
        ),
        "modalities": _nullable({"const": ["text"]}),
        "store": _nullable({"const": False}, "Only false: nothing is stored."),
        "metadata": _nullable({"type": "object"}, _IGNORED),
        "service_tier": _nullable({"enum": ["auto", "default"]}, _IGNORED),
    },
    ("model", "messages"),
    additionalProperties=False,
    description=(
        "OpenAI's chat completion request. Parameters the models cannot honour (`audio`, "
        "`prediction`, `web_search_options`, `reasoning_effort`, tools, other response "
        "formats, penalties) are answered 400 naming the parameter, as is any parameter "
        "OpenAI does not have."
    ),
)

_COMPLETION_REQUEST = _object(
    {
        **_SAMPLING,
        "prompt": {**_TEXTS, "description": "The text to continue, or several (not token ids)."},
        "logprobs": _nullable(
            {"type": "integer", "minimum": 0, "maximum": 5},
            "Each token's log probability and the most likely tokens at each position.",
        ),
        "echo": _nullable({"const": False}),
        "suffix": _nullable({"const": ""}),
        "best_of": _nullable(_UINT32, "Only equal to n: no candidates are discarded."),
    },
    ("model", "prompt"),
    additionalProperties=False,
    description="OpenAI's (legacy) completion request.",
)

_EMBEDDING_REQUEST = _object(
    {
        "model": _SAMPLING["model"],
        "input": {**_TEXTS, "description": "The text, or several (not token ids)."},
        "encoding_format": _nullable(
            {"enum": ["float", "base64"]},
            "`float` (the default): numbers; `base64`: each vector's little-endian float32 "
            "bytes in base64 (what OpenAI's SDKs ask for, and decode).",
        ),
        "user": _SAMPLING["user"],
    },
    ("model", "input"),
    additionalProperties=False,
    description="OpenAI's embedding request.",
)

_FINISH = _nullable({"enum": ["stop", "length"]}, "Why the choice ended; null while it goes on.")
_USAGE = _object(
    {"prompt_tokens": _UINT32, "completion_tokens": _UINT32, "total_tokens": _UINT32},
    ("prompt_tokens", "completion_tokens", "total_tokens"),
)
_TOKEN: dict[str, Schema] = {
    "token": {"type": "string"},
    "logprob": _FLOAT,
    "bytes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}},
}
_TOKEN_LOGPROB = _object({**_TOKEN, "top_logprobs": {"type": "array", "items": _object(_TOKEN)}})
_CHAT_LOGPROBS = _nullable(
    _object({"content": {"type": "array", "items": _TOKEN_LOGPROB}, "refusal": {"type": "null"}}),
    "Set when the request asked for logprobs, else null.",
)


def _head(kind: str) -> dict[str, Schema]:
    return {
        "id": {"type": "string"},
        "object": {"const": kind},
        "created": {"type": "integer", "description": "Unix seconds."},
        "model": {"type": "string"},
        "system_fingerprint": _nullable({"type": "string"}),
    }


_CHAT_COMPLETION = _object(
    {
        **_head("chat.completion"),
        "choices": {
            "type": "array",
            "items": _object(
                {
                    "index": _UINT32,
                    "message": _object(
                        {
                            "role": {"const": "assistant"},
                            "content": {"type": "string"},
                            "refusal": {"type": "null"},
                        }
                    ),
                    "logprobs": _CHAT_LOGPROBS,
                    "finish_reason": _FINISH,
                }
            ),
        },
        "usage": _ref("Usage"),
    },
    description="A whole answer (`stream` false or unset).",
)

_CHAT_CHUNK = _object(
    {
        **_head("chat.completion.chunk"),
        "choices": {
            "type": "array",
            "items": _object(
                {
                    "index": _UINT32,
                    "delta": _object(
                        {"role": {"const": "assistant"}, "content": {"type": "string"}}
                    ),
                    "logprobs": _CHAT_LOGPROBS,
                    "finish_reason": _FINISH,
                }
            ),
        },
        "usage": _nullable(_ref("Usage"), "Only with stream_options.include_usage."),
    },
    description="One `data:` event of a streamed answer (`stream` true).",
)

_LEGACY_LOGPROBS = _nullable(
    _object(
        {
            "tokens": {"type": "array", "items": {"type": "string"}},
            "token_logprobs": {"type": "array", "items": _FLOAT},
            "top_logprobs": {
                "type": "array",
                "items": {"type": "object", "additionalProperties": _FLOAT},
            },
            "text_offset": {"type": "array", "items": _UINT32},
        }
    ),
    "Set when the request asked for logprobs, else null.",
)

_COMPLETION = _object(
    {
        **_head("text_completion"),
        "choices": {
            "type": "array",
            "items": _object(
                {
                    "text": {"type": "string"},
                    "index": _UINT32,
                    "logprobs": _LEGACY_LOGPROBS,
                    "finish_reason": _FINISH,
                }
            ),
        },
        "usage": _nullable(_ref("Usage"), "In a stream, only with include_usage."),
    },
    description="The continuations, or (streamed) one `data:` event of them.",
)

_EMBEDDING_LIST = _object(
    {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": _object(
                {
                    "object": {"const": "embedding"},
                    "embedding": {
                        "anyOf": [{"type": "array", "items": _FLOAT}, {"type": "string"}],
                        "description": "Numbers, or base64 with encoding_format base64.",
                    },
                    "index": _UINT32,
                }
            ),
        },
        "model": {"type": "string"},
        "usage": _object({"prompt_tokens": _UINT32, "total_tokens": _UINT32}),
    }
)

_MODEL = _object(
    {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer", "description": "When the server loaded it, Unix seconds."},
        "owned_by": {"type": "string"},
    }
)

_ERROR = _object(
    {
        "error": _object(
            {
                "message": {"type": "string"},
                "type": {
                    "type": "string",
                    "description": "invalid_request_error (400, 404...), authentication_error "
                    "(401), permission_error (403), requests (429), server_error (5xx).",
                },
                "param": _nullable({"type": "string"}, "The parameter at fault, if one is."),
                "code": _nullable(
                    {"type": "string"},
                    "model_not_found, rate_limit_exceeded, invalid_api_key, or null.",
                ),
            },
            ("message", "type", "param", "code"),
        )
    },
    ("error",),
    description="OpenAI's error body.",
)

#: The codec's schemas, under ``components.schemas``.
OPENAI_SCHEMAS: dict[str, Schema] = {
    f"{_PREFIX}{name}": schema
    for name, schema in {
        "ChatCompletionRequest": _CHAT_REQUEST,
        "ChatMessage": _CHAT_MESSAGE,
        "ChatCompletion": _CHAT_COMPLETION,
        "ChatCompletionChunk": _CHAT_CHUNK,
        "CompletionRequest": _COMPLETION_REQUEST,
        "Completion": _COMPLETION,
        "EmbeddingRequest": _EMBEDDING_REQUEST,
        "EmbeddingList": _EMBEDDING_LIST,
        "ModelList": _object(
            {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}}
        ),
        "Model": _MODEL,
        "Usage": _USAGE,
        "Error": _ERROR,
    }.items()
}


def _stream_text(chunk: str) -> str:
    return (
        f"`stream: true`: Server-Sent Events, one `data: {{json}}` event per `{chunk}` (no "
        "`event:` or `id:` lines), then `data: [DONE]`; a failure after the stream started "
        'is one `data: {"error": ...}` event, which ends it. Lines starting with `:` are '
        "keep-alive comments."
    )


def _json(name: str, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors() -> dict[str, Schema]:
    return {
        "default": _json(
            "Error",
            "An error: 400 bad parameters (`param` names the one), 401 no or bad token, "
            "404 unknown model, 429 overloaded (with Retry-After), 500, 503.",
        )
    }


#: A request body for each route that works as it is (the /docs page starts from it).
_EXAMPLES: dict[str, Schema] = {
    "ChatCompletionRequest": {
        "model": "bytelm",
        "messages": [{"role": "user", "content": "Write a function that adds two numbers."}],
        "max_tokens": 32,
        "stream": True,
    },
    "CompletionRequest": {"model": "bytelm", "prompt": "def ", "max_tokens": 32},
    "EmbeddingRequest": {"model": "bytelm", "input": ["a text", "another"]},
}


def _body(request: str) -> Schema:
    media = {"schema": _ref(request), "example": _EXAMPLES[request]}
    return {"required": True, "content": {"application/json": media}}


def _created(request: str, unary: str, chunk: str) -> Schema:
    return {
        "requestBody": _body(request),
        "responses": {
            "200": {
                "description": "`stream` false or unset: one JSON object. " + _stream_text(chunk),
                "content": {
                    "application/json": {"schema": _ref(unary)},
                    "text/event-stream": {
                        "schema": {
                            "type": "string",
                            "description": f"`data:` events of openai.{chunk}.",
                        }
                    },
                },
            },
            **_errors(),
        },
    }


def openai_operation(binding: Binding) -> Schema | None:
    """The OpenAPI fields of ``binding``'s operation, or None for a method not known."""
    name = binding.method.name
    if name == "ListModels":
        return {"responses": {"200": _json("ModelList", "The models."), **_errors()}}
    if name == "RetrieveModel":
        return {"responses": {"200": _json("Model", "The model."), **_errors()}}
    if name in ("CreateChatCompletion", "StreamChatCompletion"):
        return _created("ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk")
    if name in ("CreateCompletion", "StreamCompletion"):
        return _created("CompletionRequest", "Completion", "Completion")
    if name == "CreateEmbedding":
        return {
            "requestBody": _body("EmbeddingRequest"),
            "responses": {"200": _json("EmbeddingList", "One vector per input."), **_errors()},
        }
    return None
