"""The OpenAI route through the gateway (issue #17): aiperf profiles it, and our stream client
measures it beside the native SSE route in the same run.

Two parts, one after the other, against the suite's server and gateway:

1. **Our client on both routes.** The same streams (prompts, seeds, temperature, length)
   sent to ``POST /v1/models/bytelm:generateStream`` (SSE) and to
   ``POST /openai/v1/chat/completions`` with ``"stream": true`` (``data:`` events, then
   ``data: [DONE]``), on the same keep-alive HTTP/1.1 connections, timed and driven by the
   same code (``_loadgen``'s ``_drive``, ``_Http1``, ``_SseParser``). The native request
   carries the prompt the chat route renders from its messages (bytelm's default chat
   template) and the template's stop sequence, so both routes do the same model work; each
   stream's text must come out the same on both (decoded alone, or together to float
   rounding: ``MAX_ROUNDED_TEXTS``). Time to first token is compared as a user sees it,
   to the first message with text on both routes (the chat route's first chunk holds
   only the role, and its chunks carry no token ids): text the server holds back, such
   as a leading newline that may begin the stop sequence, delays both alike. The gap is
   between chunks with text.
2. **aiperf** (PyPI, in a virtualenv of its own: ``.nox/bench-aiperf``) profiles the chat
   route streaming: its own synthetic prompts, ``--concurrency``, ``--request-count``,
   ``--osl``. It counts tokens with a tokenizer, and this machine has no network, so the
   run writes one into its temporary folder: a byte-level BPE with no merges, 256 tokens,
   one per byte, which is what bytelm's tokens are (``write_byte_tokenizer``); aiperf
   loads it by path (``--tokenizer DIR``) with ``transformers``, offline. Decoding is
   greedy (``--extra-inputs temperature:0``): aiperf counts an answer with no text as a
   failed request, and sampled at bytelm's default temperature (1.0) about 1 answer in
   15 is empty (end of text, or the template's stop, sampled first): a fact of the small
   model, not of the route. Greedy, aiperf's prompts (seeded) get the same answers
   every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import _loadgen as lg
import _servers as srv

MODEL = "bytelm"
#: aiperf's virtualenv (``_servers.ensure_venv``): it pins transformers, pandas and more,
#: none of which protoserve's environment needs.
AIPERF = ("aiperf==0.13.0",)
#: What bytelm's default chat template makes of one user message, and where it stops
#: (protoserve.server.runtime.model.DEFAULT_CHAT_TEMPLATE): the native route gets this.
USER_TURN = "### User\n{content}\n\n### Assistant\n"
CHAT_STOP = "\n### "
#: The finish reasons of the OpenAI route, as ``_loadgen._end_error`` checks them.
_FINISH = {"length": "FINISH_REASON_LENGTH", "stop": "FINISH_REASON_STOP_SEQUENCE"}


def write_byte_tokenizer(folder: Path) -> Path:
    """A Hugging Face tokenizer of bytelm's tokens (one per byte), written to ``folder``.

    GPT-2's byte-level alphabet (each byte as one printable character), a BPE vocabulary
    of those 256 characters and no merges: every byte is one token, as in bytelm.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    chars = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + extra)
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
             "use_regex": False}  # fmt: skip
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None, "pre_tokenizer": level, "post_processor": None, "decoder": level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {chars[b]: b for b in range(256)}, "merges": []},
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# Our client on the OpenAI route -------------------------------------------------------------------


def chat_bodies(prompts: Sequence[str], *, tokens: int, temperature: float,
                first_seed: int) -> list[dict[str, Any]]:  # fmt: skip
    """One streamed chat completion per prompt (the prompt as the user's message), with a
    last chunk of usage: its token count is what the stream is checked and counted by."""
    return [
        {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
         "temperature": temperature, "seed": first_seed + i, "stream": True,
         "stream_options": {"include_usage": True}}
        for i, prompt in enumerate(prompts)
    ]  # fmt: skip


def native_bodies(chats: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The same generations as the v1 route's GenerateStream bodies: the rendered prompt,
    the template's stop sequence, the same length, temperature and seed."""
    return [
        {"inputs": USER_TURN.format(content=chat["messages"][0]["content"]),
         "parameters": {"max_new_tokens": chat["max_tokens"], "temperature": chat["temperature"],
                        "seed": str(chat["seed"]), "stop_sequences": [CHAT_STOP]}}
        for chat in chats
    ]  # fmt: skip


async def chat_streams(base_url: str, bodies: Sequence[Mapping[str, Any]], concurrency: int,
                       label: str, *, stream_timeout: float = 600.0) -> lg.Point:  # fmt: skip
    """Streamed chat completions through the gateway's OpenAI route, as
    ``_loadgen.sse_streams`` drives the native route: ``concurrency`` workers, each on a
    keep-alive connection of its own. A stream fails unless it is ``data:`` chunks, the
    last with a finish reason, then ``data: [DONE]``, with no error event."""
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    connections = [lg._Http1(host, port) for _ in range(concurrency)]

    def request_bytes(body: Mapping[str, Any]) -> tuple[bytes, int | None]:
        data = json.dumps(body).encode()
        head = (
            f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nAccept: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        return head.encode("latin-1") + data, body.get("max_tokens")

    async def one(worker: int, item: tuple[bytes, int | None]) -> lg.Stream:
        conn = connections[worker]
        try:
            return await asyncio.wait_for(_chat_one(conn, *item), stream_timeout)
        except (OSError, EOFError, ValueError, TimeoutError, asyncio.IncompleteReadError) as e:
            conn.close()
            return lg.Stream(error=f"{type(e).__name__}: {e}", code=type(e).__name__)

    try:
        items = [request_bytes(b) for b in bodies]
        return await lg._drive(label, "openai-sse-client", items, concurrency, one)
    finally:
        for conn in connections:
            conn.close()


async def _chat_one(conn: lg._Http1, request: bytes, limit: int | None) -> lg.Stream:
    reader, writer = await conn.open()
    s, start, last = lg.Stream(), time.perf_counter(), None
    writer.write(request)
    status, headers = await lg._head(reader)
    if status != 200 or not headers.get("content-type", "").startswith("text/event-stream"):
        body = b"".join([part async for part in lg._body_parts(reader, headers)])
        s.code = str(status)
        s.error = f"HTTP {status} {headers.get('content-type')}: {body[:200]!r}"
        with contextlib.suppress(KeyError, ValueError):
            s.retry_delay = float(headers["retry-after"])
    else:
        parser, done, tokens = lg._SseParser(), 0, 0
        async for chunk in lg._body_parts(reader, headers):
            for _event, _id, data in parser.feed(chunk):
                if done:
                    s.error = s.error or "an event after [DONE]"
                elif data == "[DONE]":
                    done += 1
                elif "error" in (message := json.loads(data)):
                    s.error = s.error or f"error event: {data[:200]}"
                else:
                    for choice in message.get("choices", []):
                        text = choice.get("delta", {}).get("content", "")
                        if text:  # one chunk per decode step: timed as a token message
                            now = time.perf_counter()
                            last = s.token(now, start, last, [0])
                            s.first_text = s.ttft
                            s.text += text
                        if choice.get("finish_reason"):
                            s.finish = _FINISH.get(choice["finish_reason"], choice["finish_reason"])
                    if message.get("usage"):
                        tokens = message["usage"]["completion_tokens"]
        # Chunks are not tokens (a character's bytes come together): usage counts them.
        s.token_ids = list(range(tokens)) if tokens else s.token_ids
        s.error = s.error or ("" if done else "no [DONE]")
        s.error = s.error or lg._end_error(s.finish, len(s.token_ids), limit)
    if "close" in headers.get("connection", "").lower():
        conn.close()
    return s


# aiperf -------------------------------------------------------------------------------------------


def aiperf(python: Path, url: str, tokenizer: Path, out: Path, *, concurrency: int,
           requests: int, input_tokens: int, output_tokens: int) -> dict[str, Any]:  # fmt: skip
    """``aiperf profile`` of the chat route, streaming; its summary export
    (``profile_export_aiperf.json``)."""
    command = [
        str(python.parent / "aiperf"), "profile", "--model", MODEL, "--url", f"{url}/openai",
        "--endpoint-type", "chat", "--streaming", "--tokenizer", str(tokenizer),
        "--concurrency", str(concurrency), "--request-count", str(requests),
        "--isl", str(input_tokens), "--isl-stddev", "0", "--osl", str(output_tokens),
        "--osl-stddev", "0", "--random-seed", "7", "--extra-inputs", "temperature:0",
        "--ui", "none", "--no-server-metrics",
        "--no-gpu-telemetry", "--artifact-dir", str(out),
    ]  # fmt: skip
    lg._run(command, timeout=600, env={**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1"})
    found = sorted(out.rglob("profile_export_aiperf.json"))
    if not found:
        raise RuntimeError(f"aiperf wrote no profile_export_aiperf.json under {out}")
    return dict(json.loads(found[0].read_text()))


def metric(summary: Mapping[str, Any], name: str, stat: str = "avg") -> float:
    """One statistic of one of aiperf's metrics (NaN when it has none)."""
    value = summary.get(name)
    if isinstance(value, Mapping):
        value = value.get(stat)
    return float(value) if isinstance(value, int | float) else math.nan


def summary_rows(summary: Mapping[str, Any]) -> list[list[Any]]:
    """The figures the report shows of aiperf's summary."""
    rows = []
    for name, label in (("time_to_first_token", "time to first token, ms"),
                        ("inter_token_latency", "inter-token latency, ms"),
                        ("request_latency", "request latency, ms")):  # fmt: skip
        rows.append([label, *(metric(summary, name, q) for q in ("avg", "p50", "p90", "p99"))])
    for name, label in (("output_token_throughput", "output tokens/s"),
                        ("request_throughput", "requests/s"),
                        ("output_sequence_length", "output tokens per request"),
                        ("request_count", "requests"),
                        ("error_request_count", "failed requests")):  # fmt: skip
        value = metric(summary, name)
        if name == "error_request_count" and summary and math.isnan(value):
            value = 0.0  # aiperf leaves the count out when there is none
        rows.append([label, value, "", "", ""])
    return rows


def ensure_aiperf() -> Path:
    """aiperf's Python, in ``.nox/bench-aiperf`` (made the first time, minutes)."""
    return srv.ensure_venv("aiperf", srv.ROOT, pins=AIPERF)
