"""Which tasks are traced, and which traces are kept: decided once, where a trace starts.

Head sampling is a deterministic function of the 32-hex trace id, OpenTelemetry's
``TraceIdRatioBased`` rule (the trace id's lower 64 bits below ``rate * 2**64``), so
the Langfuse SDK's own sampler at the same rate would agree with it. The decision is
made once, by whoever starts the trace, and travels with it as the W3C sampled flag:

- a task run with no incoming trace starts one: a trace id is drawn first, then
  :meth:`TaskPolicy.sample_new_trace` decides (a pattern's rate, the user's sampler,
  or the global rate);
- everything downstream (nested tasks, chains, retries, the user's own observations
  inside a run) follows the flag of its parent, so a trace is whole or absent;
- a web request or a beat run that starts a trace decides by the same rule
  (:func:`sample_entry`; beat with its own app's policy), naming itself as the web
  request's ``METHOD /path`` or the beat entry's task; a failure there is kept as in
  a worker;
- a trace someone else started (the user's own observation, an OTel producer, a
  caller's ``traceparent``) is never cut: its recorded parent's decision stands.

Task-name rules (exclusion, per-pattern rates, capture off by pattern) are fnmatch
patterns compiled once and resolved once per task name, so the per-task cost is a
dictionary lookup.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

from .logs import warn_rate_limited

# Named as before the module became private: logging configurations name it.
log = logging.getLogger("celery_langfuse.sampling")

_TRACE_ID_LIMIT = (1 << 64) - 1
_ids = RandomIdGenerator()
_MAX_CACHED_NAMES = 4096


def trace_id_sampled(trace_id: str, rate: float) -> bool:
    """Whether a trace with this 32-hex id is kept at ``rate`` (TraceIdRatioBased)."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    return int(trace_id[16:], 16) < round(rate * (_TRACE_ID_LIMIT + 1))


def new_trace_id() -> str:
    """A random 32-hex trace id, drawn before a new trace's sampling decision."""
    return format(_ids.generate_trace_id(), "032x")


def new_span_id() -> str:
    """A random 16-hex span id."""
    return format(_ids.generate_span_id(), "016x")


@dataclass(frozen=True)
class SamplingContext:
    """What a ``sampler`` callable sees for a task run that starts a new trace."""

    task_name: str
    args: Sequence[Any]
    kwargs: Mapping[str, Any]
    #: The message's custom headers (``task.request.headers``), or a web request's
    #: headers; read-only by contract.
    headers: Mapping[str, Any]
    #: Where the trace starts: ``"task"`` (a worker run; ``task_name`` is the task),
    #: ``"web"`` (``task_name`` is ``METHOD /path``) or ``"beat"`` (``task_name`` is
    #: the schedule entry's task).
    entry: str = "task"


#: ``sampler(context)``: a rate from 0 to 1 applied to the trace id, or True/False.
Sampler = Callable[[SamplingContext], Union[float, bool]]


@dataclass(frozen=True)
class TaskRules:
    """The name-based rules of one task, resolved once per task name."""

    traced: bool
    #: The rate of the first ``task_sample_rates`` pattern that matches, if any.
    sample_rate: Optional[float]
    capture: bool
    #: Published inside a trace, the task starts a linked trace (``linked_trace_tasks``).
    linked: bool = False


class TaskPolicy:
    """Task-name rules and the sampling decision for new traces, compiled at install."""

    def __init__(
        self,
        *,
        exclude_tasks: Sequence[str],
        task_sample_rates: Mapping[str, float],
        capture_exclude_tasks: Sequence[str],
        sample_rate: float,
        sampler: Optional[Sampler],
        keep_failures: bool,
        linked_trace_tasks: Sequence[str] = (),
    ) -> None:
        self.sample_rate = sample_rate
        self.sampler = sampler
        self.keep_failures = keep_failures
        self._excluded = _compile_any(exclude_tasks)
        self._capture_excluded = _compile_any(capture_exclude_tasks)
        self._linked = _compile_any(linked_trace_tasks)
        self._rates = [
            (_compile_any([pattern]), rate) for pattern, rate in task_sample_rates.items()
        ]
        self._cache: dict[str, TaskRules] = {}

    def rules(self, task_name: str) -> TaskRules:
        """The rules for ``task_name``: a dictionary lookup after the first call."""
        rules = self._cache.get(task_name)
        if rules is None:
            rules = self._resolve(task_name)
            if len(self._cache) < _MAX_CACHED_NAMES:  # names sent by send_task are unbounded
                self._cache[task_name] = rules
        return rules

    def traces_task(self, task_name: str) -> bool:
        """Whether runs of ``task_name`` are traced at all (not excluded by name)."""
        return self.rules(task_name).traced

    def sample_new_trace(
        self,
        trace_id: str,
        task_name: str,
        args: Sequence[Any] = (),
        kwargs: Optional[Mapping[str, Any]] = None,
        headers: Optional[Mapping[str, Any]] = None,
        entry: str = "task",
    ) -> bool:
        """Whether a trace that starts with a run of ``task_name`` is kept.

        In order: the first matching ``task_sample_rates`` pattern, else the
        ``sampler`` callable, else the global ``sample_rate``. A rate is applied to
        the trace id; a sampler may also answer True or False outright.
        """
        rate = self.rules(task_name).sample_rate
        if rate is None and self.sampler is not None:
            decision = self._ask_sampler(task_name, args, kwargs or {}, headers or {}, entry)
            if isinstance(decision, bool):
                return decision
            rate = decision
        return trace_id_sampled(trace_id, self.sample_rate if rate is None else rate)

    def _ask_sampler(
        self,
        task_name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        headers: Mapping[str, Any],
        entry: str,
    ) -> Optional[Union[float, bool]]:
        assert self.sampler is not None
        try:
            decision = self.sampler(SamplingContext(task_name, args, kwargs, headers, entry))
        except Exception:
            warn_rate_limited(
                log, "sampler", "celery-langfuse: sampler raised; using sample_rate for %s",
                task_name,
            )
            return None
        if isinstance(decision, bool):
            return decision
        if isinstance(decision, (int, float)) and 0.0 <= decision <= 1.0:
            return float(decision)
        warn_rate_limited(
            log, "sampler-value",
            "celery-langfuse: sampler returned %r for %s; expected a number from 0 to 1 or a "
            "bool, using sample_rate", decision, task_name,
        )
        return None

    def _resolve(self, task_name: str) -> TaskRules:
        rate = next((rate for pattern, rate in self._rates if pattern.match(task_name)), None)
        return TaskRules(
            traced=not self._excluded.match(task_name),
            sample_rate=rate,
            capture=not self._capture_excluded.match(task_name),
            linked=bool(self._linked.match(task_name)),
        )


#: The task rules of the process's first installed app (set by ``install``, like
#: ``publish.policy``): how a web request that starts a trace is sampled. None while no
#: app is installed: every such trace is kept, as before sampling reached the web.
process_policy: Optional[TaskPolicy] = None


def sample_entry(trace_id: str, name: str, headers: Mapping[str, Any], entry: str) -> bool:
    """Whether a trace that starts at ``entry`` ("web"), named ``name``, is kept: the
    process policy's rule for new traces (:meth:`TaskPolicy.sample_new_trace`)."""
    policy = process_policy
    if policy is None:
        return True
    return policy.sample_new_trace(trace_id, name, (), {}, headers, entry=entry)


def keeps_failures() -> bool:
    """Whether a failure in a sampled-out trace started at an entry point is recorded."""
    policy = process_policy
    return True if policy is None else policy.keep_failures


class TraceSizeGuard:
    """Counts the observations this process records in each trace, so that a runaway
    fan-out can be cut into linked traces (``max_trace_observations``).

    Per process and approximate (no lock: a lost increment under a race only moves the
    cut by one); the oldest traces are forgotten past ``MAX_COUNTED_TRACES``, so the
    memory is bounded. Counting is a dictionary update, no function call.
    """

    def __init__(self, limit: Optional[int]) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}
        self._warned = False

    def over(self, trace_id: str) -> bool:
        """Count one more observation in ``trace_id``; whether the trace is now past
        the limit (the first time, one warning says what happens from here)."""
        counts = self.counts
        count = counts.get(trace_id, 0) + 1
        if count == 1 and len(counts) >= MAX_COUNTED_TRACES:
            del counts[next(iter(counts))]
        counts[trace_id] = count
        if self.limit is None or count <= self.limit:
            return False
        if not self._warned:
            self._warned = True
            log.warning(
                "celery-langfuse: trace %s has more than %d observations from this process "
                "(max_trace_observations); tasks it publishes from now on start linked "
                "traces (logged once per process)",
                trace_id,
                self.limit,
            )
        return True


#: Traces a guard counts at once; past it the oldest is forgotten.
MAX_COUNTED_TRACES = 4096

#: The process's guard, set by ``install`` from the first installed app's
#: ``max_trace_observations``: publishes and runs of every app count in it.
trace_guard = TraceSizeGuard(None)


_NOTHING = re.compile(r"(?!)")


def _compile_any(patterns: Sequence[str]) -> re.Pattern[str]:
    """One regex matching a task name against any of the fnmatch ``patterns``."""
    if not patterns:
        return _NOTHING
    return re.compile("|".join(f"(?:{fnmatch.translate(pattern)})" for pattern in patterns))
