"""A browser playground for text generation and chat: one self-contained HTML page.

The public ``build_gateway`` serves it at ``/`` when its descriptors include
``protoserve.inference.v1.InferenceService`` (the gateway core stays generic,
docs/architecture.md rule 3: the page is registered from here, knows the inference
API only by its HTTP routes, and is ``playground.html``, package data beside this
module). Like the docs page it has no build step, loads nothing from elsewhere,
and its Content-Security-Policy lets it fetch only from its own origin
(``gateway/_page.py``).

The page lists the text-generation models from ``GET v1/models``, and streams a
generation with an ``EventSource`` on the GET binding of ``GenerateStream``
(``v1/models/{model}:generateStream?inputs=…&parameters.max_new_tokens=…``).
Stop closes the EventSource; closing the connection makes the gateway cancel the
gRPC call. URLs are relative to the page, so it also works behind a proxy that
serves the gateway under a path prefix.

Its chat mode keeps a conversation: each message is sent with the ones before it
(and the answers) to OpenAI's chat route, ``POST openai/v1/chat/completions`` with
``"stream": true`` (served when ``protoserve.openai.v1.OpenAIService`` is), read
with ``fetch`` and a ``ReadableStream`` (an EventSource cannot POST): ``data:``
chunks until ``data: [DONE]``, or a ``data: {"error": ...}``. The three numbers
go as ``max_tokens``, ``temperature`` and ``seed``. Stop aborts the fetch, which
cancels the call as above; a stopped answer stays in the conversation. "New chat"
forgets it.

Query parameters prefill the form, for links and for tests that drive the page
in a headless browser (which cannot click): ``mode`` (``chat``), ``model``,
``prompt``, ``max_new_tokens``, ``temperature``, ``seed``; ``autostart=1``
presses Generate (Send) once the models are loaded, ``stopAfter=N`` presses Stop
after N messages (chunks with text), and in chat mode ``followUp=TEXT`` sends
TEXT once the first answer is done.

Everything from the server goes into the DOM as text (``textContent``,
``append(string)``), never as markup.
"""

from __future__ import annotations

from protoserve.gateway._page import page

__all__ = ["playground_html"]


def playground_html(title: str) -> str:
    """The playground page.

    Args:
        title: the page title (shown HTML-escaped).

    Returns:
        A complete HTML document.
    """
    return page(__name__.rpartition(".")[0], "playground.html", {"TITLE": title})
