"""The one patch of Django: ``on_commit`` callbacks run in the trace they were registered in.

Why a patch: a task published with ``delay_on_commit``, ``transaction.on_commit(...)``
or from a signal handler is sent when the transaction commits, which can be after the
request's observation stopped being current (a transaction opened by an outer
middleware, a ``TestCase``, a manual ``set_autocommit(False)``) or on another thread.
Django has no hook for registering a callback, so ``BaseDatabaseWrapper.on_commit``
(which ``transaction.on_commit`` and Celery's ``delay_on_commit`` go through) is
wrapped: the OTel context current at registration (its span, user, session and other
propagated attributes) is kept with the callback and made current while it runs, so
the publish joins the request's trace even after the request's span has ended.

A rolled-back transaction drops its callbacks, so nothing is published and nothing was
opened: only a context was kept. Callbacks registered outside any trace are passed
through untouched. ``tests/test_django_on_commit.py`` pins the Django behaviour this
relies on.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace

from .. import client

_ORIGINAL = "__celery_langfuse_original__"


def trace_on_commit() -> None:
    """Make every ``on_commit`` callback run in its registering trace context. Idempotent."""
    from django.db.backends.base.base import BaseDatabaseWrapper

    original = BaseDatabaseWrapper.on_commit
    if getattr(original, _ORIGINAL, None) is not None:
        return

    @functools.wraps(original)
    def on_commit(self: Any, func: Callable[[], Any], robust: bool = False) -> Any:
        return original(self, in_registering_context(func), robust)

    setattr(on_commit, _ORIGINAL, original)
    BaseDatabaseWrapper.on_commit = on_commit  # type: ignore[method-assign]


def untrace_on_commit() -> None:
    """Give Django its own ``on_commit`` back."""
    from django.db.backends.base.base import BaseDatabaseWrapper

    original = getattr(BaseDatabaseWrapper.on_commit, _ORIGINAL, None)
    if original is not None:
        BaseDatabaseWrapper.on_commit = original  # type: ignore[method-assign]


def in_registering_context(func: Callable[[], Any]) -> Callable[[], Any]:
    """``func`` bound to the trace context current now, if there is one to keep."""
    if not callable(func):
        return func  # Django raises its own TypeError for it
    registered = otel_context.get_current()
    if not _carries_a_trace(registered):
        return func

    def run_in_registering_context() -> Any:
        token = otel_context.attach(registered)
        try:
            return func()
        finally:
            otel_context.detach(token)

    # Django names the callback when a robust one fails.
    run_in_registering_context.__qualname__ = getattr(func, "__qualname__", type(func).__qualname__)
    run_in_registering_context.__wrapped__ = func  # type: ignore[attr-defined]
    return run_in_registering_context


def _carries_a_trace(ctx: otel_context.Context) -> bool:
    if otel_trace.get_current_span(ctx).get_span_context().is_valid:
        return True
    return bool(client.current_trace_attributes(ctx))
