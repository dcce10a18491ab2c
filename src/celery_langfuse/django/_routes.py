"""Trace names from Django's URL resolver: ``GET /orders/<int:pk>/``, never the raw path.

``request.resolver_match.route`` is the matched pattern, joined across ``include()``
levels by Django (``shop/`` + ``items/<slug:slug>/``). A ``path()`` route is kept as
written; a ``re_path()`` route (or a joined route with a regex part) is simplified to
the same shape, ``^articles/(?P<year>[0-9]{4})/$`` becoming ``/articles/<year>/``, so
every request of one view gets one trace name whatever the values in its URL.
"""

from __future__ import annotations

import re
from typing import Any, Optional

# A path() route contains none of these; a regex almost always does.
_REGEX_CHARS = re.compile(r"[\^$()\[\]\\?*+{}|]")
_NAMED_GROUP = re.compile(r"\(\?P<(\w+)>")
_QUANTIFIER = re.compile(r"\{\d*(,\d*)?\}")


def route_of(resolver_match: Any) -> Optional[str]:
    """The route template of a resolved request, with a leading ``/``; None when the
    request resolved to nothing (a 404 from the resolver)."""
    route = getattr(resolver_match, "route", None)
    if not isinstance(route, str):
        return None
    if _REGEX_CHARS.search(route):
        route = simplify_regex(route)
    return "/" + route.lstrip("/")


def simplify_regex(pattern: str) -> str:
    """A regex URL pattern as a person reads it: named groups become ``<name>``,
    unnamed ones ``<var>``, non-capturing groups keep their text; anchors,
    quantifiers and escapes go."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            following = pattern[i + 1]
            if following in "AZz":  # \A, \Z: anchors
                i += 2
                continue
            # \d, \w, ... inside a group never reach here; outside one keep the class
            out.append(following if not following.isalnum() else "\\" + following)
            i += 2
            continue
        if char == "(":
            named = _NAMED_GROUP.match(pattern, i)
            end = _group_end(pattern, i)
            if named:
                out.append(f"<{named.group(1)}>")
                i = end + 1
            elif pattern.startswith("(?:", i):
                out.append(simplify_regex(pattern[i + 3 : end]))
                i = end + 1
            else:
                out.append("<var>")
                i = end + 1
            continue
        if char == "[":
            i = _class_end(pattern, i) + 1
            out.append("<var>")
            continue
        if char in "^$?*+|":
            i += 1
            continue
        if char == "{":
            quantifier = _QUANTIFIER.match(pattern, i)
            if quantifier:
                i = quantifier.end()
                continue
        out.append(char)
        i += 1
    return "".join(out)


def _group_end(pattern: str, start: int) -> int:
    """Index of the ``)`` closing the group opened at ``start`` (escapes and character
    classes skipped); the end of the pattern if it never closes."""
    depth = 0
    i = start
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            continue
        if char == "[":
            i = _class_end(pattern, i) + 1
            continue
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return len(pattern) - 1


def _class_end(pattern: str, start: int) -> int:
    """Index of the ``]`` closing the character class opened at ``start``."""
    i = start + 1
    if i < len(pattern) and pattern[i] == "^":
        i += 1
    if i < len(pattern) and pattern[i] == "]":  # a literal ] first in the class
        i += 1
    while i < len(pattern):
        if pattern[i] == "\\":
            i += 2
            continue
        if pattern[i] == "]":
            return i
        i += 1
    return len(pattern) - 1
