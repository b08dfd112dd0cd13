"""The docs page: self-contained, escaped, and its script works (under Node, or a browser)."""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from protoserve.gateway._openapi import build_openapi
from protoserve.gateway._page import docs_html
from protoserve.gateway._rules import bindings_for
from protoserve.inference.v1 import inference_service_pb2
from tests._tools import chromium, which

SERVICE = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"]


def script_of(page: str) -> str:
    scripts: list[str] = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(scripts) == 1
    return scripts[0]


def test_page_loads_nothing_from_elsewhere() -> None:
    page = docs_html("/openapi.json", "protoserve")
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)=", page, re.I)
    assert "@import" not in page
    assert "http://" not in page
    assert "https://" not in page
    assert "url(" not in page  # no CSS fetches either
    # The policy makes the browser enforce it too: fetches stay on the page's origin.
    assert "connect-src 'self'" in page
    assert "default-src 'none'" in page


def test_page_fetches_the_given_openapi_url() -> None:
    page = docs_html("/api/v1/openapi.json", "My API")
    assert 'data-openapi="/api/v1/openapi.json"' in page
    assert "<title>My API</title>" in page
    assert "document.body.dataset.openapi" in script_of(page)


def test_title_and_url_are_escaped() -> None:
    page = docs_html('/x"><script>alert(1)</script>', "</title><script>alert(2)</script>{{TITLE}}")
    assert "alert(1)</script>" not in page
    assert "alert(2)</script>" not in page
    assert "&lt;/title&gt;&lt;script&gt;alert(2)&lt;/script&gt;{{TITLE}}" in page
    assert 'data-openapi="/x&quot;&gt;&lt;script&gt;' in page


def test_script_never_inserts_markup() -> None:
    script = script_of(docs_html("/openapi.json", "t"))
    assert "innerHTML" not in script
    assert "outerHTML" not in script
    assert "insertAdjacentHTML" not in script
    assert "document.write" not in script
    assert "eval(" not in script


def test_script_helpers_under_node(tmp_path: Path) -> None:
    """The script's pure parts (SSE parsing, URLs, example bodies), run by Node."""
    node = which("node", install="Node.js, which `npm ci` needs too")
    document = build_openapi(bindings_for(SERVICE), title="t", version="1")
    (tmp_path / "page.js").write_text(script_of(docs_html("/openapi.json", "t")))
    (tmp_path / "openapi.json").write_text(json.dumps(document))
    (tmp_path / "run.js").write_text(HARNESS)
    subprocess.run([node, "--check", str(tmp_path / "page.js")], check=True)
    done = subprocess.run(
        [node, str(tmp_path / "run.js"), str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    results: dict[str, Any] = json.loads(done.stdout)

    # SSE split across chunks at awkward places, CRLF line ends and keep-alive comments.
    assert results["events"] == [
        {"event": "message", "id": "1", "data": '{"text":"a"}'},
        {"event": "message", "id": "2", "data": '{"text":"b\nc"}'},  # two data: lines
        {"event": "error", "id": None, "data": '{"code":5}'},
        {"event": "done", "id": None, "data": "{}"},
    ]
    assert results["rest"] == "event: mess"
    assert results["url"] == (
        "/v1/models/a%2Fb%20c:generateStream?inputs=x%26y%3Dz&parameters.stop_sequences=%0A"
        "&parameters.stop_sequences=stop"
    )
    assert results["multi_segment_url"] == "/v1/shelves/1/books/a%20b"
    # Example bodies set nothing the server would otherwise default.
    assert results["generate_body"] == {"inputs": "", "parameters": {}}
    assert results["predict_body"] == {"inputs": [], "parameters": {}}
    assert results["labels"] == ["GenerateStreamResponse", "string (uint64)", "array of Tensor"]


HARNESS = """\
const fs = require("fs");
const path = require("path");
const vm = require("vm");
const dir = process.argv[2];
const context = vm.createContext({});
vm.runInContext(fs.readFileSync(path.join(dir, "page.js"), "utf8"), context);
const docs = context.protoserveDocs;
const spec = JSON.parse(fs.readFileSync(path.join(dir, "openapi.json"), "utf8"));
const chunks = [
  "id: 1\\nevent: mes", "sage\\ndata: {\\"text\\":\\"a\\"}\\n", "\\n: keep-alive\\n\\n",
  "id: 2\\r\\nevent: message\\r\\ndata: {\\"text\\":\\"b\\r\\ndata: c\\"}\\r\\n\\r\\n",
  "event: error\\ndata: {\\"code\\":5}\\n\\nevent: done\\ndata: {}\\n\\nevent: mess"];
let buffer = "";
const events = [];
for (const chunk of chunks) {
  const parsed = docs.parseSse(buffer + chunk);
  buffer = parsed.rest;
  events.push(...parsed.events);
}
const stream = spec.paths["/v1/models/{model}:generateStream"].get;
const url = docs.buildUrl("/v1/models/{model}:generateStream", stream.parameters, {
  model: "a/b c", inputs: "x&y=z", "parameters.seed": "",
  "parameters.stop_sequences": ["\\n", "stop"],
});
const pattern = "^shelves/[^/]+/books/[^/]+$";
const multi = [{ name: "name", in: "path", schema: { type: "string", pattern } }];
const body = (p) => spec.paths[p].post.requestBody.content["application/json"].schema;
const seed = stream.parameters.find((p) => p.name === "parameters.seed");
const predict = spec.components.schemas["protoserve.inference.v1.PredictRequest"];
process.stdout.write(JSON.stringify({
  events, rest: buffer, url,
  multi_segment_url: docs.buildUrl("/v1/{name}", multi, { name: "shelves/1/books/a b" }),
  generate_body: docs.example(spec, body("/v1/models/{model}:generate")),
  predict_body: docs.example(spec, body("/v1/models/{model}:predict")),
  labels: [
    docs.typeLabel(stream.responses["200"].content["application/x-ndjson"].schema.anyOf[0]),
    docs.typeLabel(seed.schema),
    docs.typeLabel(predict.properties.inputs),
  ],
}));
"""


class _Site(http.server.BaseHTTPRequestHandler):
    pages: ClassVar[dict[str, tuple[str, bytes]]] = {}

    def do_GET(self) -> None:
        kind, data = self.pages.get(self.path, ("text/plain", b"not found"))
        self.send_response(200 if self.path in self.pages else 404)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def site() -> Iterator[str]:
    """The page and its document on a local port (port 0)."""
    document = build_openapi(bindings_for(SERVICE), title="t", version="1")
    _Site.pages = {
        "/docs": ("text/html; charset=utf-8", docs_html("/openapi.json", "Docs").encode()),
        "/openapi.json": ("application/json", json.dumps(document).encode()),
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Site)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_browser_renders_every_operation(site: str) -> None:
    done = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--virtual-time-budget=10000",
            "--dump-dom",
            f"{site}/docs",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    for op_id in ("InferenceService_ListModels", "InferenceService_GenerateStream_1"):
        assert f'id="{op_id}"' in done.stdout
    # As rendered text (">Could not load"), not the script's own source, which holds it too.
    assert ">Could not load" not in done.stdout
