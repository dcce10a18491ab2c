"""``LangfuseMiddleware``: each Django request as one Langfuse observation.

Django routes and authenticates inside its own handler, so the WSGI/ASGI middlewares
around it see neither the route nor the user. This middleware runs inside that
handler, on the same request core as the other web layers
(:class:`celery_langfuse.web.RequestTrace`, through the web package's public names), so
incoming ``traceparent`` / ``x-langfuse-*`` headers, levels, metadata and naming
follow one rule:

- started before the rest of the middleware chain below it and the view, current
  while they run, so tasks they publish join the trace;
- named ``METHOD /route/`` from ``request.resolver_match`` after the view ran
  (``_routes.route_of``); ``METHOD`` alone when no route matched;
- user id from an authenticated ``request.user`` and session id from the Django
  session (``_settings.DjangoTracingSettings``), applied before the view runs; a
  ``request.user`` that raises gives no user id and one rate-limited warning;
- 4xx WARNING; 5xx ERROR, with the exception Django turned into the 500 page
  (received through Django's ``got_request_exception`` signal);
- sync and async: Django gives it the mode of the chain it sits in, so an ASGI
  server and async views never go through a thread for it.

It must come after ``SessionMiddleware`` and ``AuthenticationMiddleware`` in
``MIDDLEWARE`` (it warns at start-up otherwise). Loading it also applies the
``on_commit`` context patch (``_on_commit``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.core.signals import got_request_exception
from django.http import HttpRequest, HttpResponseBase
from django.utils.functional import LazyObject

from .. import client
from ..headers import TraceAttributes
from ..logs import warn_rate_limited
from ..web import IncomingRequest, RequestTrace
from ._on_commit import trace_on_commit
from ._routes import route_of
from ._settings import DjangoTracingSettings

log = logging.getLogger(__name__)

_STATE = "_celery_langfuse"
_MAX_ID_CHARS = 200
_AUTH_MIDDLEWARE = "django.contrib.auth.middleware.AuthenticationMiddleware"
_SESSION_MIDDLEWARE = "django.contrib.sessions.middleware.SessionMiddleware"
_THIS = "celery_langfuse.django.LangfuseMiddleware"


@dataclass(frozen=True)
class DjangoRequest(IncomingRequest):
    """The request core's view of a Django request, with the identity read from it."""

    identified: Optional[TraceAttributes] = field(default=None, repr=False)


@dataclass
class _RequestState:
    trace: RequestTrace
    exception: Optional[BaseException] = None


class LangfuseMiddleware:
    """Trace each request in Langfuse; add ``"celery_langfuse.django.LangfuseMiddleware"``
    to ``MIDDLEWARE`` after the session and authentication middlewares."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)
        self.settings = DjangoTracingSettings.from_django(identify=_identified)
        trace_on_commit()
        client.flush_before_sigterm()  # a server's SIGTERM keeps the process's observations
        got_request_exception.connect(
            _record_exception, weak=False, dispatch_uid="celery_langfuse.django"
        )
        _warn_about_order()

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        if self.settings.web.excludes(request.path_info):
            return self.get_response(request)
        user = getattr(request, "user", None)
        trace = self._begin(request, user)
        if trace is None:
            return self.get_response(request)
        try:
            response = self.get_response(request)
        except BaseException as exc:  # Django turns exceptions into responses; not these
            _finish(request, trace, None, exc)
            raise
        _finish(request, trace, response, None)
        return response

    async def __acall__(self, request: HttpRequest) -> Any:
        if self.settings.web.excludes(request.path_info):
            return await self.get_response(request)
        user = await _user_async(request)
        trace = self._begin(request, user)
        if trace is None:
            return await self.get_response(request)
        try:
            response = await self.get_response(request)
        except BaseException as exc:  # cancelled: the client went away
            _finish(request, trace, None, exc)
            raise
        _finish(request, trace, response, None)
        return response

    def _begin(self, request: HttpRequest, user: Any) -> Optional[RequestTrace]:
        incoming = DjangoRequest(
            method=str(request.method or "GET").upper(),
            path=request.path,
            # Django's HttpHeaders: one value per name, names in title case.
            headers={name.lower(): value for name, value in request.headers.items()},
            query_string=str(request.META.get("QUERY_STRING", "")),
            raw=request.META,
            # The peer as the server reports it, for trusted_networks (web/_core.py).
            client_address=str(request.META.get("REMOTE_ADDR") or "") or None,
            identified=self._identify(request, user),
        )
        trace = RequestTrace.begin(incoming, self.settings.web)
        if trace is not None:
            setattr(request, _STATE, _RequestState(trace))
        return trace

    def _identify(self, request: HttpRequest, user: Any) -> Optional[TraceAttributes]:
        user_id = self._user_id(user)
        session_id = self._session_id(request)
        if user_id is None and session_id is None:
            return None
        return TraceAttributes(user_id=user_id, session_id=session_id)

    def _user_id(self, user: Any) -> Optional[str]:
        chosen = self.settings.user_id
        if chosen is None or user is None:
            return None
        try:
            if not user.is_authenticated:
                return None
            value = chosen(user) if callable(chosen) else getattr(user, chosen)
        except Exception:
            warn_rate_limited(
                log,
                "django-user",
                "celery-langfuse: reading request.user raised; the request is traced "
                "without a user id",
            )
            return None
        return _id(value)

    def _session_id(self, request: HttpRequest) -> Optional[str]:
        chosen = self.settings.session_id
        if chosen is False:
            return None
        try:
            if callable(chosen):
                return _id(chosen(request))
            session = getattr(request, "session", None)
            key = getattr(session, "session_key", None)
            if not key:
                return None
            from django.utils.crypto import salted_hmac

            digest: str = salted_hmac("celery_langfuse.session_id", key).hexdigest()
            return digest[:32]
        except Exception:
            warn_rate_limited(
                log,
                "django-session",
                "celery-langfuse: reading the session id raised; the request is traced "
                "without a session id",
            )
            return None


def _identified(request: IncomingRequest) -> Optional[TraceAttributes]:
    """The web core's ``identify``: what the middleware read before the request began."""
    return getattr(request, "identified", None)


async def _user_async(request: HttpRequest) -> Any:
    """``request.user`` loaded without blocking the event loop.

    ``AuthenticationMiddleware`` leaves a lazy ``request.user`` (loading it would query
    the database from the event loop) and ``request.auser`` (Django 5) to load it. A
    middleware that logs a user in replaces ``request.user`` with the user itself,
    while ``auser`` may still answer what it cached before (Django's own
    ``RemoteUserMiddleware`` does this): a user that is not lazy wins.
    """
    user = getattr(request, "user", None)
    auser = getattr(request, "auser", None)
    if auser is None or not (user is None or isinstance(user, LazyObject)):
        return user
    try:
        return await auser()
    except Exception:
        warn_rate_limited(
            log,
            "django-user",
            "celery-langfuse: reading request.user raised; the request is traced without a user id",
        )
        return None


def _finish(
    request: HttpRequest,
    trace: RequestTrace,
    response: Optional[HttpResponseBase],
    escaped: Optional[BaseException],
) -> None:
    trace.detach()
    state: Optional[_RequestState] = getattr(request, _STATE, None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        trace.record_status(status)
    if escaped is not None:
        trace.record_exception(escaped)
        if status is None:
            trace.record_status(500)
    elif state is not None and state.exception is not None and (status or 0) >= 500:
        # Only a 500: Http404 or PermissionDenied raised by a view are not failures.
        trace.record_exception(state.exception)
    match = getattr(request, "resolver_match", None)
    view_name = getattr(match, "view_name", None)
    trace.end(route_of(match), {"view": view_name} if view_name else None)


def _record_exception(sender: Any = None, request: Any = None, **_: Any) -> None:
    """``got_request_exception``: Django is turning an exception into a 500 page."""
    import sys

    state = getattr(request, _STATE, None)
    if isinstance(state, _RequestState):
        state.exception = sys.exc_info()[1]


def _id(value: object) -> Optional[str]:
    if value is None or value == "":
        return None
    return str(value)[:_MAX_ID_CHARS]


def _warn_about_order() -> None:
    """At start-up: placed before the session or authentication middleware, this
    middleware would start each request before Django knows its user or session."""
    from django.conf import settings

    middleware = list(getattr(settings, "MIDDLEWARE", None) or ())
    if _THIS not in middleware:
        return
    position = middleware.index(_THIS)
    for needed in (_SESSION_MIDDLEWARE, _AUTH_MIDDLEWARE):
        if needed in middleware and middleware.index(needed) > position:
            log.warning(
                "celery-langfuse: %s comes before %s in MIDDLEWARE, so requests are traced "
                "without their user or session; move it after",
                _THIS,
                needed,
            )
