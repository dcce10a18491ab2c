"""Consumer side: each task run is an observation in the trace that published it.

``task_prerun`` continues the trace from the message headers (as a real child of the
publish observation, never a second root), re-applies the trace attributes (user,
session, tags, trace name, environment, metadata) and opens the run observation as the
current span, so everything the task does (nested tasks, LLM calls) nests inside it.
``task_postrun`` records the outcome and closes it.

Sampling (see ``_policy.py``): a run follows its parent's sampled flag; a run that
starts a trace draws the trace id first and then decides. A sampled-out run records
nothing, but keeps what a failure report needs (a few references and its start time)
so that, with ``keep_failures``, a failure is still recorded as the root of its trace,
backdated to when the run began. A task excluded by name records nothing, but its
parent stays current so the tasks it publishes stay in the trace.

A run that celery beat started (the message names its schedule entry) also records
the cron health scores on its trace when it ends: ``cron_success`` and
``cron_lateness_seconds`` (see ``beat.score_cron_run``).

Open runs live in :class:`RunRegistry`, keyed by task id and bounded in size; nothing
is stored on task objects. Messages that never run (revoked, unknown, rejected) are
recorded as a short observation in the consumer process, so their trace shows why; so
are runs whose pool process died (SIGKILL, out of memory, hard time limit), since their
own observation died with that process. A message delivered again after its run was
lost (``acks_late``) is recorded when the main process receives it again, and its new
run says which attempt it is (``on_task_received``).

A celery-batches run (one run for many messages) is one run observation in a trace of
its own; when it ends, each message's trace gets an observation naming it.

Runs store their trace id (and URL) on ``task.request`` for the task's own use.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

from celery import states
from celery.exceptions import TimeLimitExceeded, WorkerLostError
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace

from . import _policy, beat, client, headers, trace_logs
from .config import TracingConfig
from .logs import warn_rate_limited
from .payload import describe_exception

if TYPE_CHECKING:
    from langfuse.types import SpanLevel

log = logging.getLogger(__name__)


@dataclass  # not frozen: made for every run, and a frozen one costs a setattr per field
class Start:
    """What ``task_prerun`` received for one run, read once."""

    task_id: str
    task_name: str
    request: Any
    args: Any
    kwargs: Any
    extracted: headers.Extracted
    #: Whether the task's input and output may be captured (name patterns, task option).
    captures: bool
    cron: Optional[beat.CronHealth] = None


@dataclass(frozen=True)
class SampledOut:
    """A run of a sampled-out trace, kept in case it fails: references and a start time.

    Capturing its input waits for the failure, so a run that succeeds costs nothing
    more than these few fields.
    """

    start: Start
    trace_id: str
    started_at: float
    started_ns: int


class RunScope:
    """What a run made current or opened, undone in reverse order when it closes.

    A lean ``ExitStack``: a run usually attaches one context and ends one observation,
    and ``ExitStack``'s wrappers cost more than those two steps. Every step is undone
    even if one fails; the first failure is raised at the end.
    """

    __slots__ = ("_steps",)

    def __init__(self) -> None:
        self._steps: list[tuple[Callable[[Any], Any], Any]] = []

    def attach(self, ctx: otel_context.Context) -> None:
        """Make ``ctx`` current until the run closes."""
        self._steps.append((otel_context.detach, otel_context.attach(ctx)))

    def enter(self, manager: AbstractContextManager[Any]) -> None:
        manager.__enter__()
        self._steps.append((_exit, manager))

    def callback(self, undo: Callable[[Any], Any], argument: Any) -> None:
        """Call ``undo(argument)`` when the run closes."""
        self._steps.append((undo, argument))

    def close(self) -> None:
        steps = self._steps
        error: Optional[BaseException] = None
        while steps:
            undo, argument = steps.pop()
            try:
                undo(argument)
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error


def _exit(manager: AbstractContextManager[Any]) -> None:
    manager.__exit__(None, None, None)


@dataclass
class Run:
    """One task execution being traced in this process."""

    #: The run's observation; None when the run records nothing (unless it fails).
    observation: Any  # a client.Observation
    scope: RunScope
    traceback: Optional[str] = None
    trace_id: Optional[str] = None
    captures: bool = True
    #: Set for a run of a sampled-out trace whose failure would be kept.
    sampled_out: Optional[SampledOut] = None
    cron: Optional[beat.CronHealth] = None
    #: Set for a celery-batches run: the messages it processes, and when it began.
    batch: Optional[Batch] = None

    def score_cron(self, *, success: Optional[bool], comment: Optional[str] = None) -> None:
        """Record the cron health scores, if beat started this run and it is traced:
        recorded, or (a failure) kept from a sampled-out trace. A score on a trace
        Langfuse never receives would make an empty trace of it."""
        if self.cron is None or self.trace_id is None:
            return
        if self.observation is not None or (self.sampled_out is not None and success is False):
            self.cron.score(self.trace_id, success=success, comment=comment)


class Batch(NamedTuple):
    """A celery-batches run: one task run for many messages (``SimpleRequest``)."""

    requests: list[Any]
    started_ns: int


class LostRun(NamedTuple):
    """A run the main worker process recorded as lost (its pool process died)."""

    attempt: int
    observation_id: Optional[str]
    #: Set once the message was delivered to this process again.
    redelivered: bool = False


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


def message_headers(source: Any) -> Mapping[str, Any]:
    """The message headers of whatever a Celery signal hands over: a task's request
    (``task.request``, a ``Context``), the worker's ``Request`` of a message (its
    ``request_dict``), a kombu ``Message``, or the headers themselves. The one way this
    module reads headers.

    A real worker delivers custom message headers both as ``request.headers`` and as
    request attributes; eager runs only in ``request.headers``. When ``request.headers``
    carries this library's ids it is what the producer wrote and is read as it is (the
    usual case, on every task); otherwise reads try both. Header names are not
    identifiers ("x-langfuse-trace-id"), so as request attributes they can only be
    entries of the instance dict: reading that dict avoids an AttributeError for every
    header a message does not carry.
    """
    if type(source) is dict:
        return source
    carried = getattr(source, "request_dict", None)  # a worker Request: the message's
    if type(carried) is dict:
        return carried
    delivered = _custom_headers(source)
    if headers.TRACE_ID in delivered or headers.TRACEPARENT in delivered:
        return delivered
    attributes: Mapping[str, Any] = getattr(source, "__dict__", None) or {}
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
        #: Task ids whose lost run the main process recorded: Celery may report one
        #: loss twice (a hard time limit: by its timeout handler, then by the pool).
        self._recorded_losses: OrderedDict[str, LostRun] = OrderedDict()
        secret = config.producer_secret
        self._producer_key = secret.encode() if secret else None
        #: Runs tell ``task.request`` their trace id (and URL, with ``project_id``).
        self._request_ids = config.log_trace_ids
        self._trace_url_prefix = trace_logs.trace_url_prefix(config.project_id)
        self._trace_counts = _policy.trace_guard.counts

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
            warn_rate_limited(
                log, "prerun", "celery-langfuse: could not start tracing task %s", task_id
            )

    def on_task_failure(
        self,
        sender: Any = None,
        task_id: Optional[str] = None,
        exception: Any = None,
        einfo: Any = None,
        **_: Any,
    ) -> None:
        run = self.runs.peek(task_id) if task_id else None
        if run is None and isinstance(exception, _PROCESS_DIED) and task_id:
            # Sent in the main worker process: the pool child that ran the task was
            # killed (SIGKILL, OOM, hard time limit) and its open run died with it.
            attempt = self._first_report_of_loss(task_id)
            if attempt is None:
                return
            extra: dict[str, Any] = {"attempt": attempt}
            if getattr(sender, "acks_late", False) and getattr(
                sender, "reject_on_worker_lost", False
            ):
                extra["will_be_redelivered"] = True
            lost = self._record_unrun(
                getattr(sender, "name", None) or "task",
                _request_headers(sender, task_id),
                task_id,
                "ERROR",
                f"the process running it died: {describe_exception(exception)}",
                extra,
            )
            self._recorded_losses[task_id] = LostRun(attempt, lost.id if lost else None)
            return
        if run is None or einfo is None:
            return
        if run.observation is not None or run.sampled_out is not None:
            traceback = str(getattr(einfo, "traceback", "") or "")
            run.traceback = traceback[-self.config.max_payload_chars :]

    def _first_report_of_loss(self, task_id: str) -> Optional[int]:
        """The attempt number of a lost run on its first report; None for a repeated
        report of the same loss (Celery reports a hard time limit twice)."""
        losses = self._recorded_losses
        known = losses.get(task_id)
        if known is not None and not known.redelivered:
            return None
        attempt = 1 if known is None else known.attempt + 1
        losses[task_id] = LostRun(attempt, None)
        losses.move_to_end(task_id)
        if len(losses) > _REMEMBERED_LOSSES:
            losses.popitem(last=False)
        return attempt

    def on_task_received(self, request: Any = None, **_: Any) -> None:
        """``task_received``, in the main worker process: a message delivered again
        (``acks_late`` with ``task_reject_on_worker_lost``, or a worker that died with it
        unacknowledged). Celery reports no failure when it requeues a lost run, so the
        earlier delivery is recorded here, unless this process already recorded it as
        lost; the request then tells the pool process the new run's attempt number and
        that observation, which the new run records (``_previous_attempt``)."""
        delivery_info = getattr(request, "delivery_info", None)
        if not delivery_info or not delivery_info.get("redelivered"):
            return
        try:
            self._note_redelivery(request)
        except Exception:
            warn_rate_limited(
                log, "redelivery", "celery-langfuse: could not record a redelivered task"
            )

    def _note_redelivery(self, request: Any) -> None:
        task_id = request.id
        # The worker Request's request_dict itself: the redelivery mark written into it
        # below is what the run reads.
        carried = message_headers(request)
        losses = self._recorded_losses
        known = losses.get(task_id)
        if known is not None and not known.redelivered and known.observation_id:
            earlier = known  # recorded as lost by this process (task_failure)
        else:
            attempt = 1 if known is None else known.attempt + 1
            recorded = self._record_unrun(
                request.name,
                carried,
                task_id,
                "WARNING",
                "an earlier delivery did not finish: its pool process died (or its worker "
                "stopped before running it); the message was delivered again",
                {"attempt": attempt, "redelivered": True},
            )
            earlier = LostRun(attempt, recorded.id if recorded is not None else None)
        losses[task_id] = earlier._replace(redelivered=True)
        losses.move_to_end(task_id)
        if len(losses) > _REMEMBERED_LOSSES:
            losses.popitem(last=False)
        if type(carried) is dict:
            carried[headers.REDELIVERY] = headers.redelivery_value(
                earlier.attempt + 1, earlier.observation_id
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
            if run.batch is not None:
                self._record_batched_messages(run, run.batch, state)
            if run.observation is not None:
                _record_outcome(run, state, retval, self.config)
            elif run.sampled_out is not None and state == states.FAILURE:
                self._record_kept_failure(run, run.sampled_out, retval, describe_exception(retval))
            if run.cron is not None:
                run.score_cron(
                    success=_CRON_SUCCESS_BY_STATE.get(state or ""),
                    comment=None
                    if state == states.SUCCESS
                    else self.config.payload.text(describe_exception(retval)),
                )
        except Exception:
            warn_rate_limited(
                log, "postrun", "celery-langfuse: could not record the outcome of task %s", task_id
            )
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
            if run.observation is not None:
                run.observation.update(
                    level="ERROR", status_message=self.config.payload.text(status)
                )
            elif run.sampled_out is not None:
                self._record_kept_failure(run, run.sampled_out, exception, status)
            run.score_cron(success=False, comment=self.config.payload.text(status))
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
            message_headers(request),
            getattr(request, "id", None),
            "WARNING",
            status,
        )

    def on_task_unknown(
        self, name: Optional[str] = None, id: Optional[str] = None, message: Any = None, **_: Any
    ) -> None:
        self._record_unrun(
            name or "task",
            message_headers(message),
            id,
            "ERROR",
            f"unknown task {name!r}: no worker registered it",
        )

    def on_task_rejected(self, message: Any = None, exc: Any = None, **_: Any) -> None:
        found = message_headers(message)
        name = found.get("task") if isinstance(found.get("task"), str) else None
        self._record_unrun(
            name or "task",
            found,
            found.get("id"),
            "ERROR",
            f"message rejected: {describe_exception(exc)}",
        )

    # -- internals ------------------------------------------------------------------

    def _open_run(self, task_id: str, task: Any, args: Any, kwargs: Any) -> None:
        request = task.request
        rules = self.config.policy.rules(task.name)
        extracted = _extract(message_headers(request), task_id, self._producer_key)
        start = Start(
            task_id=task_id,
            task_name=task.name,
            request=request,
            args=args,
            kwargs=kwargs,
            extracted=extracted,
            captures=rules.capture and getattr(task, "langfuse_capture", True) is not False,
            cron=None if extracted.cron is None else beat.cron_health(extracted, task_id, request),
        )
        batch = None
        if _BATCH_TASK_TYPES.get(type(task)) is not False:  # a dict lookup, no call
            batch = _batch_of(task, args)
            if batch is not None:
                start.args = [_describe_batched(request) for request in batch.requests]
        scope = RunScope()
        try:
            run = self._start(start, rules.traced, scope)
            run.cron = start.cron
            if batch is not None:
                run.batch = batch
                if run.observation is not None:
                    run.observation.update(metadata=_batch_metadata(batch))
        except BaseException:
            scope.close()
            raise
        if self._request_ids:
            # Attribute stores and an f-string: no calls on the hot path.
            request.langfuse_trace_id = run.trace_id
            prefix = self._trace_url_prefix
            request.langfuse_trace_url = (
                f"{prefix}{run.trace_id}"
                if prefix and run.trace_id
                and (run.observation is not None or run.sampled_out is not None)
                else None
            )
        for stale in self.runs.push(task_id, run):
            warn_rate_limited(
                log, "evicted", "celery-langfuse: more than %d runs open; closing the oldest",
                self.config.max_open_runs,
            )
            if stale.observation is not None:
                stale.observation.update(level="WARNING", status_message="run was never closed")
                stale.observation.end()

    def _start(self, start: Start, traced: bool, scope: RunScope) -> Run:
        """Continue (or start) the run's trace in ``scope``; record it if sampled."""
        parent = start.extracted.parent
        attributes = start.extracted.attributes
        # The producer's context is made and attached only if something below needs it
        # current: a recorded run is started under the remote parent directly and
        # attaches its own observation's context instead.
        remote = parent
        linked = False
        if parent is not None:
            trace_id: Optional[str] = parent.trace_id
            sampled = parent.sampled
        elif start.extracted.link_trace_id is not None:
            # A linked trace (fan-out): the publisher, whose trace is kept, chose its id.
            trace_id, sampled, linked = start.extracted.link_trace_id, True, True
        else:
            current = otel_trace.get_current_span().get_span_context()
            # An eager run inside the caller's observation continues its trace.
            trace_id = format(current.trace_id, "032x") if current.is_valid else None
            sampled = current.trace_flags.sampled
        new_trace = traced and (trace_id is None or linked)
        if linked and new_trace:
            attributes = replace(attributes, trace_name=attributes.trace_name or start.task_name)
        elif new_trace:
            # The run starts a trace: its id is drawn first so the decision is made from
            # it. A kept trace is named after the task unless the producer named it (a
            # sampled-out one skips that cost: a failure kept from it is its root anyway).
            trace_id = _policy.new_trace_id()
            sampled = self.config.policy.sample_new_trace(
                trace_id, start.task_name, start.args or (), start.kwargs or {},
                _custom_headers(start.request),
            )
            if sampled:
                attributes = replace(
                    attributes, trace_name=attributes.trace_name or start.task_name
                )
        if attributes:
            if remote is not None:
                scope.attach(remote.context())
                remote = None
            scope.enter(client.propagated(attributes))
        if traced and trace_id is not None and sampled:
            ctx = otel_context.get_current()
            observation = client.start_observation(
                start.task_name,
                context=ctx,
                parent=remote,  # None: a child of the current span
                input=self._capture_input(start) if self.config.capture_input else None,
                metadata=_run_metadata(
                    start.task_id, start.request, start.extracted.published_at, start.cron
                ),
                root_of=trace_id if new_trace else None,
                # A linked trace's root links to the caller's publish observation.
                link=start.extracted.linked_from,
            )
            scope.callback(client.Observation.end, observation)
            scope.attach(client.context_with(observation, ctx, trace_id))
            # Counted for max_trace_observations (_policy.TraceSizeGuard), inline: a
            # dictionary update and a bound, no call on the hot path.
            counts = self._trace_counts
            counts[trace_id] = counts.get(trace_id, 0) + 1
            if len(counts) > _policy.MAX_COUNTED_TRACES:
                del counts[next(iter(counts))]
            return Run(observation, scope, trace_id=trace_id, captures=start.captures)
        if remote is not None:
            scope.attach(remote.context())
        if not traced or trace_id is None:
            # Nothing recorded; whatever is current stays so, for the tasks it publishes.
            return Run(None, scope, trace_id=trace_id)
        if new_trace:
            # The run's own span id, never recorded: nested tasks name it as parent.
            unsampled = headers.TraceParent(trace_id, _policy.new_span_id(), sampled=False)
            scope.attach(unsampled.context())
        if not self.config.keep_failures:
            return Run(None, scope, trace_id=trace_id)
        kept = SampledOut(start, trace_id, time.time(), time.time_ns())
        return Run(None, scope, trace_id=trace_id, sampled_out=kept)

    def _record_batched_messages(self, run: Run, batch: Batch, state: Optional[str]) -> None:
        """celery-batches: each message's own trace gets an observation, named after its
        task and continued from its headers as its run would have been, saying which
        batch run processed it (and, if the batch failed, that it failed)."""
        failed = state == states.FAILURE
        recorded = run.observation
        named: dict[str, Any] = {}
        if recorded is not None:
            named = {"batch_trace_id": recorded.trace_id, "batch_observation_id": recorded.id}
            if self._trace_url_prefix:
                named["batch_trace_url"] = f"{self._trace_url_prefix}{recorded.trace_id}"
        status = "the batch run that processed it failed" if failed else None
        for request in batch.requests:
            try:
                name = getattr(request, "name", None) or "task"
                if not self.config.policy.traces_task(name):
                    continue
                carried = message_headers(request)
                fields: dict[str, Any] = {
                    "name": name,
                    "level": "ERROR" if failed else None,
                    "status_message": status,
                    "start_time_ns": batch.started_ns,
                    "metadata": {
                        "task_id": getattr(request, "id", None),
                        "hostname": _HOSTNAME,
                        "processed_in_batch": True,
                        **named,
                    },
                }
                self._record_unrun_observation(
                    _extract(carried, fields["metadata"]["task_id"], self._producer_key),
                    name,
                    fields,
                    "ERROR" if failed else "DEFAULT",
                )
            except Exception:
                warn_rate_limited(
                    log, "batch", "celery-langfuse: could not record a batched message"
                )

    def _record_kept_failure(self, run: Run, kept: SampledOut, error: Any, status: str) -> None:
        """Record a failed run of a sampled-out trace as the root of its trace."""
        start = kept.start
        metadata = _run_metadata(
            start.task_id,
            start.request,
            start.extracted.published_at,
            start.cron,
            now=kept.started_at,
        )
        metadata.update(_failure_metadata(error, run.traceback, self.config))
        metadata["trace_sampled"] = False
        parent = start.extracted.parent
        if parent is not None:
            metadata["parent_observation_id"] = parent.parent_id
        with client.root_observation(
            kept.trace_id,
            name=start.task_name,
            start_time_ns=kept.started_ns,
            input=self._capture_input(start) if self.config.capture_input else None,
            metadata=metadata,
            level="ERROR",
            status_message=self.config.payload.text(status),
        ):
            pass

    def _capture_input(self, start: Start) -> Any:
        if not start.captures:
            return None
        capture = self.config.payload
        return {
            "args": capture(list(start.args or ())),
            "kwargs": capture(dict(start.kwargs or {})),
        }

    def _record_unrun(
        self,
        task_name: str,
        carried: Mapping[str, Any],
        task_id: Any,
        level: SpanLevel,
        status: str,
        extra_metadata: Optional[dict[str, Any]] = None,
    ) -> Optional[client.Observation]:
        """Record a message that never ran (or whose run died with its process); the
        observation, if one was recorded."""
        try:
            if not self.config.policy.traces_task(task_name):
                return None
            extracted = _extract(carried, task_id, self._producer_key)
            fields: dict[str, Any] = {
                "name": task_name,
                "level": level,
                "status_message": self.config.payload.text(status),
                "metadata": {"task_id": task_id, "hostname": _HOSTNAME, **(extra_metadata or {})},
            }
            recorded = self._record_unrun_observation(extracted, task_name, fields, level)
            if recorded is not None and extracted.cron is not None:
                cron = beat.CronHealth(
                    extracted.cron.entry, task_id, None, extracted.attributes.environment
                )
                cron.score(recorded.trace_id, success=False, comment=fields["status_message"])
            return recorded
        except Exception:
            warn_rate_limited(
                log, "unrun", "celery-langfuse: could not record %s task %s", status, task_id
            )
            return None

    def _record_unrun_observation(
        self, extracted: headers.Extracted, task_name: str, fields: dict[str, Any], level: str
    ) -> Optional[client.Observation]:
        """Record a message that never ran; its observation, if recorded."""
        parent = extracted.parent
        with client.propagated(extracted.attributes):
            if parent is not None and parent.sampled:
                observation = client.start_observation(context=parent.context(), **fields)
                observation.end()
                return observation
            if parent is not None:
                trace_id, sampled = parent.trace_id, False
            elif extracted.link_trace_id is not None:
                # The linked trace its publish observation names (kept, as the caller's).
                trace_id, sampled = extracted.link_trace_id, True
            else:
                trace_id = _policy.new_trace_id()
                sampled = self.config.policy.sample_new_trace(trace_id, task_name)
            if not sampled and not (level == "ERROR" and self.config.keep_failures):
                return None
            if not sampled:
                fields["metadata"]["trace_sampled"] = False
            with client.root_observation(
                trace_id, link=extracted.linked_from, **fields
            ) as observation:
                pass
            return observation


_HOSTNAME = socket.gethostname()
_PROCESS_DIED = (WorkerLostError, TimeLimitExceeded)
_REMEMBERED_LOSSES = 1024


def _extract(
    carried: Mapping[str, Any], task_id: Any, producer_key: Optional[bytes]
) -> headers.Extracted:
    # With a producer secret, a message not signed with it keeps its run and its W3C
    # parent but not its trace attributes or Langfuse parent (headers.extract).
    trusted = producer_key is None or headers.signed_by(carried, producer_key)
    extracted = headers.extract(carried, trusted=trusted)
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


#: The cron_success score of a run's final state; a retry is not final, and a task
#: that ignored itself (or was replaced) reports nothing.
_CRON_SUCCESS_BY_STATE = {states.SUCCESS: True, states.FAILURE: False, states.REJECTED: False}


def _run_metadata(
    task_id: str,
    request: Any,
    published_at: Optional[float],
    cron: Optional[beat.CronHealth],
    now: Optional[float] = None,
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
    if delivery_info.get("redelivered"):
        metadata["redelivered"] = True
        metadata.update(_previous_attempt(request))
    if published_at is not None:
        started = time.time() if now is None else now
        metadata["queue_wait_seconds"] = round(max(started - published_at, 0.0), 6)
    if cron is not None:
        metadata["cron_entry"] = cron.entry
        if cron.lateness_seconds is not None:
            metadata["cron_lateness_seconds"] = round(cron.lateness_seconds, 3)
    return metadata


def _record_outcome(run: Run, state: Optional[str], retval: Any, config: TracingConfig) -> None:
    observation = run.observation
    if state == states.SUCCESS:
        if config.capture_output and run.captures:
            output = config.payload(retval)
            if output is not None:  # None leaves the output unset
                observation.update(output=output)
    elif state == states.FAILURE:
        observation.update(
            level="ERROR",
            status_message=config.payload.text(describe_exception(retval)),
            metadata=_failure_metadata(retval, run.traceback, config),
        )
    elif state == states.RETRY:
        observation.update(
            level="WARNING", status_message=config.payload.text(f"retry: {_describe_retry(retval)}")
        )
    elif state == states.REJECTED:
        status = f"rejected: {describe_exception(retval)}"
        observation.update(level="WARNING", status_message=config.payload.text(status))
    elif state == states.IGNORED:
        observation.update(status_message="ignored")
    elif state is None:
        interrupted = sys.exc_info()[1]
        if interrupted is not None:
            observation.update(level="ERROR", status_message=_describe_interruption(interrupted))


#: Task classes (keyed by type) that are, or are not, celery-batches ``Batches`` tasks.
_BATCH_TASK_TYPES: dict[type, bool] = {}
_MAX_BATCH_IDS = 50


def _batch_of(task: Any, args: Any) -> Optional[Batch]:
    """The messages of a celery-batches run (its one argument, a list of
    ``SimpleRequest``), or None for any other task. celery-batches is recognised by
    class name and module, so it is never imported here."""
    kind = type(task)
    is_batch = _BATCH_TASK_TYPES.get(kind)
    if is_batch is None:
        is_batch = any(
            c.__name__ == "Batches" and c.__module__.startswith("celery_batches")
            for c in kind.__mro__
        )
        _BATCH_TASK_TYPES[kind] = is_batch
    if not is_batch or not args or not isinstance(args[0], list):
        return None
    return Batch(args[0], time.time_ns())


def _describe_batched(request: Any) -> dict[str, Any]:
    """What the batch run's input shows of one message."""
    return {
        "task_id": getattr(request, "id", None),
        "args": getattr(request, "args", None),
        "kwargs": getattr(request, "kwargs", None),
    }


def _batch_metadata(batch: Batch) -> dict[str, Any]:
    ids = [getattr(request, "id", None) for request in batch.requests[:_MAX_BATCH_IDS]]
    return {"batch_size": len(batch.requests), "batch_task_ids": ids}


def _previous_attempt(request: Any) -> dict[str, Any]:
    """What the main worker process said about the lost run a redelivered run repeats
    (see ``WorkerTracing.on_task_received``): nothing when another worker recorded it."""
    raw = _custom_headers(request).get(headers.REDELIVERY)
    if raw is None:
        raw = (getattr(request, "__dict__", None) or {}).get(headers.REDELIVERY)
    parsed = headers.read_redelivery(raw)
    if parsed is None:
        return {}
    attempt, lost_observation_id = parsed
    recorded: dict[str, Any] = {"attempt": attempt}
    if lost_observation_id:
        recorded["lost_run_observation_id"] = lost_observation_id
    return recorded


def _pool_terminated_this_process() -> bool:
    """Whether billiard's terminate handler has fired in this process (billiard >= 4.2
    has ``terminate_handler_fired``; older ones cannot say)."""
    try:
        from billiard.common import terminate_handler_fired
    except ImportError:
        return False
    return bool(terminate_handler_fired())


def _describe_interruption(error: BaseException) -> str:
    """A run unwound by SystemExit or KeyboardInterrupt, which Celery does not record as
    a task outcome: in a prefork child, billiard raises SystemExit from its SIGTERM
    handler when the main process terminates the child (a hard time limit, a cold
    shutdown); the child then exits through its normal path, which flushes."""
    if isinstance(error, SystemExit) and _pool_terminated_this_process():
        return (
            "terminated while running: the worker ended its pool process "
            "(hard time limit or cold shutdown)"
        )
    return f"interrupted: {describe_exception(error)}"


def _failure_metadata(
    error: Any, traceback: Optional[str], config: TracingConfig
) -> dict[str, Any]:
    metadata = {"exception_type": type(error).__name__}
    if traceback:
        metadata["traceback"] = config.payload.text(traceback)
    return metadata


def _custom_headers(request: Any) -> Mapping[str, Any]:
    custom = getattr(request, "headers", None)
    # type() first: an ABC isinstance check is several Python calls, on every task
    return custom if type(custom) is dict or isinstance(custom, Mapping) else {}


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


def _request_headers(task: Any, task_id: str) -> Mapping[str, Any]:
    # For a lost worker Celery puts the failed request on the task's request stack
    # while it sends task_failure; for a hard time limit it does not, and the run is
    # recorded in a trace of its own.
    request = getattr(task, "request", None)
    if getattr(request, "id", None) == task_id:
        return message_headers(request)
    return {}
