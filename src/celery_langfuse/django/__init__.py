"""Django, first-class: requests traced by URL pattern and user, tasks published on
commit kept in the request's trace, settings from settings.py (docs/django.md).

- :class:`LangfuseMiddleware`: add ``"celery_langfuse.django.LangfuseMiddleware"`` to
  ``MIDDLEWARE`` after the session and authentication middlewares; it reads
  ``CELERY_LANGFUSE_DJANGO`` (:class:`DjangoTracingSettings`).
- :func:`trace_on_commit`: ``on_commit`` callbacks (``delay_on_commit`` included) run
  in the trace context they were registered in. The middleware applies it; call it
  yourself in processes without the middleware (management commands).

``install(app)`` itself reads ``CELERY_LANGFUSE_<SETTING>`` from settings.py through the
app's ``config_from_object("django.conf:settings", namespace="CELERY")``.
"""

from __future__ import annotations

from ._middleware import LangfuseMiddleware
from ._on_commit import trace_on_commit, untrace_on_commit
from ._routes import route_of, simplify_regex
from ._settings import DjangoTracingSettings

__all__ = [
    "DjangoTracingSettings",
    "LangfuseMiddleware",
    "route_of",
    "simplify_regex",
    "trace_on_commit",
    "untrace_on_commit",
]
