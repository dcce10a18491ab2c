"""Cron layer: every run of a beat schedule entry is its own root trace.

Beat marks its messages only with a ``celery_beat_task`` header; which schedule entry
sent them is known only inside the scheduler. Every scheduler hands a due entry to its
``apply_async(entry, ...)`` method: Celery's own ``Scheduler`` (and so
``PersistentScheduler`` and django-celery-beat's ``DatabaseScheduler``) from
``apply_entry``, celery-redbeat straight from its ``tick``. So on ``beat_init`` (sent by
standalone and embedded beat alike) that method is wrapped on the scheduler instance:
the library's only patch, undone by ``uninstall``.

Each run starts a trace, sampled by the rule of a task that starts one (the entry's
task names it for ``task_sample_rates`` and the ``sampler``). A sampled-out run
records nothing and its message says so (W3C sampled flag, ``x-langfuse-sampled: 0``),
so the worker records the run only if it fails (``keep_failures``), as the root of the
trace; a send that fails is recorded by beat the same way.

Around each send the wrapper opens the run's root observation ``cron <entry>`` as the
current span, in a fresh context so it is never a child of anything, with the trace
named after the entry and tagged ``celery-beat``. The publish handler then records its
``publish <task>`` child and writes the entry and due time onto the message, from which
the worker scores the run's health (:class:`CronHealth`, :func:`score_cron_run`).

All of cron lives here, as Sentry keeps it in one module: the scheduler wrap and each
run's root (beat side), the run being sent (:func:`sending_cron_run`, read by the
publish handler), what a run reports when it ends (:class:`CronHealth`, built by
:func:`cron_health` from the message's cron headers; worker side) and the scores
(:func:`score_cron_run`, both sides). The wire format of the cron headers is
``headers.CronRun``.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, NamedTuple, Optional

from celery import Celery
from celery.schedules import crontab, solar
from celery.schedules import schedule as interval
from celery.utils.time import humanize_seconds
from opentelemetry import context as otel_context

from . import _policy, _sdk, client, headers
from .config import TracingConfig
from .headers import CronRun, TraceAttributes, TraceParent
from .logs import warn_rate_limited
from .payload import describe_exception

log = logging.getLogger(__name__)

BEAT_TAG = "celery-beat"
_HOSTNAME = socket.gethostname()


# -- cron runs -----------------------------------------------------------------------
#
# The beat layer opens a cron run's root observation around the scheduler's send; the
# publish handler reads the run from the context to put it on the message.

_CRON_RUN_KEY = otel_context.create_key("celery-langfuse.cron-run")

#: Whether the installed SDK's ``create_score`` takes ``environment=`` (4.12+).
_SCORE_TAKES_ENVIRONMENT = _sdk.installed().score_takes_environment
#: Score names, one place for the worker and the beat process.
CRON_SUCCESS_SCORE = "cron_success"
CRON_LATENESS_SCORE = "cron_lateness_seconds"


def current_cron_run(ctx: Optional[otel_context.Context] = None) -> Optional[CronRun]:
    """The cron run whose message is being sent in ``ctx`` (default: the current
    context), if any."""
    run = otel_context.get_value(_CRON_RUN_KEY, ctx)
    return run if isinstance(run, CronRun) else None


@contextmanager
def sending_cron_run(run: CronRun) -> Iterator[None]:
    """Mark everything published inside as the message of this cron run."""
    token = otel_context.attach(otel_context.set_value(_CRON_RUN_KEY, run))
    try:
        yield
    finally:
        otel_context.detach(token)


def score_cron_run(
    trace_id: str,
    *,
    success: Optional[bool] = None,
    lateness_seconds: Optional[float] = None,
    comment: Optional[str] = None,
    metadata: Optional[dict[str, Any]] = None,
    environment: Optional[str] = None,
) -> None:
    """Record the cron health scores of one run on its trace; None means "not known"."""
    langfuse_client = client.get_langfuse()
    # `environment=` arrived in SDK 4.12; before, a score takes the client's.
    where: dict[str, Any] = {"environment": environment} if _SCORE_TAKES_ENVIRONMENT else {}
    # Lateness first: scores leave in order, so whoever sees cron_success has both.
    if lateness_seconds is not None:
        langfuse_client.create_score(
            name=CRON_LATENESS_SCORE,
            value=round(lateness_seconds, 3),
            trace_id=trace_id,
            data_type="NUMERIC",
            metadata=metadata,
            **where,
        )
    if success is not None:
        langfuse_client.create_score(
            name=CRON_SUCCESS_SCORE,
            value=1.0 if success else 0.0,
            trace_id=trace_id,
            data_type="NUMERIC",
            comment=comment,
            metadata=metadata,
            **where,
        )


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
        score_cron_run(
            trace_id,
            success=success,
            lateness_seconds=self.lateness_seconds,
            comment=comment,
            metadata={"cron_entry": self.entry, "task_id": self.task_id},
            environment=self.environment,
        )



def cron_health(extracted: headers.Extracted, task_id: str, request: Any) -> CronHealth:
    """The health a run that celery beat sent reports (``extracted.cron`` is set)."""
    cron = extracted.cron
    assert cron is not None  # the caller checks: most runs are not cron runs
    lateness = None
    if cron.due_at is not None and not getattr(request, "retries", 0):
        lateness = max(time.time() - cron.due_at, 0.0)
    return CronHealth(cron.entry, task_id, lateness, extracted.attributes.environment)


class BeatTracing:
    """The beat-side handler of one installation: wraps its app's scheduler.

    ``is_traced(task_name)`` (the configuration's ``traces_task``) decides whether an
    entry's runs are traced at all; an entry whose task it rejects is sent exactly as
    without this library.
    """

    def __init__(self, app: Celery, config: TracingConfig) -> None:
        self.app = app
        self.config = config
        self.is_traced: Callable[[str], bool] = config.traces_task
        self._schedulers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._sending_each_run: weakref.WeakSet[Any] = weakref.WeakSet()

    def on_beat_init(self, sender: Any = None, **_: Any) -> None:
        """``beat_init``: ``sender`` is the beat service, standalone or embedded."""
        try:
            scheduler = sender.scheduler
            if scheduler.app is self.app:
                self.wrap(scheduler)
                # Built now rather than on the first due entry, which it would delay.
                client.get_langfuse()
        except Exception:
            warn_rate_limited(log, "beat-init", "celery-langfuse: could not trace celery beat")

    def on_beat_embedded_init(self, sender: Any = None, **_: Any) -> None:
        """``beat_embedded_init`` (``celery worker -B``), sent after ``beat_init``.

        The worker ends its beat child with SIGTERM; billiard's handler turns it into
        ``SystemExit``, beat stops, and the child leaves through ``os._exit`` after
        running billiard's exit finalizers but no ``atexit`` hook. So the exit flush
        is registered as such a finalizer, and this beat also sends each run's
        observations as soon as the run is sent (a child whose worker was killed
        never gets its SIGTERM). A standalone beat does neither: its ``atexit``
        flush covers it, and with Langfuse unreachable the extra export attempts
        cost it measurable jitter (see benchmarks/beat_jitter.py).
        """
        self.on_beat_init(sender)
        try:
            if sender.scheduler in self._schedulers:
                self._sending_each_run.add(sender.scheduler)
                _flush_at_child_exit()
        except Exception:
            warn_rate_limited(log, "beat-init", "celery-langfuse: could not trace celery beat")

    def wrap(self, scheduler: Any) -> None:
        """Trace every entry ``scheduler`` sends. Idempotent."""
        if _wrapped(scheduler) is not None:
            return
        send = scheduler.apply_async

        @functools.wraps(send)
        def apply_async(entry: Any, *args: Any, **kwargs: Any) -> Any:
            with self._cron_run(scheduler, entry):
                return send(entry, *args, **kwargs)

        apply_async.__celery_langfuse_wraps__ = send  # type: ignore[attr-defined]
        scheduler.apply_async = apply_async
        self._schedulers.add(scheduler)

    def unwrap(self) -> None:
        """Give every wrapped scheduler its own ``apply_async`` back."""
        for scheduler in list(self._schedulers):
            if _wrapped(scheduler) is not None:
                del scheduler.apply_async
        self._schedulers.clear()
        self._sending_each_run.clear()

    @contextmanager
    def _cron_run(self, scheduler: Any, entry: Any) -> Iterator[None]:
        scope = ExitStack()
        run: Optional[_CronRoot] = None
        try:
            if self.is_traced(entry.task):
                run = self._open_root(scope, scheduler, entry)
        except Exception:
            scope.close()
            warn_rate_limited(
                log, "beat", "celery-langfuse: could not trace beat entry %r", entry.name
            )
        try:
            yield
        except Exception as exc:
            if run is not None:
                self._record_not_sent(run, entry.name, exc)
            raise
        except BaseException as exc:
            # Beat stopped (SIGTERM is SystemExit in beat) in the middle of this send:
            # the message may or may not have left, so the run is marked, not scored.
            if run is not None and run.root is not None:
                _mark_interrupted(run.root, exc)
            raise
        finally:
            if run is not None:
                _close(scope, send_now=scheduler in self._sending_each_run)

    def _open_root(self, scope: ExitStack, scheduler: Any, entry: Any) -> _CronRoot:
        sent_at = time.time()
        lateness = _lateness_seconds(entry)
        due_at = None if lateness is None else sent_at - lateness
        # The run starts a trace: its id is drawn first and the decision made from it,
        # by the rule of a task starting a trace (the entry's task names it).
        trace_id = _policy.new_trace_id()
        sampled = self.config.policy.sample_new_trace(
            trace_id, entry.task, entry.args or (), entry.kwargs or {}, {}, entry="beat"
        )
        # An empty context: the run's root is never a child of whatever is current.
        token = otel_context.attach(otel_context.Context())
        scope.callback(otel_context.detach, token)
        scope.enter_context(
            client.propagated(TraceAttributes(trace_name=entry.name, tags=(BEAT_TAG,)))
        )
        scope.enter_context(sending_cron_run(CronRun(entry.name, due_at)))
        metadata = {
            "cron_entry": entry.name,
            "task": entry.task,
            "schedule": describe_schedule(entry.schedule),
            "due_at": _iso(due_at),
            "sent_at": _iso(sent_at),
            "lateness_seconds": None if lateness is None else round(lateness, 3),
            # The entry still holds the count before this run.
            "run_count": (getattr(entry, "total_run_count", 0) or 0) + 1,
            "beat_host": _HOSTNAME,
            "scheduler": type(scheduler).__name__,
        }
        if not sampled:
            # Nothing recorded: the message carries the trace id with the sampled flag
            # off, so the worker records its run only if it fails (keep_failures).
            unsampled = TraceParent(trace_id, _policy.new_span_id(), sampled=False)
            scope.enter_context(client.attached(unsampled.context()))
            return _CronRoot(None, trace_id, time.time_ns(), metadata, self._capture_input(entry))
        root = client.start_observation(
            f"cron {entry.name}",
            input=self._capture_input(entry),
            metadata=metadata,
            root_of=trace_id,
        )
        scope.callback(client.Observation.end, root)
        scope.enter_context(client.attached(client.context_with(root, trace_id=trace_id)))
        return _CronRoot(root, trace_id, time.time_ns(), metadata, None)

    def _record_not_sent(self, run: _CronRoot, entry_name: str, exc: Exception) -> None:
        # The message never left, so no worker will score this run: beat does. In a
        # sampled-out trace this failure is recorded after all, as its root.
        try:
            status = self.config.payload.text(f"not sent: {describe_exception(exc)}")
            if run.root is not None:
                run.root.update(level="ERROR", status_message=status)
            elif self.config.keep_failures:
                with client.root_observation(
                    run.trace_id,
                    name=f"cron {entry_name}",
                    start_time_ns=run.started_ns,
                    input=run.input,
                    metadata={**run.metadata, "trace_sampled": False},
                    level="ERROR",
                    status_message=status,
                ):
                    pass
            else:
                return
            score_cron_run(
                run.trace_id, success=False, comment=status, metadata={"cron_entry": entry_name}
            )
        except Exception:
            warn_rate_limited(log, "beat-failed", "celery-langfuse: could not record a failed send")

    def _capture_input(self, entry: Any) -> Any:
        """The entry's arguments by the capture policy of a run of its task (size
        limit, ``redact_keys``, ``mask``, ``capture_exclude_tasks``,
        ``langfuse_capture=False``), as the worker captures them."""
        if not self.config.capture_input:
            return None
        task = self.app.tasks.get(entry.task)
        if not self.config.policy.rules(entry.task).capture or (
            getattr(task, "langfuse_capture", True) is False
        ):
            return None
        payload = self.config.payload
        return {
            "args": payload(list(entry.args or ())),
            "kwargs": payload(dict(entry.kwargs or {})),
        }


class _CronRoot(NamedTuple):
    """One beat run being sent: its root observation (None in a sampled-out trace)
    and, for a failure kept from a sampled-out trace, what its record needs."""

    root: Optional[client.Observation]
    trace_id: str
    started_ns: int
    metadata: dict[str, Any]
    input: Any


def _mark_interrupted(root: client.Observation, exc: BaseException) -> None:
    try:
        root.update(
            level="WARNING",
            status_message=f"interrupted: beat stopped while sending ({type(exc).__name__})",
        )
    except Exception:
        warn_rate_limited(log, "beat-close", "celery-langfuse: could not close a beat run")


def _close(scope: ExitStack, *, send_now: bool) -> None:
    try:
        scope.close()
        if send_now:
            client.flush_in_background()
    except Exception:
        warn_rate_limited(log, "beat-close", "celery-langfuse: could not close a beat run")


_child_exit_flush: Optional[Any] = None


def _flush_at_child_exit() -> None:
    """Flush (bounded by ``exit_flush_timeout``) when this billiard child process
    exits, once per process: its registry is emptied at each fork."""
    global _child_exit_flush
    from billiard.util import Finalize

    if _child_exit_flush is None or not _child_exit_flush.still_active():
        # exitpriority: run among the finalizers at exit, before the lower ones.
        _child_exit_flush = Finalize(None, client.flush_at_exit, exitpriority=100)


def describe_schedule(schedule: Any) -> str:
    """A schedule as a person reads it: cron fields, an interval, or its repr."""
    if isinstance(schedule, crontab):
        fields = " ".join(
            str(field)
            for field in (
                schedule._orig_minute,
                schedule._orig_hour,
                schedule._orig_day_of_month,
                schedule._orig_month_of_year,
                schedule._orig_day_of_week,
            )
        )
        return f"crontab {fields} (m h dom mon dow, {schedule.tz})"
    if isinstance(schedule, interval):
        return str(humanize_seconds(schedule.seconds, prefix="every "))
    if isinstance(schedule, solar):
        return f"solar {schedule.event} at {schedule.lat}, {schedule.lon}"
    return repr(schedule)[:200]


def _lateness_seconds(entry: Any) -> Optional[float]:
    """Seconds since the entry's run was due, if its schedule can tell."""
    last_run_at = getattr(entry, "last_run_at", None)
    if last_run_at is None:  # never ran (celery-redbeat): due "now", nothing to measure
        return None
    try:
        remaining = entry.schedule.remaining_estimate(last_run_at)
    except Exception:  # custom schedules may not implement it
        log.debug("celery-langfuse: no due time for entry %r", entry.name, exc_info=True)
        return None
    if remaining is None:
        return None
    # Beat sends up to 10 ms early on purpose (Scheduler.adjust); that is not "late".
    return max(-float(remaining.total_seconds()), 0.0)


def _wrapped(scheduler: Any) -> Optional[Callable[..., Any]]:
    """The original ``apply_async`` if this library wrapped ``scheduler``'s."""
    own = vars(scheduler).get("apply_async")
    return getattr(own, "__celery_langfuse_wraps__", None)


def _iso(timestamp: Optional[float]) -> Optional[str]:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")
