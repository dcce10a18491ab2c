"""Trace ids on log records: from a log line to its trace in Langfuse.

While a task runs (or a traced web request is handled, or anything else has an
observation current), every ``logging.LogRecord`` made in that thread carries

- ``langfuse_trace_id``: the 32-hex id of the trace;
- ``langfuse_observation_id``: the 16-hex id of the current observation (empty in a
  sampled-out trace, whose observations Langfuse never receives);

and records made outside any trace carry empty strings, so ``%(langfuse_trace_id)s``
in a log format never raises ``KeyError``. python-json-logger writes every record
attribute, so JSON logs get both fields as they are; structlog gets them from
:func:`add_trace_ids`, a processor.

How: a log record factory (``logging.setLogRecordFactory``), the mechanism
OpenTelemetry's logging instrumentation uses. It wraps whatever factory was in place
and is installed by ``install()`` while any installed app has ``log_trace_ids`` on. Its
cost is on log records only, never per task: it reads the current OTel span (a
context-variable lookup) and formats the ids once per observation (the last one is
remembered), see tests/test_hot_path_budget.py. A factory installed later that does not
call the one it replaced would drop the attributes; a pool process checks when it
starts (:func:`ensure_record_factory`), puts this one back on top and warns once.

One caveat, shared with every record-factory approach: a logging call passing
``extra={"langfuse_trace_id": ...}`` now collides with the attribute, and ``logging``
raises ``KeyError`` for it.

Trace URLs (``task.request.langfuse_trace_url``) follow Langfuse's own format,
``{LANGFUSE_BASE_URL}/project/<project id>/traces/<trace id>``. The project id is not
known to an API key without an API call (the SDK's ``get_trace_url`` makes one), and
no task waits for Langfuse: the URL is given only when the ``project_id`` setting is.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import MutableMapping
from typing import Any, Callable, Optional

from opentelemetry import trace as otel_trace

from .spans import LeanSpan

log = logging.getLogger(__name__)

TRACE_ID_ATTRIBUTE = "langfuse_trace_id"
OBSERVATION_ID_ATTRIBUTE = "langfuse_observation_id"

_NO_IDS = ("", "")
_DEFAULT_BASE_URL = "https://cloud.langfuse.com"

# The last span asked about and its ids as strings: every record logged during one
# observation (a task that logs ten lines) formats them once.
_last: tuple[Any, tuple[str, str]] = (None, _NO_IDS)


def current_ids() -> tuple[str, str]:
    """``(trace id, observation id)`` of the current observation, as Langfuse shows
    them; empty strings where there is none (and an empty observation id in a
    sampled-out trace)."""
    global _last
    span = otel_trace.get_current_span()
    last_span, ids = _last
    if span is last_span:
        return ids
    if type(span) is LeanSpan:  # this library's run and publish observations
        ids = (format(span.trace_id, "032x"), format(span.span_id, "016x"))
    else:
        context = span.get_span_context()
        if not context.is_valid:
            return _NO_IDS
        ids = (
            format(context.trace_id, "032x"),
            format(context.span_id, "016x") if context.trace_flags.sampled else "",
        )
    _last = (span, ids)
    return ids


class TraceIdRecordFactory:
    """A log record factory adding the trace ids to what ``wrapped`` makes (while
    ``active``: one that cannot be taken off, because another was installed on top of
    it, passes records through once uninstalled)."""

    __slots__ = ("active", "wrapped")

    def __init__(self, wrapped: Callable[..., logging.LogRecord]) -> None:
        self.wrapped = wrapped
        self.active = True

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.wrapped(*args, **kwargs)
        if self.active:
            record.langfuse_trace_id, record.langfuse_observation_id = current_ids()
        return record


_lock = threading.Lock()
_installed: Optional[TraceIdRecordFactory] = None
_warned_replaced = False


def install_record_factory() -> None:
    """Make every log record carry the trace ids (idempotent)."""
    global _installed
    with _lock:
        current = logging.getLogRecordFactory()
        if _installed is not None:
            if current is _installed:
                return
            _installed.active = False  # only the newest adds the ids, if both are called
        _installed = TraceIdRecordFactory(current)
        logging.setLogRecordFactory(_installed)


def uninstall_record_factory() -> None:
    """Stop adding trace ids: the factory is taken off if it is still the one in place,
    else it stays in the chain and passes records through."""
    global _installed
    with _lock:
        installed, _installed = _installed, None
        if installed is None:
            return
        installed.active = False
        if logging.getLogRecordFactory() is installed:
            logging.setLogRecordFactory(installed.wrapped)


def ensure_record_factory() -> None:
    """Put the factory back on top if one installed after it dropped its attributes
    (one warning per process). Called when a pool process starts, never per task."""
    global _warned_replaced
    if _installed is None:
        return
    probe = logging.getLogRecordFactory()("celery_langfuse", logging.DEBUG, "", 0, "", (), None)
    if hasattr(probe, TRACE_ID_ATTRIBUTE):
        return
    install_record_factory()
    if not _warned_replaced:
        _warned_replaced = True
        log.warning(
            "celery-langfuse: a log record factory installed after celery-langfuse did not "
            "call the one it replaced, so log records lost %s and %s; celery-langfuse "
            "wrapped it again (see docs/configuration.md, log_trace_ids)",
            TRACE_ID_ATTRIBUTE,
            OBSERVATION_ID_ATTRIBUTE,
        )


def add_trace_ids(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: adds ``langfuse_trace_id`` and ``langfuse_observation_id``
    to the event (values the event already has are kept)::

        structlog.configure(processors=[add_trace_ids, ..., JSONRenderer()])
    """
    trace_id, observation_id = current_ids()
    event_dict.setdefault(TRACE_ID_ATTRIBUTE, trace_id)
    event_dict.setdefault(OBSERVATION_ID_ATTRIBUTE, observation_id)
    return event_dict


def trace_url_prefix(project_id: Optional[str]) -> Optional[str]:
    """``{base URL}/project/{project_id}/traces/``, or None without a project id. The
    base URL is ``LANGFUSE_BASE_URL`` / ``LANGFUSE_HOST`` as the SDK reads them (read at
    ``install()``, which must create no client: a client made in code with another
    ``base_url`` is not seen)."""
    if not project_id:
        return None
    env = os.environ
    base = env.get("LANGFUSE_BASE_URL") or env.get("LANGFUSE_HOST") or _DEFAULT_BASE_URL
    return f"{base.rstrip('/')}/project/{project_id}/traces/"
