"""``requests`` support: every call of a session carries the trace context.

requests has no hook that runs before sending, so the session's transport adapters
are wrapped: the user's adapters (retries, pools, custom transports) keep working.
"""

from __future__ import annotations

from typing import Any, Optional

from requests import PreparedRequest, Response, Session
from requests.adapters import BaseAdapter

from ._propagation import check_trust_secret, inject_headers


class TracingAdapter(BaseAdapter):
    """Adds the trace headers (and ``trust_secret``, if given) to each request, then
    lets ``inner`` send it."""

    def __init__(self, inner: BaseAdapter, trust_secret: Optional[str] = None) -> None:
        super().__init__()
        self.inner = inner
        self.trust_secret = trust_secret

    def send(self, request: PreparedRequest, *args: Any, **kwargs: Any) -> Response:
        inject_headers(request.headers, trust_secret=self.trust_secret)
        return self.inner.send(request, *args, **kwargs)

    def close(self) -> None:
        self.inner.close()


def trace_session(session: Session, *, trust_secret: Optional[str] = None) -> Session:
    """Make every call of ``session`` carry the trace context; returns the session.

    ``trust_secret``: the receiving services' secret (docs/web.md, "Trust"); give it
    only to a session that calls your own services. Idempotent (a second call sets the
    secret). Adapters mounted later are not wrapped: mount them first.
    """
    if trust_secret is not None:
        check_trust_secret(trust_secret)
    for prefix, adapter in list(session.adapters.items()):
        if isinstance(adapter, TracingAdapter):
            adapter.trust_secret = trust_secret
        else:
            session.mount(prefix, TracingAdapter(adapter, trust_secret))
    return session
