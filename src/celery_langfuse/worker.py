"""Consumer side: each task run is an observation in the trace that published it.

``task_prerun`` continues the trace from the message headers (as a real child of the
publish observation, never a second root), re-applies the trace attributes (user,
session, tags, trace name, environment, metadata) and opens the run observation as the
current span, so everything the task does (nested tasks, LLM calls) nests inside it.
``task_postrun`` records the outcome and closes it.

A run that celery beat started (the message names its schedule entry) also records
the cron health scores on its trace when it ends: ``cron_success`` and
``cron_lateness_seconds`` (see ``client.score_cron_run``).

Open runs live in :class:`RunRegistry`, keyed by task id and bounded in size; nothing
is stored on task objects. Messages that never run (revoked, unknown, rejected) are
recorded as a short observation in the consumer process, so their trace shows why.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any, Optional

from celery import states
from langfuse.types import SpanLevel
from opentelemetry import trace as otel_trace

from . import client, headers
from .config import TracingConfig
from .logs import warn_rate_limited
from .payload import capture, describe_exception

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One task execution being traced in this process."""

    observation: client.Observation
    scope: ExitStack  # detaches the run's context and ends the observation
    traceback: Optional[str] = None
    cron: Optional[CronHealth] = None


@dataclass(frozen=True)
class CronHealth:
    """What a run started by celery beat reports when it ends."""

    entry: str
    task_id: Optional[str]
    #: Seconds from when the run was due to when this attempt started; only the
    #: first attempt reports it, retries would count their own delay as lateness.
    lateness_seconds: Optional[float]
    environment: Optional[str]

    def score(
        self, trace_id: str, *, success: Optional[bool], comment: Optional[str] = None
    ) -> None:
        client.score_cron_run(
            trace_id,
            success=success,
            lateness_seconds=self.lateness_seconds,
            comment=comment,
            metadata={"cron_entry": self.entry, "task_id": self.task_id},
            environment=self.environment,
        )


class RunRegistry:
    """Open runs keyed by task id and thread; a bounded, thread-safe stack per key.

    The thread is part of the key because a retry keeps the task id and may start in
    another pool thread before the first run has closed; a run opens and closes in the
    thread it runs in. A stack, because an eager retry runs the same task id again
    inside the first run. When more than ``limit`` runs are open, the oldest is evicted
    and returned so the caller can close it: the registry never grows without bound.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._runs: OrderedDict[tuple[str, int], list[Run]] = OrderedDict()
        self._count = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._count

    def push(self, task_id: str, run: Run) -> list[Run]:
        evicted: list[Run] = []
        key = (task_id, threading.get_ident())
        with self._lock:
            self._runs.setdefault(key, []).append(run)
            self._count += 1
            while self._count > self._limit:
                _, stack = self._runs.popitem(last=False)
                self._count -= len(stack)
                evicted.extend(stack)
        return evicted

    def peek(self, task_id: str) -> Optional[Run]:
        with self._lock:
            stack = self._runs.get((task_id, threading.get_ident()))
            return stack[-1] if stack else None

    def pop(self, task_id: str) -> Optional[Run]:
        key = (task_id, threading.get_ident())
        with self._lock:
            stack = self._runs.get(key)
            if not stack:
                return None
            run = stack.pop()
            self._count -= 1
            if not stack:
                del self._runs[key]
            return run


def request_headers(request: Any) -> dict[str, Any]:
    """The trace headers of a task's request, as a plain dict.

    A real worker delivers custom message headers both as ``request.headers`` and as
    request attributes; eager runs only in ``request.headers``. Reads try both. Header
    names are not identifiers ("x-langfuse-trace-id"), so as request attributes they can
    only be entries of the instance dict: reading that dict avoids an AttributeError
    for every header a message does not carry, on every task.
    """
    custom = getattr(request, "headers", None)
    delivered: Mapping[str, Any] = custom if isinstance(custom, Mapping) else {}
    attributes: Mapping[str, Any] = getattr(request, "__dict__", None) or {}
    found = {}
    for name in headers.ALL_HEADERS:
        value = delivered.get(name)
        if value is None:
            value = attributes.get(name)
        if value is not None:
            found[name] = value
    return found


class WorkerTracing:
    """The consumer-side signal handlers of one installation."""

    def __init__(self, config: TracingConfig) -> None:
        self.config = config
        self.runs = RunRegistry(config.max_open_runs)

    # -- run lifecycle --------------------------------------------------------------

    def on_task_prerun(
        self,
        sender: Any = None,
        task_id: Optional[str] = None,
        task: Any = None,
        args: Any = None,
        kwargs: Any = None,
        **_: Any,
    ) -> None:
        task = task or sender
        if task is None or task_id is None:
            return
        try:
            self._open_run(task_id, task, args, kwargs)
        except Exception:
            warn_rate_limited(log, "prerun", "celery-langfuse: could not start tracing task %s", task_id)

    def on_task_failure(
        self, task_id: Optional[str] = None, einfo: Any = None, **_: Any
    ) -> None:
        run = self.runs.peek(task_id) if task_id else None
        if run is not None and einfo is not None:
            run.traceback = str(getattr(einfo, "traceback", "") or "")[-self.config.max_payload_chars :]

    def on_task_postrun(
        self,
        task_id: Optional[str] = None,
        task: Any = None,
        retval: Any = None,
        state: Optional[str] = None,
        **_: Any,
    ) -> None:
        run = self.runs.pop(task_id) if task_id else None
        if run is None:
            return
        try:
            _record_outcome(run, state, retval, self.config)
            if run.cron is not None:
                run.cron.score(
                    run.observation.trace_id,
                    success=_CRON_SUCCESS_BY_STATE.get(state or ""),
                    comment=None if state == states.SUCCESS else describe_exception(retval),
                )
        except Exception:
            warn_rate_limited(log, "postrun", "celery-langfuse: could not record the outcome of task %s", task_id)
        finally:
            _close(run)

    def on_task_internal_error(
        self, task_id: Optional[str] = None, exception: Any = None, **_: Any
    ) -> None:
        run = self.runs.pop(task_id) if task_id else None
        if run is None:
            return
        try:
            status = f"internal error: {describe_exception(exception)}"
            run.observation.update(level="ERROR", status_message=status)
            if run.cron is not None:
                run.cron.score(run.observation.trace_id, success=False, comment=status)
        finally:
            _close(run)

    # -- messages that never run ----------------------------------------------------

    def on_task_revoked(
        self,
        request: Any = None,
        terminated: bool = False,
        signum: Any = None,
        expired: bool = False,
        **_: Any,
    ) -> None:
        if request is None:
            return
        if expired:
            status = "expired before it ran"
        elif terminated:
            status = f"terminated by signal {signum}" if signum else "terminated"
        else:
            status = "revoked"
        # Celery sends the request's Context: the task name is its ``task`` and the
        # message headers are read from it as from a running task's request.
        name = getattr(request, "task", None)
        self._record_unrun(
            name if isinstance(name, str) else "task",
            request_headers(request),
            getattr(request, "id", None),
            "WARNING",
            status,
        )

    def on_task_unknown(
        self, name: Optional[str] = None, id: Optional[str] = None, message: Any = None, **_: Any
    ) -> None:
        self._record_unrun(
            name or "task",
            _dict_headers(getattr(message, "headers", None)),
            id,
            "ERROR",
            f"unknown task {name!r}: no worker registered it",
        )

    def on_task_rejected(self, message: Any = None, exc: Any = None, **_: Any) -> None:
        message_headers = _dict_headers(getattr(message, "headers", None))
        name = message_headers.get("task") if isinstance(message_headers.get("task"), str) else None
        self._record_unrun(
            name or "task",
            message_headers,
            message_headers.get("id"),
            "ERROR",
            f"message rejected: {describe_exception(exc)}",
        )

    # -- internals ------------------------------------------------------------------

    def _open_run(self, task_id: str, task: Any, args: Any, kwargs: Any) -> None:
        request = task.request
        extracted = headers.extract(request_headers(request))
        cron = _cron_health(extracted, task_id, request)
        attributes = extracted.attributes
        # The parent's context is attached only when trace attributes must be
        # propagated inside it; otherwise the run starts in it and is attached with it.
        parent = extracted.parent.context() if extracted.parent is not None else None
        if parent is None and not otel_trace.get_current_span().get_span_context().is_valid:
            # A new trace: name it after the task unless the producer named it.
            attributes = replace(attributes, trace_name=attributes.trace_name or task.name)
        scope = ExitStack()
        try:
            if attributes:
                if parent is not None:
                    scope.enter_context(client.attached(parent))
                    parent = None
                scope.enter_context(client.propagated(attributes))
            observation = client.start_observation(
                task.name,
                context=parent,
                input=self._capture_input(args, kwargs),
                metadata=_run_metadata(task_id, request, extracted.published_at, cron),
            )
            scope.callback(observation.end)
            scope.enter_context(client.attached(client.context_with(observation, parent)))
        except BaseException:
            scope.close()
            raise
        for stale in self.runs.push(task_id, Run(observation, scope, cron=cron)):
            warn_rate_limited(
                log, "evicted", "celery-langfuse: more than %d runs open; closing the oldest",
                self.config.max_open_runs,
            )
            stale.observation.update(level="WARNING", status_message="run was never closed")
            stale.observation.end()

    def _capture_input(self, args: Any, kwargs: Any) -> Any:
        if not self.config.capture_input:
            return None
        limit = self.config.max_payload_chars
        return {
            "args": capture(list(args), limit) if args else [],
            "kwargs": capture(dict(kwargs), limit) if kwargs else {},
        }

    def _record_unrun(
        self,
        task_name: str,
        message_headers: Mapping[str, Any],
        task_id: Any,
        level: SpanLevel,
        status: str,
    ) -> None:
        try:
            extracted = headers.extract(message_headers)
            with ExitStack() as scope:
                if extracted.parent is not None:
                    scope.enter_context(client.attached(extracted.parent.context()))
                scope.enter_context(client.propagated(extracted.attributes))
                observation = client.start_observation(
                    task_name,
                    level=level,
                    status_message=status,
                    metadata={"task_id": task_id, "hostname": _HOSTNAME},
                )
                observation.end()
            if extracted.cron is not None:
                cron = CronHealth(
                    extracted.cron.entry, task_id, None, extracted.attributes.environment
                )
                cron.score(observation.trace_id, success=False, comment=status)
        except Exception:
            warn_rate_limited(log, "unrun", "celery-langfuse: could not record %s task %s", status, task_id)


_HOSTNAME = socket.gethostname()


def _cron_health(extracted: headers.Extracted, task_id: str, request: Any) -> Optional[CronHealth]:
    cron = extracted.cron
    if cron is None:
        return None
    lateness = None
    if cron.due_at is not None and not getattr(request, "retries", 0):
        lateness = max(time.time() - cron.due_at, 0.0)
    return CronHealth(cron.entry, task_id, lateness, extracted.attributes.environment)


#: The cron_success score of a run's final state; a retry is not final, and a task
#: that ignored itself (or was replaced) reports nothing.
_CRON_SUCCESS_BY_STATE = {states.SUCCESS: True, states.FAILURE: False, states.REJECTED: False}


def _run_metadata(
    task_id: str, request: Any, published_at: Optional[float], cron: Optional[CronHealth]
) -> dict[str, Any]:
    delivery_info = getattr(request, "delivery_info", None) or {}
    metadata: dict[str, Any] = {
        "task_id": task_id,
        "retries": getattr(request, "retries", 0) or 0,
        "queue": delivery_info.get("routing_key"),
        "hostname": getattr(request, "hostname", None) or _HOSTNAME,
    }
    for key in ("parent_id", "root_id", "group", "eta"):
        value = getattr(request, key, None)
        if value:
            metadata[key] = value
    if getattr(request, "is_eager", False):
        metadata["eager"] = True
    if published_at is not None:
        metadata["queue_wait_seconds"] = round(max(time.time() - published_at, 0.0), 6)
    if cron is not None:
        metadata["cron_entry"] = cron.entry
        if cron.lateness_seconds is not None:
            metadata["cron_lateness_seconds"] = round(cron.lateness_seconds, 3)
    return metadata


def _record_outcome(run: Run, state: Optional[str], retval: Any, config: TracingConfig) -> None:
    observation = run.observation
    if state == states.SUCCESS:
        if config.capture_output:
            observation.update(output=capture(retval, config.max_payload_chars))
    elif state == states.FAILURE:
        metadata = {"exception_type": type(retval).__name__}
        if run.traceback:
            metadata["traceback"] = run.traceback
        observation.update(level="ERROR", status_message=describe_exception(retval), metadata=metadata)
    elif state == states.RETRY:
        observation.update(level="WARNING", status_message=f"retry: {_describe_retry(retval)}")
    elif state == states.REJECTED:
        observation.update(level="WARNING", status_message=f"rejected: {describe_exception(retval)}")
    elif state == states.IGNORED:
        observation.update(status_message="ignored")


def _close(run: Run) -> None:
    try:
        run.scope.close()
    except Exception:
        warn_rate_limited(log, "close", "celery-langfuse: could not close a task run")


def _describe_retry(retry: Any) -> str:
    reason = getattr(retry, "exc", None)
    if reason is not None:
        return describe_exception(reason)
    return str(getattr(retry, "message", None) or retry or "retry requested")[:1000]


def _dict_headers(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}
