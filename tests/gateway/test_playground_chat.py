"""The playground's chat mode in a real (headless) browser: it keeps a conversation and
streams each answer from OpenAI's chat route, ``POST openai/v1/chat/completions`` with
``"stream": true``, and Stop cancels the generation on the server.

The page reads that stream with ``fetch``, whose body Chromium's virtual time does not
wait for (``--virtual-time-budget`` ends the page mid-answer), so these tests drive the
browser over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON
messages, each ended by a NUL, on the browser's descriptors 3 and 4) and wait until the
page says it is done (``body[data-state]``), in real time.
"""

from __future__ import annotations

import fcntl
import html
import json
import os
import re
import select
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest

from protoserve.gateway.inference._playground import playground_html
from protoserve.server.runtime.model import DEFAULT_CHAT_TEMPLATE, ChatMessage
from tests._observe import WITHIN, SlowCancelled, wait_until
from tests._tools import chromium
from tests.gateway.conftest import Stack
from tests.gateway.test_playground import element, script_of
from tests.server.models_for_tests import Scripted

pytestmark = pytest.mark.e2e

#: The states in which the page has nothing more to do.
SETTLED = ("done", "stopped", "error")


class Browser:
    """Headless Chromium driven over ``--remote-debugging-pipe``, one page at a time."""

    def __init__(self, profile: str) -> None:
        to_browser, self._commands = _high_pipe()
        self._events, from_browser = _high_pipe()
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        # bash gives the browser the pipes' ends as descriptors 3 and 4, then becomes it
        # (dash, Debian's sh, takes no descriptor above 9 in a redirection).
        shell = f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}'
        self.process = subprocess.Popen(
            ["bash", "-c", shell, chromium(), *flags],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(to_browser, from_browser),
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next_id = 0
        self.session = ""

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command (to the attached page, once there is one); its result."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                ready, _, _ = select.select([self._events], [], [], WITHIN)
                assert ready, f"the browser did not answer {method} in {WITHIN} s"
                chunk = os.read(self._events, 65536)
                assert chunk, "the browser closed its pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:  # events (no id) are not waited for
                assert "error" not in reply, reply
                return dict(reply["result"])

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)[
            "result"
        ].get("value")

    def settled_dom(self) -> str:
        """The page's DOM once it has nothing more to do (its ``data-state`` says so)."""
        wait_until(
            lambda: self.evaluate("document.body.dataset.state") in SETTLED,
            "the page settled (done, stopped or error)",
            within=WITHIN,
        )
        return str(self.evaluate("document.documentElement.outerHTML"))

    def close(self) -> None:
        """Close the browser as a user would, so that it and its helper processes are gone
        before its profile folder is removed."""
        try:
            # Not waited for: the browser may close its pipe before it answers.
            os.write(self._commands, b'{"id": 0, "method": "Browser.close"}\0')
            self.process.wait(WITHIN)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            os.close(self._commands)
            os.close(self._events)


def _high_pipe() -> tuple[int, int]:
    """A pipe whose two ends are descriptors above 9, so that giving the browser fds 3 and
    4 overwrites neither."""
    ends = os.pipe()
    try:
        return fcntl.fcntl(ends[0], fcntl.F_DUPFD_CLOEXEC, 10), fcntl.fcntl(
            ends[1], fcntl.F_DUPFD_CLOEXEC, 10
        )
    finally:
        os.close(ends[0])
        os.close(ends[1])


@pytest.fixture
def browser() -> Iterator[Browser]:
    with tempfile.TemporaryDirectory() as profile:
        made = Browser(profile)
        try:
            yield made
        finally:
            made.close()


def chat_page(browser: Browser, stack: Stack, **query: str) -> str:
    """The chat mode opened with ``query`` and started; its DOM once it settled."""
    browser.open(f"{stack.url}/?{urlencode({'mode': 'chat', 'autostart': '1', **query})}")
    return browser.settled_dom()


def turns(dom: str) -> list[tuple[str, str]]:
    """The conversation as the page shows it: (role, text) per turn."""
    found = re.findall(
        r'<li class="turn (\w+)"><div class="role">\w+</div><div class="content">(.*?)</div></li>',
        element(dom, "ol", "conversation"),
        re.S,
    )
    return [(role, html.unescape(text)) for role, text in found]


def state(dom: str) -> str:
    match = re.search(r'<body data-state="(\w+)"', dom)
    assert match, dom
    return match.group(1)


def test_the_page_streams_chat_from_the_openai_route() -> None:
    script = script_of(playground_html("protoserve"))
    assert '"openai/v1/chat/completions"' in script
    assert 'method: "POST"' in script and "stream: true" in script
    assert '"[DONE]"' in script


def test_chat_keeps_the_conversation(stack: Stack, browser: Browser) -> None:
    chat_page(browser, stack, model="scripted", prompt="hi", followUp="and then?")
    # The follow-up goes once the first answer is done: wait for its turn, then the answer.
    count = "document.querySelectorAll('#conversation li').length"
    wait_until(lambda: browser.evaluate(count) == 4, "the follow-up sent")
    dom = browser.settled_dom()
    answer = Scripted.script.decode()
    assert turns(dom) == [
        ("user", "hi"),
        ("assistant", answer),
        ("user", "and then?"),
        ("assistant", answer),
    ]
    assert state(dom) == "done", element(dom, "span", "status")
    # The second request carried the whole conversation: its prompt is all three messages.
    said = [ChatMessage("user", "hi"), ChatMessage("assistant", answer)]
    prompt = DEFAULT_CHAT_TEMPLATE.render([*said, ChatMessage("user", "and then?")])
    tokens = len(prompt.encode())  # the scripted model counts bytes
    assert element(dom, "span", "status") == (
        f"Finished: stop · {tokens} prompt + 34 generated = {tokens + 34} tokens"
    )
    assert re.search(r"first token \d+ ms", element(dom, "div", "metrics"))


def test_chat_stop_cancels_the_generation(stack: Stack, browser: Browser) -> None:
    cancelled = SlowCancelled(stack.server)
    # Without Stop, 1000 tokens at 20 ms would keep the page busy for 20 s.
    dom = chat_page(browser, stack, model="slow", prompt="hi", max_new_tokens="1000", stopAfter="5")
    assert turns(dom) == [("user", "hi"), ("assistant", "x" * 5)]
    assert state(dom) == "stopped"
    assert element(dom, "span", "status") == "Stopped after 5 chunks."
    cancelled.wait()


def test_chat_shows_a_refusal_readably(stack: Stack, browser: Browser) -> None:
    dom = chat_page(browser, stack, model="scripted", prompt="hi", temperature="-1")
    assert state(dom) == "error"
    status = element(dom, "span", "status")
    assert status.startswith("Refused: HTTP 400: "), status
    assert status.endswith("(parameter temperature)"), status
    # The refused message left no turn behind: it is back in the box, to fix and resend.
    assert turns(dom) == []
    assert browser.evaluate("document.getElementById('prompt').value") == "hi"


def test_chat_shows_an_error_after_the_start(stack: Stack, browser: Browser) -> None:
    dom = chat_page(browser, stack, model="exploding", prompt="hi")
    assert state(dom) == "error"
    assert turns(dom) == [("user", "hi"), ("assistant", "A")]
    status = element(dom, "span", "status")
    assert status.startswith("Error: "), status
    assert "secret internal detail" not in status
