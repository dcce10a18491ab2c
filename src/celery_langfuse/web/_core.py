"""One traced HTTP request, whatever the framework: the middlewares drive this.

A request becomes one observation, current while the app handles it, so everything
the handler does (tasks it enqueues, LLM calls, outgoing HTTP calls) nests inside:

- name ``METHOD /route/{template}`` once routing has found the route (``METHOD``
  alone when none matched, so scanners cannot flood Langfuse with trace names);
- metadata: method, path, route, query parameter names (never values), user agent;
- output ``{"status_code": ...}``; level WARNING for 4xx, ERROR for 5xx and for an
  exception that escaped the app;
- trace attributes (user id, session id, ...) from the user's ``identify`` callable,
  applied with ``langfuse.propagate_attributes`` so enqueued tasks carry them too;
- an incoming ``traceparent`` / ``x-langfuse-*`` context is continued, not restarted;
  without one the request starts a new trace.

Tracing faults are logged (rate-limited) and never reach the request.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from opentelemetry import context as otel_context
from opentelemetry.trace import INVALID_SPAN, set_span_in_context

from .. import client
from ..config import ConfigurationError
from ..headers import TraceAttributes, TraceParent
from ..logs import warn_rate_limited
from ..payload import describe_exception
from ._propagation import extract_context
from ._request import IncomingRequest

log = logging.getLogger(__name__)

#: Paths never traced unless ``exclude_paths`` says otherwise: health checks.
DEFAULT_EXCLUDED_PATHS: frozenset[str] = frozenset({"/health", "/healthz", "/livez", "/readyz"})

Identify = Callable[[IncomingRequest], Optional[TraceAttributes]]

_MAX_USER_AGENT_CHARS = 200
_MAX_QUERY_KEYS = 50


@dataclass(frozen=True)
class WebTracingConfig:
    """Settings shared by the ASGI and WSGI middlewares.

    identify:
        ``request -> TraceAttributes | None``, called once per request before the app
        runs; typically reads a user id from a verified token and a session id from a
        cookie. Its non-empty fields win over those received in headers.
    exclude_paths:
        Paths that are never traced; an entry ending in ``*`` matches a prefix
        (``"/static/*"``).
    trust_incoming_headers:
        Continue traces (and accept user/session ids) from incoming trace headers.
        Turn off on an API exposed to clients you do not control.
    """

    identify: Identify | None = None
    exclude_paths: Collection[str] = DEFAULT_EXCLUDED_PATHS
    trust_incoming_headers: bool = True

    def __post_init__(self) -> None:
        if self.identify is not None and not callable(self.identify):
            raise ConfigurationError(
                f"celery-langfuse web setting identify={self.identify!r}: must be a callable "
                "taking the request and returning TraceAttributes or None"
            )
        if isinstance(self.exclude_paths, str) or not all(
            isinstance(path, str) and path.startswith("/") for path in self.exclude_paths
        ):
            raise ConfigurationError(
                f"celery-langfuse web setting exclude_paths={self.exclude_paths!r}: must be a "
                "collection of paths starting with '/', such as {'/health', '/static/*'}"
            )
        if not isinstance(self.trust_incoming_headers, bool):
            raise ConfigurationError(
                "celery-langfuse web setting trust_incoming_headers="
                f"{self.trust_incoming_headers!r}: must be true or false"
            )
        object.__setattr__(self, "exclude_paths", frozenset(self.exclude_paths))

    def excludes(self, path: str) -> bool:
        return any(
            path.startswith(pattern[:-1]) if pattern.endswith("*") else path == pattern
            for pattern in self.exclude_paths
        )


class RequestTrace:
    """The observation of one request, from :meth:`begin` to :meth:`end`.

    The observation is current only between :meth:`begin` and :meth:`detach`, which
    must run in the same thread or task; :meth:`end` may come later (a WSGI body is
    sent after the app has returned).
    """

    def __init__(self, request: IncomingRequest, observation: Any, scope: ExitStack) -> None:
        self.request = request
        self._observation = observation
        self._scope = scope
        self.status_code: int | None = None
        self._failure: tuple[str, str] | None = None  # (level, status message)

    @classmethod
    def begin(cls, request: IncomingRequest, config: WebTracingConfig) -> RequestTrace | None:
        """Open the request's observation and make it current; None if tracing failed."""
        scope = ExitStack()
        try:
            attributes = TraceAttributes()
            parent: TraceParent | None = None
            if config.trust_incoming_headers:
                extracted = extract_context(request.headers)
                parent, attributes = extracted.parent, extracted.attributes
            # The request is where the trace enters this service: its parent is the
            # caller named in the headers, or none. A span the server or framework made
            # current (FastAPI's own telemetry, an ASGI instrumentation) is not what
            # Langfuse receives, and would leave the request pointing at a parent
            # Langfuse never sees. Other context values stay as they are.
            base = otel_context.get_current()
            entry = parent.context(base) if parent else set_span_in_context(INVALID_SPAN, base)
            scope.enter_context(client.attached(entry))
            attributes = _overlay(attributes, _identify(config, request))
            scope.enter_context(client.propagated(attributes))
            observation = scope.enter_context(
                client.get_langfuse().start_as_current_observation(
                    name=request.method,
                    as_type="span",
                    metadata=_request_metadata(request),
                    end_on_exit=False,
                )
            )
        except Exception:
            scope.close()
            warn_rate_limited(log, "web-begin", "celery-langfuse: could not trace a request")
            return None
        return cls(request, observation, scope)

    def record_status(self, status_code: int) -> None:
        self.status_code = status_code

    def record_exception(self, exc: BaseException) -> None:
        if isinstance(exc, Exception):
            self._failure = ("ERROR", describe_exception(exc))
        else:  # cancelled: the client went away or the server is stopping
            self._failure = ("WARNING", f"request cancelled ({type(exc).__name__})")

    def detach(self) -> None:
        """Stop being the current observation (the observation stays open)."""
        try:
            self._scope.close()
        except Exception:
            warn_rate_limited(log, "web-detach", "celery-langfuse: could not detach a request")

    def end(self, route: str | None) -> None:
        """Name the observation after ``route``, record the outcome and end it."""
        try:
            self._observation.update(
                name=f"{self.request.method} {route}" if route else self.request.method,
                output={"status_code": self.status_code} if self.status_code else None,
                metadata={"route": route, "status_code": self.status_code},
                **_level(self.status_code, self._failure),
            )
        except Exception:
            warn_rate_limited(log, "web-end", "celery-langfuse: could not record a response")
        finally:
            self._observation.end()


def _identify(config: WebTracingConfig, request: IncomingRequest) -> TraceAttributes | None:
    if config.identify is None:
        return None
    try:
        identified = config.identify(request)
    except Exception:
        warn_rate_limited(
            log, "web-identify", "celery-langfuse: identify() raised; request traced without ids"
        )
        return None
    if identified is not None and not isinstance(identified, TraceAttributes):
        warn_rate_limited(
            log, "web-identify-type",
            "celery-langfuse: identify() must return TraceAttributes or None, got %s",
            type(identified).__name__,
        )
        return None
    return identified


def _overlay(base: TraceAttributes, identified: TraceAttributes | None) -> TraceAttributes:
    if not identified:
        return base
    return replace(
        base,
        user_id=identified.user_id or base.user_id,
        session_id=identified.session_id or base.session_id,
        tags=tuple(dict.fromkeys((*base.tags, *identified.tags))),
        trace_name=identified.trace_name or base.trace_name,
        environment=identified.environment or base.environment,
        metadata={**base.metadata, **identified.metadata},
    )


def _request_metadata(request: IncomingRequest) -> dict[str, Any]:
    metadata: dict[str, Any] = {"method": request.method, "path": request.path}
    query_keys = sorted(request.query)[:_MAX_QUERY_KEYS]
    if query_keys:
        metadata["query_keys"] = query_keys
    user_agent = request.headers.get("user-agent")
    if user_agent:
        metadata["user_agent"] = user_agent[:_MAX_USER_AGENT_CHARS]
    return metadata


def _level(status_code: int | None, failure: tuple[str, str] | None) -> dict[str, Any]:
    if failure is not None:
        return {"level": failure[0], "status_message": failure[1]}
    if status_code is None:
        return {}
    if status_code >= 500:
        return {"level": "ERROR", "status_message": f"HTTP {status_code}"}
    if status_code >= 400:
        return {"level": "WARNING", "status_message": f"HTTP {status_code}"}
    return {}


