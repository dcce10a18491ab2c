"""Turn task arguments and results into small, JSON-safe, masked values. Never raises.

One walk over the value with a character budget: containers are copied item by item
until the budget is spent, long strings are cut, and anything that is not a JSON type
is captured by a bounded ``repr``. The cost is proportional to what is kept, not to
the size of the original value, so a huge argument cannot slow the task.

Masking happens in the same walk: the value under a key that looks sensitive
(``password``, ``api_key``, ``Authorization``, ... at any depth) becomes
``[REDACTED]`` without being walked at all, and ``key=value`` pairs with such keys
inside a ``repr`` are scrubbed. A user ``mask`` callable then sees the captured,
JSON-safe value; if it raises, nothing of the value is kept.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import reprlib
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

from .logs import warn_rate_limited

log = logging.getLogger(__name__)

TRUNCATED = "...[truncated]"
REDACTED = "[REDACTED]"
_MAX_DEPTH = 8
_repr = reprlib.Repr()
_repr.maxstring = 200
_repr.maxother = 200

#: A key is sensitive when, ignoring case, ``-``, ``_``, ``.`` and spaces, it
#: contains one of these...
SENSITIVE_KEY_PARTS = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "apikey",
    "accesskey",
    "privatekey",
    "signingkey",
    "encryptionkey",
    "authorization",
    "credential",
    "cookie",
    "sessionkey",
    "creditcard",
    "cardnumber",
    "cardverification",
    "securitycode",
    "socialsecurity",
    "accesstoken",
    "refreshtoken",
    "idtoken",
    "authtoken",
    "bearertoken",
    "csrftoken",
    "xsrftoken",
    "clientsecret",
)
#: ...or one of its words (split at separators and camelCase) is one of these.
#: Short names are matched as whole words only: ``ssn`` must not hide ``business_name``
#: and ``token`` must not hide ``max_tokens``.
SENSITIVE_KEY_WORDS = (
    "token",
    "pwd",
    "pass",
    "pin",
    "cvv",
    "cvc",
    "ssn",
    "otp",
    "jwt",
    "auth",
    "bearer",
    "iban",
)

_WORD_RE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_SEPARATORS_RE = re.compile(r"[-_.\s]+")
_MAX_CACHED_KEYS = 10_000
# ``name=value``, ``name: value`` or ``'name': value``. Only the name and separator are
# consumed; the value is read by a lookahead, so a pair inside a value that is not
# redacted (``error: password=...``) is still found.
_PAIR_RE = re.compile(
    r"""(?P<quote>['"]?)(?P<name>[A-Za-z_][\w.-]*)(?P=quote)\s*[=:]\s*"""
    r"""(?=(?P<value>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|"""
    r"""(?i:bearer|basic|token|digest)\s+[^\s,;)}\]]+|[^\s,;)}\]]+))"""
)


class Redactor:
    """Decides which mapping keys hold secrets; compiled once, memoised per key."""

    def __init__(self, extra_keys: Iterable[str] = ()) -> None:
        extra = tuple(_normalise(key) for key in extra_keys if key)
        self._parts = tuple(dict.fromkeys((*SENSITIVE_KEY_PARTS, *extra)))
        self._words = frozenset(SENSITIVE_KEY_WORDS)
        self._cache: dict[str, bool] = {}

    def is_sensitive(self, key: str) -> bool:
        found = self._cache.get(key)
        if found is None:
            found = self._check(key)
            if len(self._cache) < _MAX_CACHED_KEYS:
                self._cache[key] = found
        return found

    def scrub(self, text: str) -> str:
        """``text`` with the values of ``name=value`` / ``'name': value`` pairs whose
        name is sensitive replaced, as in a ``repr`` or an exception message."""
        kept: list[str] = []
        done = 0
        for match in _PAIR_RE.finditer(text):
            if match.start() < done:  # inside a value already redacted
                continue
            if self.is_sensitive(match.group("name")):
                kept.append(text[done : match.end()])
                kept.append(REDACTED)
                done = match.end() + len(match.group("value"))
        if not kept:
            return text
        kept.append(text[done:])
        return "".join(kept)

    def _check(self, key: str) -> bool:
        flat = _normalise(key)
        if any(part in flat for part in self._parts):
            return True
        return any(word.lower() in self._words for word in _WORD_RE.findall(key))


def _normalise(key: str) -> str:
    return _SEPARATORS_RE.sub("", key).lower()


DEFAULT_REDACTOR = Redactor()


def capture(value: Any, max_chars: int, redactor: Optional[Redactor] = DEFAULT_REDACTOR) -> Any:
    """A JSON-safe, masked copy of ``value`` whose JSON form is roughly at most
    ``max_chars``. ``redactor=None`` turns key masking off."""
    try:
        return _Walker(max_chars, redactor).walk(value, 0)
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


_SCALARS = frozenset({bool, int, float})
_CONTAINERS = frozenset({list, dict})


class PayloadCapture:
    """The capture settings of one installation: size bound, redaction, user mask."""

    def __init__(
        self,
        max_chars: int,
        redactor: Redactor = DEFAULT_REDACTOR,
        mask: Optional[Callable[[Any], Any]] = None,
    ) -> None:
        self.max_chars = max_chars
        self.redactor = redactor
        self.mask = mask

    def __call__(self, value: Any) -> Any:
        if self.mask is None:
            # What a capture would return as it is, returned at once: most task
            # arguments and results are none, a number, a short string or empty.
            kind = type(value)
            if (
                value is None
                or kind in _SCALARS
                or (kind in _CONTAINERS and not value)
            ):
                return [] if kind is list else {} if kind is dict else value
            if kind is str and len(value) <= self.max_chars:
                return _scrubbed(value, self.redactor)
            return capture(value, self.max_chars, self.redactor)
        captured = capture(value, self.max_chars, self.redactor)
        try:
            return self.mask(captured)
        except Exception:
            # Fail closed: an unmasked value must not be sent because the mask broke.
            warn_rate_limited(log, "mask", "celery-langfuse: mask raised; value not captured")
            return "<not captured: mask failed>"

    def text(self, value: str) -> str:
        """A free-text field (status message, traceback) with secrets scrubbed."""
        try:
            return self.redactor.scrub(value)
        except Exception:
            return "<not captured: scrubbing failed>"


def _scrubbed(text: str, redactor: Redactor) -> str:
    """A captured string with the values of sensitive ``name=value`` / ``name: value``
    pairs in it replaced (a header dump, a query string, a repr); a string with no
    ``=`` or ``:`` has none, and is returned without a scan."""
    if "=" in text or ":" in text:
        return redactor.scrub(text)
    return text


class _Walker:
    __slots__ = ("budget", "redactor")

    def __init__(self, budget: int, redactor: Optional[Redactor]) -> None:
        self.budget = budget
        self.redactor = redactor

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
            return self._repr(value)
        kind = type(value)
        if kind is dict:  # the usual kinds first: an ABC isinstance check costs more
            return self._mapping(value.items(), len(value), depth)
        if kind is list or kind is tuple:
            return self._sequence(value, depth)
        if isinstance(value, Mapping):
            return self._mapping(value.items(), len(value), depth)
        if isinstance(value, (list, tuple, set, frozenset)):
            return self._sequence(value, depth)
        if isinstance(value, (bytes, bytearray)):
            return self._string(f"<{len(value)} bytes>")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            # Walked like a mapping so its fields are masked by name; its repr would
            # show every field, secrets included.
            fields = dataclasses.fields(value)
            return self._mapping(
                ((field.name, getattr(value, field.name)) for field in fields), len(fields), depth
            )
        return self._repr(value)

    def _string(self, value: str) -> str:
        if self.redactor is not None:
            value = _scrubbed(value, self.redactor)
        room = max(self.budget, 0)
        self.budget -= len(value) + 2
        if len(value) <= room:
            return value
        return value[:room] + TRUNCATED

    def _repr(self, value: Any) -> str:
        return self._string(_repr.repr(value))  # scrubbed there

    def _mapping(self, items: Iterable[tuple[Any, Any]], size: int, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        redactor = self.redactor
        for index, (key, item) in enumerate(items):
            if self.budget <= 0:
                out[TRUNCATED] = f"{size - index} more keys"
                break
            name = key if isinstance(key, str) else _repr.repr(key)
            self.budget -= len(name) + 4
            if redactor is not None and redactor.is_sensitive(name):
                self.budget -= len(REDACTED) + 2
                out[name] = REDACTED
            else:
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
