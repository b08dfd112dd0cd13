"""Path templates of ``google.api.http`` rules (the syntax in google/api/http.proto).

The grammar, from http.proto::

    Template  = "/" Segments [ Verb ] ;
    Segments  = Segment { "/" Segment } ;
    Segment   = "*" | "**" | LITERAL | Variable ;
    Variable  = "{" FieldPath [ "=" Segments ] "}" ;
    FieldPath = IDENT { "." IDENT } ;
    Verb      = ":" LITERAL ;

Matching works on the raw, still percent-encoded URL path (ASGI's ``raw_path``,
not ``path``): only then can a ``%2F`` inside a segment be told from a ``/``
between segments.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

__all__ = ["PathTemplate", "TemplateError", "split_path"]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Whatever stands between "{" and "=" or "}"; checked against _IDENT piece by piece
# so that the error can quote it.
_FIELD_PATH = re.compile(r"[^=}]*")
# RFC 3986 pchar without ":" (kept for the verb, as Envoy's and ESP's parsers do)
# and without "*" (a wildcard, never part of a literal).
_LITERAL = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()+,;=@]|%[0-9A-Fa-f]{2})+")
# Reserved "/" that a multi-segment variable leaves encoded (http.proto); the group
# makes split() keep it.
_ENCODED_SLASH = re.compile(r"(%2[Ff])")


class TemplateError(ValueError):
    """A template that does not follow the http.proto grammar."""


@dataclass(frozen=True, slots=True)
class _Segment:
    """One segment of a template: a literal (stored percent-decoded), ``*`` or ``**``."""

    kind: Literal["literal", "*", "**"]
    value: str = ""
    # The literal as written in the template, for openapi_path().
    text: str = ""


@dataclass(frozen=True, slots=True)
class _Variable:
    """A variable binding ``field`` to the template segments ``[start, end)``."""

    field: str
    start: int
    end: int
    # True for ``{f=a/*}`` or ``{f=**}``: the value keeps "/" and an encoded "%2F".
    multi: bool


def split_path(path: str) -> list[str]:
    """Split a raw URL path into its still-encoded segments.

    One trailing slash is ignored, so ``/v1/models/`` is ``/v1/models``; ``/`` has no
    segments. Empty segments (``/v1//models``) are kept, and match nothing.

    Raises:
        ValueError: ``path`` does not start with ``/``.
    """
    if not path.startswith("/"):
        raise ValueError(f"a URL path starts with '/': {path!r}")
    if path == "/":
        return []
    if path.endswith("/"):
        path = path[:-1]
    return path[1:].split("/")


def _decode(text: str) -> str | None:
    """Percent-decode ``text`` as UTF-8; None where the bytes are not UTF-8."""
    if "%" not in text:
        return text
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        return None


def _decode_keeping_slash(text: str) -> str | None:
    """Percent-decode all but ``%2F``/``%2f`` (a multi-segment value, per http.proto)."""
    if "%" not in text:
        return text
    out: list[str] = []
    # The kept "%2F"s are at the odd indexes.
    for i, piece in enumerate(_ENCODED_SLASH.split(text)):
        decoded = piece if i % 2 else _decode(piece)
        if decoded is None:
            return None
        out.append(decoded)
    return "".join(out)


class _Parser:
    """Recursive descent over one template; raises TemplateError with the offset."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.pos = 0
        self.segments: list[_Segment] = []
        self.variables: list[_Variable] = []

    def fail(self, problem: str) -> TemplateError:
        return TemplateError(
            f"invalid path template {self.pattern!r}: {problem} at offset {self.pos}"
        )

    def peek(self) -> str:
        return self.pattern[self.pos] if self.pos < len(self.pattern) else ""

    def parse(self) -> tuple[tuple[_Segment, ...], tuple[_Variable, ...], str | None]:
        if self.peek() != "/":
            raise self.fail("a template starts with '/'")
        self.pos += 1
        self.parse_segments(in_variable=False)
        verb: str | None = None
        if self.peek() == ":":
            self.pos += 1
            verb = unquote(self.literal("a custom verb after ':'"))
        if self.pos != len(self.pattern):
            raise self.fail(f"unexpected {self.peek()!r}")
        for i, segment in enumerate(self.segments[:-1]):
            if segment.kind == "**":
                # Only a trailing "**" keeps matching linear and unambiguous.
                raise TemplateError(
                    f"invalid path template {self.pattern!r}: '**' must be the last "
                    f"segment (it is segment {i + 1} of {len(self.segments)})"
                )
        return tuple(self.segments), tuple(self.variables), verb

    def parse_segments(self, *, in_variable: bool) -> None:
        while True:
            self.parse_segment(in_variable=in_variable)
            if self.peek() != "/":
                return
            self.pos += 1

    def parse_segment(self, *, in_variable: bool) -> None:
        char = self.peek()
        if self.pattern.startswith("**", self.pos):
            self.pos += 2
            self.segments.append(_Segment("**"))
        elif char == "*":
            self.pos += 1
            self.segments.append(_Segment("*"))
        elif char == "{":
            if in_variable:
                raise self.fail("a variable inside a variable")
            self.parse_variable()
        elif char in ("/", ""):
            raise self.fail("an empty segment")
        else:
            text = self.literal("a segment")
            self.segments.append(_Segment("literal", unquote(text), text))

    def parse_variable(self) -> None:
        self.pos += 1  # "{"
        match = _FIELD_PATH.match(self.pattern, self.pos)
        field = match.group() if match else ""
        parts = field.split(".")
        if not all(_IDENT.fullmatch(part) for part in parts):
            raise self.fail(f"{field!r} is not a field path (IDENT {{'.' IDENT}})")
        if any(v.field == field for v in self.variables):
            raise self.fail(f"field {field!r} is bound twice")
        self.pos += len(field)
        start = len(self.segments)
        if self.peek() == "=":
            self.pos += 1
            self.parse_segments(in_variable=True)
        else:
            self.segments.append(_Segment("*"))  # {f} means {f=*}
        if self.peek() != "}":
            raise self.fail(f"variable {field!r} is not closed with '}}'")
        self.pos += 1
        end = len(self.segments)
        multi = end - start > 1 or self.segments[start].kind == "**"
        self.variables.append(_Variable(field, start, end, multi))

    def literal(self, what: str) -> str:
        match = _LITERAL.match(self.pattern, self.pos)
        if match is None:
            found = repr(self.peek()) if self.peek() else "the end"
            raise self.fail(f"expected {what}, found {found}")
        self.pos = match.end()
        return match.group()


class PathTemplate:
    """A parsed template such as ``/v1/{name=models/*}:generate``.

    Instances compare equal (and hash) by ``pattern``.

    Attributes:
        pattern: the template as written.
        fields: the dotted field paths its variables bind, in order.
        verb: the custom verb after ``:`` in the last segment (percent-decoded), or
            None.
        literal_count: how many segments are literals (inside variables too).
        wildcard_count: how many segments are ``*`` or ``**`` (``{f}`` counts as ``*``).
        segment_count: how many segments it has, a trailing ``**`` included.
        open_ended: True where it ends in ``**`` and so matches paths of
            ``segment_count - 1`` segments or more.
    """

    __slots__ = (
        "_segments",
        "_variables",
        "fields",
        "literal_count",
        "open_ended",
        "pattern",
        "segment_count",
        "verb",
        "wildcard_count",
    )

    pattern: str
    fields: tuple[str, ...]
    verb: str | None
    literal_count: int
    wildcard_count: int
    segment_count: int
    open_ended: bool

    def __init__(
        self,
        pattern: str,
        segments: tuple[_Segment, ...],
        variables: tuple[_Variable, ...],
        verb: str | None,
    ) -> None:
        self.pattern = pattern
        self._segments = segments
        self._variables = variables
        self.fields = tuple(v.field for v in variables)
        self.verb = verb
        self.literal_count = sum(s.kind == "literal" for s in segments)
        self.wildcard_count = len(segments) - self.literal_count
        self.segment_count = len(segments)
        self.open_ended = segments[-1].kind == "**"

    @classmethod
    def parse(cls, pattern: str) -> PathTemplate:
        """Parse ``pattern`` by the http.proto grammar.

        Beyond the grammar it enforces what http.proto states in prose: ``**`` only as
        the last segment, no variable inside a variable, no field bound twice. A
        literal may not contain ``:`` (only the verb follows a ``:``) or ``*``;
        other reserved characters may be percent-encoded.

        Raises:
            TemplateError: the template is not valid; the message names the problem
                and its offset.
        """
        segments, variables, verb = _Parser(pattern).parse()
        return cls(pattern, segments, variables, verb)

    @property
    def fixed_segments(self) -> tuple[str | None, ...]:
        """Each segment before a trailing ``**``: its percent-decoded literal, or None
        for a ``*`` (for the router's index)."""
        fixed = self._segments[:-1] if self.open_ended else self._segments
        return tuple(s.value if s.kind == "literal" else None for s in fixed)

    def match(self, path: str) -> dict[str, str] | None:
        """Field path -> percent-decoded value for a matching URL path, else None.

        ``path`` is the raw URL path (percent-encoded, no query string). A value
        of a single-segment variable (``{f}``, ``{f=*}``) is fully percent-decoded,
        ``%2F`` included; a multi-segment value (``{f=a/*}``, ``{f=**}``) keeps
        ``/`` between segments and leaves ``%2F`` encoded, as http.proto says.
        With a verb in the template the last segment must end in ``:verb`` (its
        last ``:``); without one, a ``:`` is plain text, so ``/v1/models/{name}``
        matches ``/v1/models/a:b`` with name ``a:b``. Segments must not be empty;
        one trailing slash is ignored. A value that does not decode to UTF-8 does
        not match.
        """
        if not path.startswith("/"):
            return None
        segments = split_path(path)
        if self.verb is not None:
            if not segments:
                return None
            last = segments[-1]
            colon = last.rfind(":")
            if colon < 0 or _decode(last[colon + 1 :]) != self.verb:
                return None
            segments[-1] = last[:colon]
        return self.match_segments(segments)

    def match_segments(self, segments: Sequence[str]) -> dict[str, str] | None:
        """Like `match`, for a path already split by `split_path` and with the verb
        (where the template has one) already cut from the last segment."""
        count = len(segments)
        fixed = self.segment_count - 1 if self.open_ended else self.segment_count
        if count < fixed or (count > fixed and not self.open_ended):
            return None
        for i in range(fixed):
            segment = segments[i]
            if not segment:
                return None
            expected = self._segments[i]
            if expected.kind == "literal" and _decode(segment) != expected.value:
                return None
        if self.open_ended and not all(segments[fixed:]):
            return None
        values: dict[str, str] = {}
        for variable in self._variables:
            end = count if variable.end == self.segment_count else variable.end
            raw = "/".join(segments[variable.start : end])
            value = _decode_keeping_slash(raw) if variable.multi else _decode(raw)
            if value is None:
                return None
            values[variable.field] = value
        return values

    def openapi_path(self) -> str:
        """The template as an OpenAPI path (``/v1/models/{name}``).

        Every variable becomes ``{field.path}``, whatever its own template: OpenAPI
        has no multi-segment parameter, so ``{name=models/*}`` and ``{name=**}``
        are ``{name}`` too, and the caller documents that the value may hold
        ``/`` (the Discovery format writes those ``{+name}``). The verb stays as
        written. An anonymous ``*`` or ``**`` outside a variable binds no field,
        so it has no parameter to name and is kept as written.
        """
        parts: list[str] = []
        i = 0
        variables = {v.start: v for v in self._variables}
        while i < self.segment_count:
            variable = variables.get(i)
            if variable is not None:
                parts.append("{" + variable.field + "}")
                i = variable.end
                continue
            segment = self._segments[i]
            parts.append(segment.text if segment.kind == "literal" else segment.kind)
            i += 1
        path = "/" + "/".join(parts)
        return path if self.verb is None else f"{path}:{self.verb}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PathTemplate):
            return NotImplemented
        return self.pattern == other.pattern

    def __hash__(self) -> int:
        return hash(self.pattern)

    def __repr__(self) -> str:
        return f"PathTemplate.parse({self.pattern!r})"
