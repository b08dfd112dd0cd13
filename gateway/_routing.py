"""Routing of an HTTP request (method, raw path) to one of the gateway's bindings.

Which binding wins, when several templates match a path:

1. **Custom verbs first.** Where the last segment ends in ``:V`` and ``V`` is the
   verb of some template, only templates with verb ``V`` are tried, on the path
   with ``:V`` cut off. Only where none of them matches the path (under any HTTP
   method) are the templates without a verb tried, on the whole path. So
   ``GET /v1/models/bytelm:generate`` is a 405 from ``POST
   /v1/models/{model}:generate``, not ``GetModel(name="bytelm:generate")`` from
   ``GET /v1/models/{name}``; ESP and Envoy's transcoder split the verb the same
   way, but 404 where we fall back (so that a name such as ``a:b`` still reaches a
   verb-less template).
2. **Then the HTTP method.** Among the templates that match the path, only those
   bound to the request's method (or to ``*``, http.proto's "any method") can
   win. Where the path matches but no method does, the answer is 405 with the
   methods that would have matched; where nothing matches the path, 404.
3. **Then specificity:** more literal segments first (literals inside a
   variable's template, such as ``models`` in ``{name=models/*}``, count), then
   fewer wildcards, where a ``**`` weighs more than any number of ``*`` (``{f}``
   is a ``*``): ``/v1/a/*/*`` beats ``/v1/a/**``, as the one that says more
   about the path; then declaration order (the order of the bindings given to
   the Router).

Bindings of different methods under one HTTP method and one path template
(``PathTemplate`` equality: the same pattern) are one route shared by those
methods: the match carries all of them (``RouteMatch.bindings``), and the
methods' codec chooses among them from the request (``Codec.choose_binding``).
``build_app`` refuses a shared route whose methods have codecs but not one that
chooses; one whose methods have none (a foreign descriptor set) keeps declaration
order, with a WARNING naming the methods it leaves unreachable.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import unquote

import grpc

from protoserve.gateway._rules import Binding
from protoserve.gateway._template import PathTemplate, split_path

__all__ = ["MethodNotAllowed", "RouteMatch", "RouteNotFound", "Router", "RoutingError"]


class RoutingError(Exception):
    """No binding can serve the request.

    Attributes:
        path: the URL path as given to `Router.match`.
        code: the gRPC status the gateway reports.
        http_status: the HTTP status the gateway answers with.
    """

    code: ClassVar[grpc.StatusCode]
    http_status: ClassVar[int]

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


class RouteNotFound(RoutingError):
    """No template matches the path, under any HTTP method (404)."""

    code = grpc.StatusCode.NOT_FOUND
    http_status = 404

    def __init__(self, path: str) -> None:
        super().__init__(path, f"no route matches {path!r}")


class MethodNotAllowed(RoutingError):
    """Templates match the path, but none is bound to the request's HTTP method (405).

    Attributes:
        allowed: the HTTP methods bound to the matching templates, sorted (the
            ``Allow`` header). Only the methods actually bound: no implied HEAD or
            OPTIONS.
    """

    # grpc-gateway's choice too: the method exists, this HTTP verb does not.
    code = grpc.StatusCode.UNIMPLEMENTED
    http_status = 405

    def __init__(self, path: str, allowed: tuple[str, ...]) -> None:
        super().__init__(path, f"{path!r} allows only {', '.join(allowed)}")
        self.allowed = allowed


@dataclass(frozen=True)
class RouteMatch:
    """The binding that serves a request, with the values its path variables took.

    Attributes:
        binding: the winning binding.
        path_params: dotted field path -> percent-decoded value (see
            `PathTemplate.match`).
        bindings: every method's binding on this route (the same HTTP method and
            template), ``binding`` first: more than one where methods share the route.
    """

    binding: Binding
    path_params: dict[str, str]
    bindings: tuple[Binding, ...] = ()


@dataclass(frozen=True, slots=True)
class _Route:
    binding: Binding
    # Smaller sorts first: see the module docstring, rule 3.
    rank: tuple[int, bool, int, int]


class _Node:
    """A trie node: the routes whose templates' fixed segments lead here."""

    __slots__ = ("ends", "literals", "rest", "star")

    def __init__(self) -> None:
        self.literals: dict[str, _Node] = {}
        self.star: _Node | None = None
        self.ends: list[_Route] = []  # templates that end here
        self.rest: list[_Route] = []  # templates whose trailing "**" starts here

    def child(self, literal: str | None) -> _Node:
        if literal is None:
            if self.star is None:
                self.star = _Node()
            return self.star
        return self.literals.setdefault(literal, _Node())

    def collect(self, decoded: list[str], i: int, out: list[_Route]) -> None:
        """Add to ``out`` every route whose fixed segments match ``decoded[i:]``."""
        out.extend(self.rest)
        if i == len(decoded):
            out.extend(self.ends)
            return
        segment = decoded[i]
        if not segment:
            return  # no template segment matches an empty one
        literal = self.literals.get(segment)
        if literal is not None:
            literal.collect(decoded, i + 1, out)
        if self.star is not None:
            self.star.collect(decoded, i + 1, out)


class Router:
    """Matches requests against a fixed set of bindings.

    Templates are parsed once, with the bindings, into one trie of segments per
    template verb; a request walks only the branches its segments select, and
    only the few templates found there are matched in full, whatever the number
    of bindings.
    """

    def __init__(self, bindings: Iterable[Binding]) -> None:
        """Index ``bindings``; their order is the last tie-breaker."""
        self._bindings = tuple(bindings)
        self._roots: dict[str | None, _Node] = {}
        for order, binding in enumerate(self._bindings):
            template = binding.template
            rank = (-template.literal_count, template.open_ended, template.wildcard_count, order)
            node = self._roots.setdefault(template.verb, _Node())
            for literal in template.fixed_segments:
                node = node.child(literal)
            (node.rest if template.open_ended else node.ends).append(_Route(binding, rank))
        self._verbs = frozenset(verb for verb in self._roots if verb is not None)
        # (HTTP method, template) -> the first binding of each method bound there.
        routes: dict[tuple[str, PathTemplate], dict[str, Binding]] = {}
        for binding in self._bindings:
            methods = routes.setdefault((binding.verb, binding.template), {})
            methods.setdefault(binding.method.full_name, binding)
        self._routes = {key: tuple(found.values()) for key, found in routes.items()}

    @property
    def bindings(self) -> tuple[Binding, ...]:
        """The bindings, in the order given."""
        return self._bindings

    def shared_routes(self) -> list[tuple[Binding, ...]]:
        """The routes that several methods share: each route's bindings (one per
        method, in declaration order), for every HTTP method and template bound by
        more than one method."""
        return [bindings for bindings in self._routes.values() if len(bindings) > 1]

    def match(self, http_method: str, path: str) -> RouteMatch:
        """The binding that serves ``http_method`` on ``path``, by the module's rules.

        Args:
            http_method: the request's method; compared upper-cased.
            path: the raw, still percent-encoded URL path, without the query string.

        Raises:
            RouteNotFound: no template matches ``path`` (also for a path that does
                not start with "/").
            MethodNotAllowed: templates match ``path``, but none under
                ``http_method``; ``allowed`` lists their methods.
        """
        try:
            segments = split_path(path)
        except ValueError:
            raise RouteNotFound(path) from None
        matches: list[tuple[_Route, dict[str, str]]] = []
        if segments and self._verbs:
            last = segments[-1]
            colon = last.rfind(":")
            verb = unquote(last[colon + 1 :]) if colon >= 0 else None
            if verb in self._verbs:
                matches = self._matches(verb, [*segments[:-1], last[:colon]])
        if not matches:
            matches = self._matches(None, segments)
        if not matches:
            raise RouteNotFound(path)
        method = http_method.upper()
        best: tuple[_Route, dict[str, str]] | None = None
        for route, params in matches:
            if route.binding.verb in (method, "*") and (best is None or route.rank < best[0].rank):
                best = (route, params)
        if best is None:
            allowed = tuple(sorted({route.binding.verb for route, _ in matches}))
            raise MethodNotAllowed(path, allowed)
        binding = best[0].binding
        shared = self._routes[binding.verb, binding.template]
        others = tuple(b for b in shared if b.method is not binding.method)
        return RouteMatch(binding, best[1], (binding, *others))

    def _matches(
        self, verb: str | None, segments: list[str]
    ) -> list[tuple[_Route, dict[str, str]]]:
        """Every route of template verb ``verb`` whose template matches ``segments``."""
        root = self._roots.get(verb)
        if root is None:
            return []
        candidates: list[_Route] = []
        # Literals are stored decoded; skip the decode for the usual plain segment.
        root.collect([s if "%" not in s else unquote(s) for s in segments], 0, candidates)
        found: list[tuple[_Route, dict[str, str]]] = []
        for route in candidates:
            # The trie only narrows the candidates; this checks the rest (empty
            # segments under "**", decoding) and takes the values.
            params = route.binding.template.match_segments(segments)
            if params is not None:
                found.append((route, params))
        return found
