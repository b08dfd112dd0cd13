"""What the gateway's own HTML pages (docs, playground) share: the head and the filling-in."""

from __future__ import annotations

import html
import re
from collections.abc import Mapping

__all__ = ["HEAD", "fill"]

#: The start of every page, up to its <title>. The Content-Security-Policy lets a
#: page run only its own inline script and style and fetch only from its own
#: origin: nothing is loaded from the internet, and nothing injected can call out.
HEAD = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; \
script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; \
base-uri 'none'; form-action 'none'">
"""

_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")


def fill(page: str, values: Mapping[str, str]) -> str:
    """``page`` with each ``{{NAME}}`` replaced by ``values[NAME]``, HTML-escaped.

    One pass, so a value that contains a placeholder is not substituted again.
    """
    escaped = {name: html.escape(value) for name, value in values.items()}
    return _PLACEHOLDER.sub(lambda match: escaped[match[1]], page)
