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
- an incoming W3C ``traceparent`` is continued, not restarted; without one the
  request starts a new trace, sampled by the rule of traces a task starts
  (``sample_rate``, ``task_sample_rates`` matching ``METHOD /path``, ``sampler``); a
  sampled-out request that fails is still recorded (:class:`RequestTrace`).

Trust (:func:`read_incoming`, the one decision every middleware makes, Django's too):
only a trusted caller (``trust_incoming_headers``, a ``trusted_networks`` address, or
the ``trust_secret`` header) brings trace attributes and a Langfuse parent
(``x-langfuse-*``). From anyone else they are ignored: a request naming a Langfuse
trace starts its own, recording the ids it claimed, and ``identify`` alone says who
the user is.

Tracing faults are logged (rate-limited) and never reach the request.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Collection, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any, Callable, NamedTuple, Optional

from opentelemetry import context as otel_context
from opentelemetry.trace import INVALID_SPAN, set_span_in_context

from .. import _policy, client, headers
from ..config import (
    SECRET_ALLOWED,
    ConfigurationError,
    Network,
    is_secret,
    parse_networks,
    shown_secret,
)
from ..headers import TraceAttributes, TraceParent
from ..logs import warn_rate_limited
from ..payload import describe_exception
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
        cookie. Its non-empty fields win over those a trusted caller sent in headers.
    exclude_paths:
        Paths that are never traced; an entry ending in ``*`` matches a prefix
        (``"/static/*"``).
    trust_incoming_headers:
        Trust every caller: take trace attributes (user, session, tags, trace name,
        environment, metadata) and the Langfuse parent from any request's
        ``x-langfuse-*`` headers. Only for a service no one but your own services
        can reach. Off (the default), only the callers below are trusted.
    trusted_networks:
        Networks (``"10.0.0.0/8"``, ``"fd00::/8"``, or single addresses) whose callers
        are trusted; the address is the peer the server reports (see
        :class:`IncomingRequest`), never a header the caller wrote.
    trust_secret:
        A shared secret: a request carrying it in ``x-langfuse-trust-secret``
        (compared in constant time) is trusted. Internal services send it with
        ``inject_headers(..., trust_secret=...)`` or the HTTP client hooks.
    """

    identify: Identify | None = None
    exclude_paths: Collection[str] = DEFAULT_EXCLUDED_PATHS
    trust_incoming_headers: bool = False
    trusted_networks: Collection[str] = ()
    trust_secret: str | None = field(default=None, repr=False)
    #: ``trusted_networks``, parsed.
    networks: tuple[Network, ...] = field(init=False, repr=False, compare=False)

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
        networks = parse_networks("trusted_networks", self.trusted_networks)
        if self.trust_secret is not None and not is_secret(self.trust_secret):
            raise ConfigurationError(
                "celery-langfuse web setting trust_secret="
                f"{shown_secret(self.trust_secret)}: must be {SECRET_ALLOWED}"
            )
        if self.trust_incoming_headers and (networks or self.trust_secret is not None):
            raise ConfigurationError(
                "celery-langfuse web setting trust_incoming_headers=True trusts every "
                "caller, so trusted_networks and trust_secret would do nothing: set "
                "trust_incoming_headers=False to trust only those callers"
            )
        object.__setattr__(self, "exclude_paths", frozenset(self.exclude_paths))
        object.__setattr__(self, "trusted_networks", tuple(str(n) for n in networks))
        object.__setattr__(self, "networks", networks)

    def excludes(self, path: str) -> bool:
        return any(
            path.startswith(pattern[:-1]) if pattern.endswith("*") else path == pattern
            for pattern in self.exclude_paths
        )


class IncomingTrace(NamedTuple):
    """What a request brings, once its caller's trust is decided (:func:`read_incoming`)."""

    trusted: bool
    #: ``parent``: what to continue (from an untrusted caller, a W3C parent only);
    #: ``attributes``: none from an untrusted caller; ``distrusted``: what it claimed.
    extracted: headers.Extracted


def read_incoming(
    request_headers: Mapping[str, str], peer_address: str | None, config: WebTracingConfig
) -> IncomingTrace:
    """Decide whether the caller is trusted, and read its trace headers accordingly.

    ``request_headers``: a mapping whose ``get`` finds lower-case names
    (:attr:`IncomingRequest.headers`, Django's ``request.headers``). ``peer_address``:
    the caller's IP address as the server reports it (ASGI ``scope["client"][0]``,
    WSGI/Django ``REMOTE_ADDR``), or None. Never raises for any header value.
    """
    trusted = trusts_caller(request_headers, peer_address, config)
    return IncomingTrace(trusted, headers.extract(request_headers, trusted=trusted))


def trusts_caller(
    request_headers: Mapping[str, str], peer_address: str | None, config: WebTracingConfig
) -> bool:
    """Whether a request's ``x-langfuse-*`` headers are believed: every caller's with
    ``trust_incoming_headers``; else a caller sending ``trust_secret`` or calling from
    one of ``trusted_networks``."""
    if config.trust_incoming_headers:
        return True
    if config.trust_secret is not None and headers.secret_matches(
        request_headers.get(headers.TRUST_SECRET), config.trust_secret
    ):
        return True
    return bool(config.networks) and _in_networks(peer_address, config.networks)


def _in_networks(peer_address: str | None, networks: tuple[Network, ...]) -> bool:
    if not peer_address:
        return False
    try:
        address = ipaddress.ip_address(peer_address)
    except ValueError:  # a unix socket path, "testclient", garbage
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # "::ffff:10.0.0.5" from a dual-stack socket
    return any(address in network for network in networks)


class _KeptIfFailed(NamedTuple):
    """A request of a sampled-out trace, kept in case it fails: what its record needs."""

    trace_id: str
    started_ns: int
    metadata: dict[str, Any]
    attributes: TraceAttributes


class RequestTrace:
    """The observation of one request, from :meth:`begin` to :meth:`end`.

    The observation is current only between :meth:`begin` and :meth:`detach`, which
    must run in the same thread or task; :meth:`end` may come later (a WSGI body is
    sent after the app has returned).

    A request that starts a trace is sampled like a task that starts one
    (``_policy.sample_entry``, named ``METHOD /path``). Sampled out, it records
    nothing, and its context carries the trace id with the sampled flag off, so the
    tasks it enqueues record nothing either; if it fails (5xx, or an exception) it is
    recorded after all, as the root of its trace, backdated (``keep_failures``).
    """

    def __init__(
        self,
        request: IncomingRequest,
        observation: client.Observation | None,
        scope: ExitStack,
        kept: _KeptIfFailed | None = None,
    ) -> None:
        self.request = request
        self._observation = observation
        self._scope = scope
        self._kept = kept
        self.status_code: int | None = None
        self._failure: tuple[str, str] | None = None  # (level, status message)

    @classmethod
    def begin(cls, request: IncomingRequest, config: WebTracingConfig) -> RequestTrace | None:
        """Open the request's observation and make it current; None if tracing failed."""
        scope = ExitStack()
        try:
            incoming = read_incoming(request.headers, request.client_address, config)
            parent: TraceParent | None = incoming.extracted.parent
            # The request is where the trace enters this service: its parent is the
            # caller named in the headers, or none. A span the server or framework made
            # current (FastAPI's own telemetry, an ASGI instrumentation) is not what
            # Langfuse receives, and would leave the request pointing at a parent
            # Langfuse never sees. Other context values stay as they are, but for
            # Langfuse's own baggage from an untrusted caller.
            base = otel_context.get_current()
            if not incoming.trusted:
                base = headers.without_langfuse_baggage(base)
            attributes = _overlay(incoming.extracted.attributes, _identify(config, request))
            metadata = _request_metadata(request)
            if incoming.extracted.distrusted is not None:
                metadata.update(incoming.extracted.distrusted.metadata())
                _note_first_distrusted()
            new_trace_id: str | None = None
            if parent is None:
                # The request starts a trace: its id is drawn first, the decision made
                # from it by the rule a worker uses for a task starting one.
                new_trace_id = _policy.new_trace_id()
                if not _policy.sample_entry(
                    new_trace_id, f"{request.method} {request.path}", request.headers, "web"
                ):
                    return cls._sampled_out(
                        request, scope, new_trace_id, base, attributes, metadata
                    )
            entry = parent.context(base) if parent else set_span_in_context(INVALID_SPAN, base)
            scope.enter_context(client.attached(entry))
            scope.enter_context(client.propagated(attributes))
            observation = client.start_observation(
                request.method, metadata=metadata, root_of=new_trace_id
            )
            scope.enter_context(client.attached(client.context_with(observation)))
        except Exception:
            scope.close()
            warn_rate_limited(log, "web-begin", "celery-langfuse: could not trace a request")
            return None
        return cls(request, observation, scope)

    @classmethod
    def _sampled_out(
        cls,
        request: IncomingRequest,
        scope: ExitStack,
        trace_id: str,
        base: otel_context.Context,
        attributes: TraceAttributes,
        metadata: dict[str, Any],
    ) -> RequestTrace:
        # The request's own span id, never recorded: enqueued tasks name it as parent
        # and, seeing the sampled flag off, record nothing (their failures aside).
        unsampled = TraceParent(trace_id, _policy.new_span_id(), sampled=False)
        scope.enter_context(client.attached(unsampled.context(base)))
        scope.enter_context(client.propagated(attributes))
        kept = None
        if _policy.keeps_failures():
            kept = _KeptIfFailed(trace_id, time.time_ns(), metadata, attributes)
        return cls(request, None, scope, kept)

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

    def end(self, route: str | None, metadata: dict[str, Any] | None = None) -> None:
        """Name the observation after ``route``, record the outcome (and the framework's
        ``metadata`` about the matched route, if any) and end it."""
        name = f"{self.request.method} {route}" if route else self.request.method
        output = {"status_code": self.status_code} if self.status_code else None
        outcome = _level(self.status_code, self._failure)
        observation = self._observation
        if observation is None:
            self._record_kept_failure(name, route, output, outcome)
            return
        try:
            observation.span.update_name(name)
            observation.update(
                output=output,
                metadata={**(metadata or {}), "route": route, "status_code": self.status_code},
                **outcome,
            )
        except Exception:
            warn_rate_limited(log, "web-end", "celery-langfuse: could not record a response")
        finally:
            observation.end()

    def _record_kept_failure(
        self, name: str, route: str | None, output: Any, outcome: dict[str, Any]
    ) -> None:
        """Record a failed request of a sampled-out trace as the root of its trace."""
        kept = self._kept
        if kept is None or outcome.get("level") != "ERROR":
            return
        try:
            metadata = {
                **kept.metadata,
                "route": route,
                "status_code": self.status_code,
                "trace_sampled": False,
            }
            with client.propagated(kept.attributes), client.root_observation(
                kept.trace_id,
                name=name,
                start_time_ns=kept.started_ns,
                metadata=metadata,
                **outcome,
            ) as root:
                root.update(output=output)
        except Exception:
            warn_rate_limited(log, "web-end", "celery-langfuse: could not record a response")


_noted_distrusted = False


def _note_first_distrusted() -> None:
    """Say once per process why a caller's trace headers were ignored: a service that
    relied on the old default (trust everyone) otherwise only sees ids go missing."""
    global _noted_distrusted
    if not _noted_distrusted:
        _noted_distrusted = True
        log.info(
            "celery-langfuse: ignoring x-langfuse-* trace headers from a caller that is not "
            "trusted (its request starts its own trace); give your own services "
            "trust_secret or trusted_networks, see docs/web.md 'Trust'"
        )


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
    ).bounded()


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


