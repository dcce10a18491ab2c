"""Flask: the WSGI middleware plus Flask's own knowledge of the route and errors."""

from __future__ import annotations

from typing import Any

from flask import Flask, got_request_exception, request, request_started

from ._wsgi import EXCEPTION_KEY, ROUTE_KEY, LangfuseWSGIMiddleware


def trace_flask(app: Flask, **options: Any) -> Flask:
    """Trace each request of ``app`` in Langfuse; returns the app.

    Observations are named after ``request.url_rule`` (``GET /orders/<int:order_id>``).
    Keyword arguments are the fields of :class:`~celery_langfuse.web.WebTracingConfig`.
    """
    if isinstance(app.wsgi_app, LangfuseWSGIMiddleware):
        return app
    app.wsgi_app = LangfuseWSGIMiddleware(app.wsgi_app, **options)  # type: ignore[method-assign]
    # The request context has matched the URL rule by the time request_started fires,
    # before any before_request function can answer instead of the view.
    request_started.connect(_record_route, app, weak=False)
    got_request_exception.connect(_record_exception, app, weak=False)
    return app


def _record_route(sender: Flask, **_: Any) -> None:
    rule = request.url_rule
    if rule is not None:
        request.environ[ROUTE_KEY] = rule.rule


def _record_exception(sender: Flask, exception: BaseException, **_: Any) -> None:
    request.environ[EXCEPTION_KEY] = exception
