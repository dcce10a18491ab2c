"""Consumer side: each task run is an observation in the trace that published it.

``task_prerun`` continues the trace from the message headers (as a real child of the
publish observation, never a second root), re-applies the trace attributes (user,
session, tags, trace name, environment, metadata) and opens the run observation as the
current span, so everything the task does (nested tasks, LLM calls) nests inside it.
``task_postrun`` records the outcome and closes it.

Open runs live in :class:`RunRegistry`, keyed by task id and bounded in size; nothing
is stored on task objects. Messages that never run (revoked, unknown, rejected) are
recorded as a short observation in the consumer process, so their trace shows why; so
are runs whose pool process died (SIGKILL, out of memory, hard time limit), since their
own observation died with that process.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any, Optional

from celery import states
from celery.exceptions import TimeLimitExceeded, WorkerLostError
from langfuse.types import SpanLevel
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace

from . import client, headers
from .config import TracingConfig
from .logs import warn_rate_limited
from .payload import capture

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One task execution being traced in this process."""

    observation: Any  # a LangfuseSpan
    scope: ExitStack
    traceback: Optional[str] = None


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


class RequestHeaders(Mapping[str, Any]):
    """The trace headers of a running task's request.

    A real worker delivers custom message headers both as ``request.headers`` and as
    request attributes; eager runs only in ``request.headers``. Reads try both.
    """

    __slots__ = ("_headers", "_request")

    def __init__(self, request: Any) -> None:
        self._request = request
        custom = getattr(request, "headers", None)
        self._headers: Mapping[str, Any] = custom if isinstance(custom, Mapping) else {}

    def __getitem__(self, name: str) -> Any:
        value = self._headers.get(name)
        if value is None:
            value = getattr(self._request, name, None)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(headers.ALL_HEADERS)

    def __len__(self) -> int:
        return len(headers.ALL_HEADERS)


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
        self,
        sender: Any = None,
        task_id: Optional[str] = None,
        exception: Any = None,
        einfo: Any = None,
        **_: Any,
    ) -> None:
        run = self.runs.peek(task_id) if task_id else None
        if run is not None:
            if einfo is not None:
                run.traceback = str(getattr(einfo, "traceback", "") or "")[
                    -self.config.max_payload_chars :
                ]
        elif isinstance(exception, _PROCESS_DIED) and task_id:
            # Sent in the main worker process: the pool child that ran the task was
            # killed (SIGKILL, OOM, hard time limit) and its open run died with it.
            self._record_unrun(
                getattr(sender, "name", None) or "task",
                _request_headers(sender, task_id),
                task_id,
                "ERROR",
                f"the process running it died: {_describe(exception)}",
            )

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
            run.observation.update(
                level="ERROR", status_message=f"internal error: {_describe(exception)}"
            )
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
        self._record_unrun(
            getattr(request, "name", None) or "task",
            _dict_headers(getattr(request, "request_dict", None)),
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
            f"message rejected: {_describe(exc)}",
        )

    # -- internals ------------------------------------------------------------------

    def _open_run(self, task_id: str, task: Any, args: Any, kwargs: Any) -> None:
        request = task.request
        extracted = _extract(RequestHeaders(request), task_id)
        scope = ExitStack()
        try:
            attributes = extracted.attributes
            if extracted.parent is not None:
                scope.enter_context(_attached(extracted.parent.context()))
            elif not otel_trace.get_current_span().get_span_context().is_valid:
                # A new trace: name it after the task unless the producer named it.
                attributes = replace(attributes, trace_name=attributes.trace_name or task.name)
            scope.enter_context(client.propagated(attributes))
            observation = scope.enter_context(
                client.get_langfuse().start_as_current_observation(
                    name=task.name,
                    as_type="span",
                    input=self._capture_input(args, kwargs),
                    metadata=_run_metadata(task_id, request, extracted.published_at),
                )
            )
        except BaseException:
            scope.close()
            raise
        for stale in self.runs.push(task_id, Run(observation, scope)):
            warn_rate_limited(
                log, "evicted", "celery-langfuse: more than %d runs open; closing the oldest",
                self.config.max_open_runs,
            )
            stale.observation.update(level="WARNING", status_message="run was never closed")
            stale.observation.end()

    def _capture_input(self, args: Any, kwargs: Any) -> Any:
        if not self.config.capture_input:
            return None
        return {
            "args": capture(list(args or ()), self.config.max_payload_chars),
            "kwargs": capture(dict(kwargs or {}), self.config.max_payload_chars),
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
            extracted = _extract(message_headers, task_id)
            with ExitStack() as scope:
                if extracted.parent is not None:
                    scope.enter_context(_attached(extracted.parent.context()))
                scope.enter_context(client.propagated(extracted.attributes))
                observation = client.get_langfuse().start_observation(
                    name=task_name,
                    as_type="span",
                    level=level,
                    status_message=status,
                    metadata={"task_id": task_id, "hostname": _HOSTNAME},
                )
                observation.end()
        except Exception:
            warn_rate_limited(log, "unrun", "celery-langfuse: could not record %s task %s", status, task_id)


_HOSTNAME = socket.gethostname()
_PROCESS_DIED = (WorkerLostError, TimeLimitExceeded)


def _extract(message_headers: Mapping[str, Any], task_id: Any) -> headers.Extracted:
    extracted = headers.extract(message_headers)
    if extracted.malformed:
        warn_rate_limited(
            log,
            "malformed-headers",
            "celery-langfuse: ignoring malformed trace header(s) %s of task %s; "
            "its run starts a fresh trace or loses those attributes",
            ", ".join(sorted(set(extracted.malformed))),
            task_id,
        )
    return extracted


@contextmanager
def _attached(ctx: otel_context.Context) -> Iterator[None]:
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


def _run_metadata(task_id: str, request: Any, published_at: Optional[float]) -> dict[str, Any]:
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
        observation.update(level="ERROR", status_message=_describe(retval), metadata=metadata)
    elif state == states.RETRY:
        observation.update(level="WARNING", status_message=f"retry: {_describe_retry(retval)}")
    elif state == states.REJECTED:
        observation.update(level="WARNING", status_message=f"rejected: {_describe(retval)}")
    elif state == states.IGNORED:
        observation.update(status_message="ignored")


def _close(run: Run) -> None:
    try:
        run.scope.close()
    except Exception:
        warn_rate_limited(log, "close", "celery-langfuse: could not close a task run")


def _describe(exc: Any) -> str:
    if exc is None:
        return "unknown error"
    message = str(exc)
    name = type(exc).__name__
    return f"{name}: {message}"[:1000] if message else name


def _describe_retry(retry: Any) -> str:
    reason = getattr(retry, "exc", None)
    if reason is not None:
        return _describe(reason)
    return str(getattr(retry, "message", None) or retry or "retry requested")[:1000]


def _dict_headers(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _request_headers(task: Any, task_id: str) -> Mapping[str, Any]:
    # For a lost worker Celery puts the failed request on the task's request stack
    # while it sends task_failure; for a hard time limit it does not, and the run is
    # recorded in a trace of its own.
    request = getattr(task, "request", None)
    if getattr(request, "id", None) == task_id:
        return RequestHeaders(request)
    return {}
