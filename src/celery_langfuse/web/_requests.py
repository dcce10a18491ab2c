"""``requests`` support: every call of a session carries the trace context.

requests has no hook that runs before sending, so the session's transport adapters
are wrapped: the user's adapters (retries, pools, custom transports) keep working.
"""

from __future__ import annotations

from typing import Any

from requests import PreparedRequest, Response, Session
from requests.adapters import BaseAdapter

from ._propagation import inject_headers


class TracingAdapter(BaseAdapter):
    """Adds the trace headers to each request, then lets ``inner`` send it."""

    def __init__(self, inner: BaseAdapter) -> None:
        super().__init__()
        self.inner = inner

    def send(self, request: PreparedRequest, *args: Any, **kwargs: Any) -> Response:
        inject_headers(request.headers)
        return self.inner.send(request, *args, **kwargs)

    def close(self) -> None:
        self.inner.close()


def trace_session(session: Session) -> Session:
    """Make every call of ``session`` carry the trace context; returns the session.

    Idempotent. Adapters mounted later are not wrapped: mount them first.
    """
    for prefix, adapter in list(session.adapters.items()):
        if not isinstance(adapter, TracingAdapter):
            session.mount(prefix, TracingAdapter(adapter))
    return session
