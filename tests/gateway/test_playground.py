"""The playground at ``/``: self-contained, served only for the inference API, and it streams
and stops in a real (headless) browser against a real server."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from protoserve.gateway import build_gateway, from_descriptor_set
from protoserve.gateway.inference._playground import playground_html
from tests._observe import SlowCancelled
from tests._threads import UvicornThread
from tests._tools import chromium
from tests.gateway.conftest import Stack
from tests.gateway.echo_server import build_descriptor_set
from tests.server.models_for_tests import Scripted

pytestmark = pytest.mark.e2e


def script_of(page: str) -> str:
    scripts: list[str] = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(scripts) == 1
    return scripts[0]


def test_page_loads_nothing_from_elsewhere() -> None:
    page = playground_html("protoserve")
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)=", page, re.I)
    assert "http://" not in page
    assert "https://" not in page
    assert "@import" not in page
    assert "url(" not in page
    assert "connect-src 'self'" in page
    assert "default-src 'none'" in page
    script = script_of(page)
    for markup in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert markup not in script


def test_title_is_escaped() -> None:
    page = playground_html("</title><script>alert(1)</script>{{TITLE}}")
    assert "alert(1)</script>" not in page
    assert "&lt;/title&gt;&lt;script&gt;alert(1)&lt;/script&gt;{{TITLE}}" in page


def test_served_at_root_for_the_inference_api(stack: Stack) -> None:
    response = httpx.get(stack.url + "/", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert 'id="output"' in response.text
    assert "EventSource" in response.text


def test_not_served_when_turned_off_or_for_other_services(stack: Stack) -> None:
    with tempfile.TemporaryDirectory() as folder:
        data = build_descriptor_set(Path(folder) / "echo.binpb").read_bytes()
    apps = [
        build_gateway(stack.grpc_target, playground=False),
        build_gateway(stack.grpc_target, descriptors=from_descriptor_set(data)),
    ]
    for app in apps:
        gateway = UvicornThread(app)
        try:
            assert httpx.get(gateway.url + "/", timeout=10).status_code == 404
            assert httpx.get(gateway.url + "/docs", timeout=10).status_code == 200
        finally:
            gateway.stop()


def run_page(url: str, *extra: str) -> str:
    """Chromium's DOM of ``url`` once the page went quiet (or 15 s of virtual time)."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [
                chromium(),
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
                *extra,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
    return done.stdout + done.stderr


def element(dom: str, tag: str, id_: str) -> str:
    match = re.search(rf'<{tag} id="{id_}"[^>]*>(.*?)</{tag}>', dom, re.S)
    assert match, dom
    return html.unescape(match.group(1))


def state(dom: str) -> str:
    match = re.search(r'<body data-state="(\w+)"', dom)
    assert match, dom
    return match.group(1)


def test_browser_streams_the_whole_text(stack: Stack) -> None:
    query = urlencode({"model": "scripted", "prompt": "hi", "autostart": "1"})
    steps = Scripted.steps
    dom = run_page(f"{stack.url}/?{query}", "--dump-dom")
    assert element(dom, "pre", "output") == Scripted.script.decode()
    assert state(dom) == "done", element(dom, "span", "status")
    status = element(dom, "span", "status")
    assert "end of text" in status
    assert "2 prompt + 34 generated = 36 tokens" in status
    metrics = element(dom, "div", "metrics")
    assert re.search(r"first token \d+ ms", metrics), metrics
    assert "34 tokens" in metrics
    assert Scripted.steps - steps == len(Scripted.script)


def test_browser_stop_cancels_the_generation(stack: Stack) -> None:
    cancelled = SlowCancelled(stack.server)
    # Without Stop, 1000 tokens at 20 ms would keep the page busy for 20 s.
    query = urlencode(
        {
            "model": "slow",
            "prompt": "hi",
            "max_new_tokens": "1000",
            "autostart": "1",
            "stopAfter": "5",
        }
    )
    dom = run_page(f"{stack.url}/?{query}", "--dump-dom")
    assert element(dom, "pre", "output") == "x" * 5
    assert state(dom) == "stopped"
    assert element(dom, "span", "status") == "Stopped after 5 tokens."
    # The server counted the generation cancelled and closed it, long before its 1000th token.
    cancelled.wait()


def test_browser_shows_a_refusal_readably(stack: Stack) -> None:
    query = urlencode({"model": "scripted", "prompt": "hi", "temperature": "-1", "autostart": "1"})
    dom = run_page(f"{stack.url}/?{query}", "--dump-dom")
    assert state(dom) == "error"
    status = element(dom, "span", "status")
    assert "HTTP 400" in status, status
    assert "temperature must be between 0 and 10" in status, status


def test_browser_shows_an_error_after_the_start(stack: Stack) -> None:
    query = urlencode({"model": "exploding", "prompt": "hi", "autostart": "1"})
    dom = run_page(f"{stack.url}/?{query}", "--dump-dom")
    assert state(dom) == "error"
    assert element(dom, "pre", "output") == "A"
    status = element(dom, "span", "status")
    assert status.startswith("Error: "), status
    assert "secret internal detail" not in status


def test_screenshot(stack: Stack, tmp_path: Path) -> None:
    """Renders without errors; keep the picture with PLAYGROUND_SCREENSHOT=path."""
    query = urlencode({"model": "scripted", "prompt": "Once upon a time", "autostart": "1"})
    shot = tmp_path / "playground.png"
    run_page(f"{stack.url}/?{query}", f"--screenshot={shot}", "--window-size=1000,700")
    assert shot.stat().st_size > 10_000
    if keep := os.environ.get("PLAYGROUND_SCREENSHOT"):
        shutil.copy(shot, keep)
