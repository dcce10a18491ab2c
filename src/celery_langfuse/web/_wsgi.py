"""WSGI middleware (Flask, Django, any WSGI app): one observation per request.

A WSGI middleware sees the request before routing, so the framework reports the
matched route (and an exception it turned into a 500 page) in the environ under
:data:`ROUTE_KEY` / :data:`EXCEPTION_KEY`; :func:`celery_langfuse.web.trace_flask`
wires Flask to do it. The observation is current while the app runs and ends when
the server closes the response body, so a streamed body counts in its duration.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Callable

from ._core import RequestTrace, WebTracingConfig
from ._request import IncomingRequest

#: Environ key where the framework puts the matched route template.
ROUTE_KEY = "celery_langfuse.route"
#: Environ key where the framework puts an exception it handled as a 500 response.
EXCEPTION_KEY = "celery_langfuse.exception"

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class LangfuseWSGIMiddleware:
    """Trace each request of a WSGI app: ``app.wsgi_app = LangfuseWSGIMiddleware(app.wsgi_app)``.

    Keyword arguments are the fields of :class:`WebTracingConfig`.
    """

    def __init__(self, app: WSGIApp, /, **options: Any) -> None:
        self.app = app
        self.config = WebTracingConfig(**options)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        request = IncomingRequest.from_wsgi(environ)
        if self.config.excludes(request.path):
            return self.app(environ, start_response)
        trace = RequestTrace.begin(request, self.config)
        if trace is None:
            return self.app(environ, start_response)

        def start_response_recording_status(status: str, *args: Any) -> Any:
            trace.record_status(_status_code(status))
            return start_response(status, *args)

        try:
            body = self.app(environ, start_response_recording_status)
        except BaseException as exc:
            trace.record_exception(exc)
            if trace.status_code is None:
                trace.record_status(500)
            trace.detach()
            _finish(trace, environ)
            raise
        trace.detach()
        return _TracedBody(body, trace, environ)


class _TracedBody:
    """The app's response body; ends the request's observation once it is sent.

    Servers call ``close()`` after sending (PEP 3333); a body read to its end counts
    as sent too, for clients that never close (werkzeug's test client).
    """

    def __init__(self, body: Iterable[bytes], trace: RequestTrace, environ: dict[str, Any]) -> None:
        self._body = body
        self._trace = trace
        self._environ = environ
        self._finished = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._body
        except BaseException as exc:
            self._trace.record_exception(exc)
            raise
        finally:
            self._finish()

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            _finish(self._trace, self._environ)


def _finish(trace: RequestTrace, environ: dict[str, Any]) -> None:
    handled = environ.get(EXCEPTION_KEY)
    if isinstance(handled, BaseException):
        trace.record_exception(handled)
    route = environ.get(ROUTE_KEY)
    trace.end(route if isinstance(route, str) else None)


def _status_code(status: str) -> int:
    try:
        return int(status.split(" ", 1)[0])
    except ValueError:
        return 0

