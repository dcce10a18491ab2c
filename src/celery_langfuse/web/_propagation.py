"""Trace context over HTTP: the same wire format as Celery messages, in request headers.

An outgoing call made while an observation is current carries ``traceparent`` and the
``x-langfuse-*`` headers (:func:`inject_headers`); the receiving service's middleware
reads them back (:func:`extract_context`) and continues the trace. The hooks below
plug :func:`inject_headers` into httpx clients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, TypeVar

from opentelemetry import trace as otel_trace

from .. import client, headers
from ._request import normalise_headers

Headers = TypeVar("Headers", bound=MutableMapping[str, Any])


def inject_headers(outgoing: Headers) -> Headers:
    """Add the current trace context to ``outgoing`` HTTP headers and return them.

    Inside an observation the receiving service continues this trace as a child of
    it; the trace attributes (user, session, tags, ...) travel either way. Headers
    already present are kept unless they are trace headers this library owns.
    """
    parent = _current_parent()
    attributes = client.current_trace_attributes()
    if parent is not None or attributes:
        headers.inject(outgoing, parent=parent, attributes=attributes)
    return outgoing


def extract_context(
    incoming: Mapping[str, Any] | Iterable[tuple[str, Any]],
) -> headers.Extracted:
    """Read the trace context from incoming HTTP headers, whatever their case.

    Tolerant like :func:`celery_langfuse.headers.extract`: malformed values are
    dropped, and ``Extracted.parent`` is None when there is nothing to continue.
    """
    return headers.extract(normalise_headers(incoming))


def httpx_request_hook(request: Any) -> None:
    """httpx event hook: ``httpx.Client(event_hooks={"request": [httpx_request_hook]})``."""
    inject_headers(request.headers)


async def async_httpx_request_hook(request: Any) -> None:
    """The same for ``httpx.AsyncClient``, whose hooks must be coroutines."""
    inject_headers(request.headers)


def _current_parent() -> headers.TraceParent | None:
    span_context = otel_trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return headers.TraceParent(
        format(span_context.trace_id, "032x"),
        format(span_context.span_id, "016x"),
        sampled=span_context.trace_flags.sampled,
    )
