"""Turn task arguments and results into small, JSON-safe values. Never raises.

One walk over the value with a character budget: containers are copied item by item
until the budget is spent, long strings are cut, and anything that is not a JSON type
is captured by a bounded ``repr``. The cost is proportional to what is kept, not to
the size of the original value, so a huge argument cannot slow the task.
"""

from __future__ import annotations

import logging
import reprlib
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

TRUNCATED = "...[truncated]"
_MAX_DEPTH = 8
_repr = reprlib.Repr()
_repr.maxstring = 200
_repr.maxother = 200


def capture(value: Any, max_chars: int) -> Any:
    """A JSON-safe copy of ``value`` whose JSON form is roughly at most ``max_chars``."""
    try:
        return _Walker(max_chars).walk(value, 0)
    except Exception:  # a hostile __repr__ or __iter__ must not reach the task
        log.debug("celery-langfuse: could not capture %s", type(value).__name__, exc_info=True)
        return f"<unserialisable {type(value).__name__}>"


def describe_exception(exc: Any) -> str:
    """``ExceptionType: message``, bounded: the status message of a failed observation."""
    if exc is None:
        return "unknown error"
    name = type(exc).__name__
    try:
        message = str(exc)
    except Exception:
        message = ""
    return f"{name}: {message}"[:1000] if message else name


class _Walker:
    __slots__ = ("budget",)

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def walk(self, value: Any, depth: int) -> Any:
        if value is None or isinstance(value, bool):
            self.budget -= 5
            return value
        if isinstance(value, (int, float)):
            self.budget -= 12
            return value
        if isinstance(value, str):
            return self._string(value)
        if depth >= _MAX_DEPTH:
            return self._string(_repr.repr(value))
        if isinstance(value, Mapping):
            return self._mapping(value, depth)
        if isinstance(value, (list, tuple, set, frozenset)):
            return self._sequence(value, depth)
        if isinstance(value, (bytes, bytearray)):
            return self._string(f"<{len(value)} bytes>")
        return self._string(_repr.repr(value))

    def _string(self, value: str) -> str:
        room = max(self.budget, 0)
        self.budget -= len(value) + 2
        if len(value) <= room:
            return value
        return value[:room] + TRUNCATED

    def _mapping(self, value: Mapping[Any, Any], depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for index, (key, item) in enumerate(value.items()):
            if self.budget <= 0:
                out[TRUNCATED] = f"{len(value) - index} more keys"
                break
            name = key if isinstance(key, str) else _repr.repr(key)
            self.budget -= len(name) + 4
            out[name] = self.walk(item, depth + 1)
        return out

    def _sequence(self, value: Any, depth: int) -> list[Any]:
        out: list[Any] = []
        for index, item in enumerate(value):
            if self.budget <= 0:
                out.append(f"{TRUNCATED} {len(value) - index} more items")
                break
            self.budget -= 2
            out.append(self.walk(item, depth + 1))
        return out
