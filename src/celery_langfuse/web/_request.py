"""A framework-neutral view of an incoming HTTP request.

ASGI scopes and WSGI environs spell the same request differently; the tracing code
and the user's ``identify`` callable read this one shape instead. Header names are
lower-cased here, once, because HTTP header names are case-insensitive while the
wire format in :mod:`celery_langfuse.headers` reads exact (lower-case) names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any, Optional
from urllib.parse import parse_qsl

# Headers a request may repeat; their values are joined as RFC 9110 allows.
_COOKIE_SEPARATOR = "; "
_LIST_SEPARATOR = ", "


@dataclass(frozen=True)
class IncomingRequest:
    """What the middleware and ``identify`` know about a request before it is routed.

    ``raw`` is the ASGI scope or the WSGI environ, for what this view leaves out.
    ``client_address`` is the peer's address as the server reports it (ASGI
    ``scope["client"]``, WSGI ``REMOTE_ADDR``): the connection's, unless the server
    was told to take it from a trusted proxy's ``X-Forwarded-For``.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    query_string: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)
    client_address: Optional[str] = None

    @property
    def query(self) -> dict[str, str]:
        """Query parameters, the first value of each."""
        params: dict[str, str] = {}
        for key, value in parse_qsl(self.query_string, keep_blank_values=True):
            params.setdefault(key, value)
        return params

    @property
    def cookies(self) -> dict[str, str]:
        """Cookies sent with the request; an unparsable Cookie header gives none."""
        cookie = SimpleCookie()
        try:
            cookie.load(self.headers.get("cookie", ""))
        except CookieError:
            return {}
        return {name: morsel.value for name, morsel in cookie.items()}

    @classmethod
    def from_asgi(cls, scope: Mapping[str, Any]) -> IncomingRequest:
        raw_headers = scope.get("headers") or ()
        client = scope.get("client")
        return cls(
            method=str(scope.get("method", "GET")).upper(),
            path=str(scope.get("path", "/")),
            headers=normalise_headers(
                (name.decode("latin-1"), value.decode("latin-1")) for name, value in raw_headers
            ),
            query_string=bytes(scope.get("query_string") or b"").decode("latin-1"),
            raw=scope,
            client_address=str(client[0]) if client else None,
        )

    @classmethod
    def from_wsgi(cls, environ: Mapping[str, Any]) -> IncomingRequest:
        pairs: list[tuple[str, str]] = []
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                pairs.append((key[5:].replace("_", "-"), str(value)))
            elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
                pairs.append((key.replace("_", "-"), str(value)))
        return cls(
            method=str(environ.get("REQUEST_METHOD", "GET")).upper(),
            path=str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", "") or "/"),
            headers=normalise_headers(pairs),
            query_string=str(environ.get("QUERY_STRING", "")),
            raw=environ,
            client_address=str(environ.get("REMOTE_ADDR") or "") or None,
        )


def normalise_headers(headers: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> dict[str, str]:
    """HTTP headers as a dict with lower-case names; repeated headers are joined."""
    # Framework header types (werkzeug's, httpx's) have ``items()`` without being Mappings.
    items = headers.items() if hasattr(headers, "items") else headers
    normalised: dict[str, str] = {}
    for name, value in items:
        if not isinstance(name, str) or value is None:
            continue
        key = name.lower()
        text = value if isinstance(value, str) else str(value)
        previous: str | None = normalised.get(key)
        if previous is None:
            normalised[key] = text
        else:
            separator = _COOKIE_SEPARATOR if key == "cookie" else _LIST_SEPARATOR
            normalised[key] = previous + separator + text
    return normalised
