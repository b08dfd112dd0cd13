"""A real browser's EventSource on the gateway's GET binding (headless Chromium)."""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from protoserve.gateway import build_gateway
from tests._threads import UvicornThread
from tests._tools import chromium
from tests.gateway.conftest import Stack
from tests.server.models_for_tests import Scripted

pytestmark = pytest.mark.e2e

PAGE = """<!doctype html><html><body><pre id="out">waiting</pre><script>
const url = "%(url)s";
const closeOnDone = %(close)s;
const seen = {messages: [], ids: [], done: false, errors: 0, opened: 0};
const source = new EventSource(url);
const out = document.getElementById("out");
function report() { seen.state = source.readyState; out.textContent = JSON.stringify(seen); }
source.onopen = () => { seen.opened += 1; report(); };
source.addEventListener("message", (e) => {
  seen.ids.push(e.lastEventId); seen.messages.push(JSON.parse(e.data).text); report(); });
source.addEventListener("done", () => {
  seen.done = true; if (closeOnDone) source.close(); report(); });
source.onerror = () => { seen.errors += 1; report(); };
</script></body></html>"""


@pytest.fixture
def pages(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(  # noqa: E731
        *a, directory=str(tmp_path), **k
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()
    server.server_close()


def run_page(browser: str, page_url: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=15000",
                "--dump-dom",
                page_url,
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
    match = re.search(r'<pre id="out">(.*?)</pre>', done.stdout, re.DOTALL)
    assert match, done.stdout + done.stderr
    text = match.group(1).replace("&quot;", '"').replace("&amp;", "&")
    return dict(json.loads(text))


@pytest.mark.parametrize("close_on_done", [True, False])
def test_eventsource_gets_every_event_and_never_reruns(
    stack: Stack, pages: tuple[str, Path], close_on_done: bool
) -> None:
    browser = chromium()
    origin, folder = pages
    gateway = UvicornThread(build_gateway(stack.grpc_target, cors_origins=[origin]))
    try:
        url = (
            f"{gateway.url}/v1/models/scripted:generateStream?inputs=hi&parameters.max_new_tokens=6"
        )
        (folder / "page.html").write_text(
            PAGE % {"url": url, "close": "true" if close_on_done else "false"}
        )
        steps = Scripted.steps
        seen = run_page(browser, f"{origin}/page.html")
    finally:
        gateway.stop()
    # The sixth token's message is also the last (it carries the finish reason).
    assert seen["messages"] == ["h", "", "é", "l", "l", "o"]
    assert seen["ids"] == [str(i) for i in range(1, 7)]
    assert seen["done"] is True
    assert seen["state"] == 2  # CLOSED: by the page, or by the 204 that answers a reconnect
    assert seen["opened"] == 1
    # One generation of six tokens, however the page behaved after "done".
    assert Scripted.steps - steps == 6
