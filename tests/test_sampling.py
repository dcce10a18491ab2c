"""Sampling: decided once per trace from its id, followed by every task in it, and a
failure is kept even when its trace is not.

Unit tests for the decision itself, then a real Redis broker and an in-thread worker
exporting through the real SDK to the capture server.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
from langfuse import get_client
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from celery_langfuse import TracingConfig
from celery_langfuse._policy import SamplingContext, TaskPolicy, trace_id_sampled
from celery_langfuse.testing import CaptureServer, Observation
from tests.conftest import flush_in_process, in_thread_worker


def reinstalled(**options: Any) -> AbstractContextManager[Any]:
    """tests/support/tasks.py's app installed with ``options`` inside the block.

    Imported here, not at collection: installing the app needs the capture server's
    keys in the environment, which the ``capture`` fixture sets.
    """
    from tests.support.config_tasks import reinstalled

    return reinstalled(**options)


pytestmark = pytest.mark.timeout(90)

ADD = "tests.support.tasks.add"
FAIL = "tests.support.tasks.fail"
SPAWN = "tests.support.tasks.spawn_child"
ECHO = "tests.support.tasks.echo"


# -- the decision ---------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.1, 0.5, 0.9, 1.0])
def test_decision_agrees_with_opentelemetry_trace_id_ratio(rate: float) -> None:
    sampler = TraceIdRatioBased(rate)
    rng = random.Random(rate)
    for _ in range(2_000):
        trace_id = rng.getrandbits(128)
        expected = sampler.should_sample(None, trace_id, "x").decision == Decision.RECORD_AND_SAMPLE
        assert trace_id_sampled(format(trace_id, "032x"), rate) is expected


def test_decision_keeps_about_the_rate() -> None:
    rng = random.Random(7)
    kept = sum(trace_id_sampled(format(rng.getrandbits(128), "032x"), 0.1) for _ in range(20_000))
    assert 1_800 < kept < 2_200


def policy(**overrides: Any) -> TaskPolicy:
    settings: dict[str, Any] = dict(
        exclude_tasks=("celery.*",),
        task_sample_rates={},
        capture_exclude_tasks=(),
        sample_rate=1.0,
        sampler=None,
        keep_failures=True,
    )
    settings.update(overrides)
    return TaskPolicy(**settings)


def test_celery_internal_tasks_are_not_traced_by_default() -> None:
    config = TracingConfig()
    assert not config.traces_task("celery.chord_unlock")
    assert not config.traces_task("celery.backend_cleanup")
    assert config.traces_task("proj.tasks.celery_report")


def test_exclusion_and_capture_patterns_are_fnmatch_on_the_task_name() -> None:
    rules = policy(exclude_tasks=("proj.health.*",), capture_exclude_tasks=("*.payments.*",))
    assert not rules.traces_task("proj.health.ping")
    assert rules.traces_task("proj.healthcheck")
    assert rules.rules("proj.payments.charge").capture is False
    assert rules.rules("proj.orders.create").capture is True


def test_first_matching_pattern_rate_wins() -> None:
    rules = policy(task_sample_rates={"proj.noisy.*": 0.0, "proj.*": 1.0}, sample_rate=0.5)
    always_dropped = "f" * 32  # the highest trace id: kept only at rate 1
    assert rules.sample_new_trace(always_dropped, "proj.orders.create") is True
    assert rules.sample_new_trace("0" * 31 + "1", "proj.noisy.poll") is False


def test_sampler_sees_the_task_and_may_answer_a_rate_or_a_bool() -> None:
    seen: list[SamplingContext] = []

    def sampler(context: SamplingContext) -> float | bool:
        seen.append(context)
        if context.kwargs.get("tenant") == "acme":
            return True
        return 0.0 if context.headers.get("x-plan") == "free" else 1.0

    rules = policy(sampler=sampler, sample_rate=0.0)
    trace_id = "f" * 32
    assert rules.sample_new_trace(trace_id, "t", (), {"tenant": "acme"}, {}) is True
    assert rules.sample_new_trace(trace_id, "t", (1,), {}, {"x-plan": "free"}) is False
    assert rules.sample_new_trace(trace_id, "t", (), {}, {"x-plan": "pro"}) is True
    assert seen[1] == SamplingContext("t", (1,), {}, {"x-plan": "free"})


@pytest.mark.parametrize("answer", [RuntimeError("broken"), 7, "yes"])
def test_a_broken_sampler_falls_back_to_the_sample_rate(answer: Any) -> None:
    def sampler(context: SamplingContext) -> Any:
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert policy(sampler=sampler, sample_rate=0.0).sample_new_trace("0" * 32, "t") is False
    assert policy(sampler=sampler, sample_rate=1.0).sample_new_trace("f" * 32, "t") is True


# -- across the broker ----------------------------------------------------------------


@pytest.fixture
def worker(tasks_app: Any, extra: Any) -> Iterator[Any]:
    # ``extra`` first: a worker knows only the tasks registered when it starts.
    with in_thread_worker(tasks_app.app, pool="threads", concurrency=2):
        yield tasks_app


@pytest.fixture
def extra(tasks_app: Any) -> Any:
    """tests/support/config_tasks.py: more tasks on the same app."""
    from tests.support import config_tasks

    return config_tasks


def runs_named(capture: CaptureServer, name: str) -> list[Observation]:
    return [o for o in capture.observations if o.name == name]


def run_of(capture: CaptureServer, task_id: str) -> Observation:
    matches = [
        o
        for o in capture.observations
        if o.metadata.get("task_id") == task_id and not o.name.startswith("publish ")
    ]
    assert len(matches) == 1, [o.name for o in capture.observations]
    return matches[0]


def test_sampled_out_trace_records_nothing(worker: Any, capture: CaptureServer) -> None:
    with reinstalled(sample_rate=0.0):
        results = [worker.spawn_child.delay(i) for i in range(5)]
        children = [worker.app.AsyncResult(r.get(timeout=10)) for r in results]
        assert [c.get(timeout=10) for c in children] == [i + 1 for i in range(5)]
    flush_in_process()
    assert capture.observations == []


def test_a_trace_is_whole_or_absent(worker: Any, capture: CaptureServer) -> None:
    with reinstalled(sample_rate=0.5):
        results = [worker.spawn_child.delay(i) for i in range(40)]
        children = [worker.app.AsyncResult(r.get(timeout=10)) for r in results]
        for child in children:
            child.get(timeout=10)
    flush_in_process()
    # A result is stored before task_postrun ends the run: wait for the last runs too.
    whole = sorted([SPAWN, f"publish {ADD}", ADD])
    capture.wait_for(
        lambda s: all(sorted(o.name for o in t.observations) == whole for t in s.traces())
    )

    traces = capture.traces()
    assert 5 <= len(traces) <= 35, len(traces)  # about half of 40, binomially
    for trace in traces:
        # the parent run, the publish it made, and the child run: never a part alone
        assert sorted(o.name for o in trace.observations) == sorted([SPAWN, f"publish {ADD}", ADD])
        assert trace.orphans() == []
        assert trace_id_sampled(trace.id, 0.5)


def test_an_unsampled_producer_trace_stays_unrecorded_downstream(
    worker: Any, capture: CaptureServer
) -> None:
    unsampled = SpanContext(
        trace_id=int("ab" * 16, 16),
        span_id=int("cd" * 8, 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.DEFAULT),
    )
    token = otel_context.attach(otel_trace.set_span_in_context(NonRecordingSpan(unsampled)))
    try:
        seen = worker.header_probe.delay().get(timeout=10)
        worker.spawn_child.delay(1).get(timeout=10)
    finally:
        otel_context.detach(token)
    assert seen["x-langfuse-sampled"] == "0"
    assert seen["x-langfuse-trace-id"] == "ab" * 16
    flush_in_process()
    assert capture.observations == []


def test_the_users_own_observations_follow_the_run(
    worker: Any, extra: Any, capture: CaptureServer
) -> None:
    with reinstalled(sample_rate=0.0):
        extra.generate.delay("dropped").get(timeout=10)
    flush_in_process()
    assert capture.observations == []

    with reinstalled(sample_rate=1.0):
        extra.generate.delay("kept").get(timeout=10)
    capture.wait_for(lambda s: len(s.traces()) == 1 and len(s.observations) == 2)
    trace = capture.traces()[0]
    assert trace.find("llm").parent_id == trace.find("tests.support.config_tasks.generate").id


def test_a_failure_in_a_sampled_out_trace_is_kept_as_the_root_of_its_trace(
    worker: Any, capture: CaptureServer
) -> None:
    with reinstalled(sample_rate=0.0):
        result = worker.fail.delay("card declined")
        with pytest.raises(ValueError):
            result.get(timeout=10)
        ok = worker.add.delay(1, 1)
        assert ok.get(timeout=10) == 2

    capture.wait_for(lambda s: run_of(s, result.id))
    flush_in_process()
    run = run_of(capture, result.id)
    assert run.name == FAIL
    assert run.level == "ERROR"
    assert run.status_message == "ValueError: card declined"
    assert run.input == {"args": ["card declined"], "kwargs": {}}
    assert run.metadata["trace_sampled"] is False
    assert run.metadata["exception_type"] == "ValueError"
    assert "Traceback" in run.metadata["traceback"]
    assert run.parent_id is None
    assert not trace_id_sampled(run.trace_id, 0.0)
    trace = capture.trace(run.trace_id)
    assert trace.name == FAIL
    assert trace.orphans() == []
    # the successful run of the same setup left nothing
    assert [o for o in capture.observations if o.metadata.get("task_id") == ok.id] == []


def test_a_kept_failure_spans_the_run_and_names_the_trace_it_belongs_to(
    worker: Any, extra: Any, capture: CaptureServer
) -> None:
    with reinstalled(sample_rate=0.0):
        spawned = worker.spawn_child.delay(1)
        with pytest.raises(RuntimeError):
            extra.record_and_fail.delay("hello").get(timeout=10)
        spawned.get(timeout=10)
        # a failing child of a sampled-out parent: kept, in the parent's trace id
        unsampled = SpanContext(
            trace_id=int("12" * 16, 16),
            span_id=int("34" * 8, 16),
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.DEFAULT),
        )
        token = otel_context.attach(otel_trace.set_span_in_context(NonRecordingSpan(unsampled)))
        try:
            child = worker.fail.delay("child failed")
        finally:
            otel_context.detach(token)
        with pytest.raises(ValueError):
            child.get(timeout=10)

    capture.wait_for(lambda s: len(runs_named(s, FAIL)) == 1 and len(s.observations) == 2)
    flush_in_process()
    names = sorted(o.name for o in capture.observations)
    # the user's "llm" generation inside the failing run is not exported: no orphan
    assert names == sorted([FAIL, "tests.support.config_tasks.record_and_fail"])
    refused = runs_named(capture, "tests.support.config_tasks.record_and_fail")[0]
    assert refused.duration > 0
    child_run = run_of(capture, child.id)
    assert child_run.trace_id == "12" * 16
    # str(): SDK 4 sends metadata strings unquoted, so an all-digit id reads as a number
    # (Langfuse stores both as the same text)
    assert str(child_run.metadata["parent_observation_id"]) == "34" * 8
    assert child_run.parent_id is None


def test_keep_failures_off_drops_failures_of_sampled_out_traces(
    worker: Any, capture: CaptureServer
) -> None:
    with reinstalled(sample_rate=0.0, keep_failures=False):
        with pytest.raises(ValueError):
            worker.fail.delay("dropped").get(timeout=10)
    flush_in_process()
    assert capture.observations == []


def test_failures_in_sampled_traces_are_ordinary_children(
    worker: Any, capture: CaptureServer
) -> None:
    with get_client().start_as_current_observation(name="request") as root:
        result = worker.fail.delay("in a kept trace")
    with pytest.raises(ValueError):
        result.get(timeout=10)
    capture.wait_for(lambda s: run_of(s, result.id))
    run = run_of(capture, result.id)
    assert run.trace_id == root.trace_id
    assert run.parent_id is not None
    assert "trace_sampled" not in run.metadata


def test_a_task_pattern_rate_overrides_the_global_rate(worker: Any, capture: CaptureServer) -> None:
    with reinstalled(sample_rate=0.0, task_sample_rates={ADD: 1.0}):
        added = worker.add.delay(2, 2)
        echoed = worker.echo.delay(1)
        assert added.get(timeout=10) == 4
        echoed.get(timeout=10)
    capture.wait_for(lambda s: run_of(s, added.id))
    flush_in_process()
    assert [o.name for o in capture.observations] == [ADD]


def test_a_sampler_decides_from_the_task_arguments_and_headers(
    worker: Any, capture: CaptureServer
) -> None:
    def sampler(context: SamplingContext) -> bool:
        return context.kwargs.get("tenant") == "acme" or context.headers.get("x-plan") == "pro"

    with reinstalled(sample_rate=0.0, sampler=sampler):
        kept = worker.echo.delay(tenant="acme")
        dropped = worker.echo.delay(tenant="other")
        by_header = worker.echo.apply_async(kwargs={"tenant": "x"}, headers={"x-plan": "pro"})
        for result in (kept, dropped, by_header):
            result.get(timeout=10)
    capture.wait_for(lambda s: run_of(s, kept.id) and run_of(s, by_header.id))
    flush_in_process()
    assert {o.metadata["task_id"] for o in capture.observations} == {kept.id, by_header.id}


def test_an_excluded_task_records_nothing_but_its_children_stay_in_the_trace(
    worker: Any, capture: CaptureServer
) -> None:
    with reinstalled(exclude_tasks=[SPAWN]):
        with get_client().start_as_current_observation(name="request") as root:
            spawned = worker.spawn_child.delay(5)
        assert worker.app.AsyncResult(spawned.get(timeout=10)).get(timeout=10) == 6
    capture.wait_for(lambda s: s.trace(root.trace_id).find(ADD))
    flush_in_process()

    trace = capture.trace(root.trace_id)
    assert sorted(o.name for o in trace.observations) == sorted(["request", f"publish {ADD}", ADD])
    assert trace.find(f"publish {ADD}").parent_id == trace.find("request").id
    assert trace.orphans() == []


def test_celery_internal_tasks_sent_in_a_trace_record_nothing(
    worker: Any, capture: CaptureServer
) -> None:
    with get_client().start_as_current_observation(name="request") as root:
        worker.app.send_task("celery.backend_cleanup").get(timeout=10)
    flush_in_process()
    assert [o.name for o in capture.trace(root.trace_id).observations] == ["request"]


def test_sampling_decisions_use_the_trace_id_everywhere(
    worker: Any, capture: CaptureServer
) -> None:
    marker = uuid.uuid4().hex
    with reinstalled(sample_rate=0.3):
        results = [worker.echo.delay(marker, i) for i in range(60)]
        for result in results:
            result.get(timeout=10)
    flush_in_process()
    kept = [o for o in capture.observations if o.input and o.input["args"][0] == marker]
    assert 3 <= len(kept) <= 40, len(kept)
    assert all(trace_id_sampled(o.trace_id, 0.3) for o in kept)
