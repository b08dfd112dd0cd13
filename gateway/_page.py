"""The gateway's own HTML pages: files shipped with the package, filled in when served.

A page is an HTML file of package data (``gateway/pages/docs.html``; an extension's
own, such as ``gateway/inference/playground.html``) after one shared head
(``gateway/pages/head.html``). Each is self-contained: no build step, nothing
loaded from elsewhere (no CDN, fonts or images), so it works offline and behind
firewalls; the head's Content-Security-Policy lets a page run only its own inline
script and style and fetch only from its own origin, so nothing injected can call
out. Everything a page shows from the server goes into the DOM as text
(``textContent``, ``append(string)``), never as markup.

The docs page (:func:`docs_html`) fetches the OpenAPI JSON and shows every
operation with its parameters, request and response schemas, and a form to try
it. Streaming operations show Server-Sent Events (or NDJSON lines) as they
arrive, read with ``fetch`` and a ``ReadableStream`` (EventSource cannot POST),
and a Stop button aborts the request, which cancels the gRPC call.
"""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Mapping
from importlib.resources import files

__all__ = ["docs_html", "fill", "page"]

_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")
_OWN = "protoserve.gateway"


@functools.cache
def _text(package: str, name: str) -> str:
    return (files(package) / name).read_text(encoding="utf-8")


def fill(page: str, values: Mapping[str, str]) -> str:
    """``page`` with each ``{{NAME}}`` replaced by ``values[NAME]``, HTML-escaped.

    One pass, so a value that contains a placeholder is not substituted again.
    """
    escaped = {name: html.escape(value) for name, value in values.items()}
    return _PLACEHOLDER.sub(lambda match: escaped[match[1]], page)


def page(package: str, name: str, values: Mapping[str, str]) -> str:
    """The complete page: the shared head, then the file ``name`` of ``package``'s
    data, with its ``{{NAME}}`` placeholders filled from ``values`` (HTML-escaped)."""
    return fill(_text(_OWN, "pages/head.html") + _text(package, name), values)


def docs_html(openapi_url: str, title: str) -> str:
    """The docs page, reading the OpenAPI document from ``openapi_url``.

    Args:
        openapi_url: where the page fetches the document; a path on the page's own
            origin (the Content-Security-Policy refuses other origins).
        title: the page title.

    Returns:
        A complete HTML document; both arguments appear HTML-escaped.
    """
    return page(_OWN, "pages/docs.html", {"TITLE": title, "OPENAPI_URL": openapi_url})
