"""Trace context over HTTP: the same wire format as Celery messages, in request headers.

An outgoing call made while an observation is current carries ``traceparent`` and the
``x-langfuse-*`` headers (:func:`inject_headers`); the receiving service's middleware
reads them back and continues the trace. Given the receiving service's
``trust_secret``, the call also carries ``x-langfuse-trust-secret``, so that service
trusts it with the user, session and Langfuse parent (docs/web.md, "Trust"). The hooks
below plug :func:`inject_headers` into httpx clients.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Mapping, MutableMapping
from typing import Any, Callable, Optional, TypeVar

from opentelemetry import trace as otel_trace

from .. import client, headers
from ..config import SECRET_ALLOWED, ConfigurationError, is_secret, shown_secret
from ._request import normalise_headers

Headers = TypeVar("Headers", bound=MutableMapping[str, Any])


def inject_headers(outgoing: Headers, *, trust_secret: Optional[str] = None) -> Headers:
    """Add the current trace context to ``outgoing`` HTTP headers and return them.

    Inside an observation the receiving service continues this trace as a child of
    it; the trace attributes (user, session, tags, ...) travel either way. Headers
    already present are kept unless they are trace headers this library owns.
    ``trust_secret``, the receiving service's, is sent along with the context: give it
    only for calls to your own services, since whoever receives it is trusted.
    """
    if trust_secret is not None:
        check_trust_secret(trust_secret)
    parent = _current_parent()
    attributes = client.current_trace_attributes()
    if parent is not None or attributes:
        headers.inject(outgoing, parent=parent, attributes=attributes)
        if trust_secret is not None:
            outgoing[headers.TRUST_SECRET] = trust_secret
    return outgoing


def extract_context(
    incoming: Mapping[str, Any] | Iterable[tuple[str, Any]], *, trusted: bool = True
) -> headers.Extracted:
    """Read the trace context from incoming HTTP headers, whatever their case.

    Tolerant like :func:`celery_langfuse.headers.extract`: malformed values are
    dropped, and ``Extracted.parent`` is None when there is nothing to continue. Pass
    ``trusted=False`` for a caller you do not trust (the middlewares decide with
    :func:`celery_langfuse.web.read_incoming`): its attributes and Langfuse parent are
    then ignored.
    """
    return headers.extract(normalise_headers(incoming), trusted=trusted)


def httpx_request_hook(request: Any) -> None:
    """httpx event hook: ``httpx.Client(event_hooks={"request": [httpx_request_hook]})``."""
    inject_headers(request.headers)


async def async_httpx_request_hook(request: Any) -> None:
    """The same for ``httpx.AsyncClient``, whose hooks must be coroutines."""
    inject_headers(request.headers)


def httpx_hooks(*, trust_secret: Optional[str] = None) -> dict[str, list[Callable[[Any], None]]]:
    """Event hooks for an httpx client calling your own services:
    ``httpx.Client(event_hooks=httpx_hooks(trust_secret=SECRET))``."""
    if trust_secret is None:
        return {"request": [httpx_request_hook]}
    secret = check_trust_secret(trust_secret)

    def inject_trusted(request: Any) -> None:
        inject_headers(request.headers, trust_secret=secret)

    return {"request": [inject_trusted]}


def async_httpx_hooks(
    *, trust_secret: Optional[str] = None
) -> dict[str, list[Callable[[Any], Awaitable[None]]]]:
    """The same for ``httpx.AsyncClient(event_hooks=async_httpx_hooks(...))``."""
    if trust_secret is None:
        return {"request": [async_httpx_request_hook]}
    secret = check_trust_secret(trust_secret)

    async def inject_trusted(request: Any) -> None:
        inject_headers(request.headers, trust_secret=secret)

    return {"request": [inject_trusted]}


def check_trust_secret(secret: str) -> str:
    """``secret``, or a :class:`ConfigurationError` that does not show it."""
    if not is_secret(secret):
        raise ConfigurationError(
            f"celery-langfuse web setting trust_secret={shown_secret(secret)}: "
            f"must be {SECRET_ALLOWED}"
        )
    return secret


def _current_parent() -> headers.TraceParent | None:
    span_context = otel_trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return headers.TraceParent(
        format(span_context.trace_id, "032x"),
        format(span_context.span_id, "016x"),
        sampled=span_context.trace_flags.sampled,
    )
