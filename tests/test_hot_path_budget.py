"""The per-task work of the hot path, counted rather than timed, against a budget.

Timing tests fail on a busy machine; counts do not. For publishing a task (inside an
active trace and without one) and for running one, this counts what celery-langfuse
does per task: Python function calls in the calling thread (``sys.setprofile``,
the SDK's span machinery included), spans and span attributes sent to Langfuse, and
memory (``tracemalloc``): allocated at the peak of one run, and kept after many.

The budgets are the counts measured when they were set (see ``MEASURED``) plus
headroom, so a change that makes the hot path do markedly more per task fails here on
any machine. When a deliberate change (or a new SDK version) moves a count, rerun
``pytest tests/test_hot_path_budget.py -s``, which prints the counts, and update both.
The timed figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import gc
import logging
import statistics
import sys
import tracemalloc
import uuid
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from celery import Celery
from langfuse import get_client
from opentelemetry import context as otel_context

from celery_langfuse import client, install, trace_logs, uninstall
from celery_langfuse.publish import on_before_task_publish
from celery_langfuse.testing import CaptureServer

#: What the counts were when the budgets were set (Langfuse SDK 5.0.4, OTel SDK 1.45,
#: Celery 5.7, CPython 3.11): Python calls per operation in the calling thread. They
#: were 392, 41, 612 and 648 with the SDK's own observations, and 269, 20, 304 and 369
#: with SDK spans made without its wrapper, before lean spans; publish in a trace was
#: 129 before traceparent/baggage were written directly, a run continuing a trace 196
#: before it attached one context instead of two, skipped ABC and generator calls and
#: started under the remote parent without making its context; then 84, 20, 153 and
#: 246 before runs closed without ExitStack, returned trivial payloads unwalked and made
#: span contexts only when asked for (docs/benchmarks.md).
#: Lean spans are encoded on the export thread, which these counts do not include.
MEASURED = {
    "publish in a trace": 70,
    "publish without a trace": 20,
    "run continuing a trace": 102,
    "run starting a trace": 194,
    # Added by the trace ids on one log record made during a run (trace_logs.py): the
    # record factory's calls; a run that logs nothing pays nothing.
    "trace ids on a log record": 7,
}
#: A budget is the measured count times this (and at least 15 calls more): room for
#: SDK patch releases and small changes, not for doubling the work.
HEADROOM = 1.3
#: Span attributes on one observation (type, input, metadata, output, environment ...).
MAX_ATTRIBUTES = {"publish": 3, "run": 4}
#: Metadata counts as one attribute: the task thread hands it over as one dict, and
#: the export thread writes it a key an attribute, as the SDK does.
METADATA_PREFIX = "langfuse.observation.metadata."
#: Bytes a task run may allocate at its peak, with a 1 MB argument: capture keeps
#: only max_payload_chars of it.
MAX_PEAK_BYTES_PER_RUN = 150_000
#: Bytes a run may leave behind once its observation is exported (leak guard).
MAX_RETAINED_BYTES_PER_RUN = 64


def count_calls(operation: Callable[[], object]) -> int:
    """Python function calls made by ``operation`` in this thread."""
    calls = 0

    def profiler(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(profiler)
    try:
        operation()
    finally:
        sys.setprofile(None)
    return calls


def median_calls(operation: Callable[[], object], times: int = 25) -> int:
    operation()  # warm: first-use setup is not per-task work
    return int(statistics.median(count_calls(operation) for _ in range(times)))


def within_budget(name: str, calls: int) -> None:
    print(f"\n{name}: {calls} Python calls (measured when set: {MEASURED[name]})")
    budget = max(int(MEASURED[name] * HEADROOM), MEASURED[name] + 15)
    assert calls <= budget, (
        f"{name}: {calls} Python calls per task, budget {budget} "
        f"({MEASURED[name]} measured, times {HEADROOM}). If the extra work is deliberate, "
        "update MEASURED in tests/test_hot_path_budget.py and docs/benchmarks.md."
    )


class Harness:
    """A traced app whose handlers are called the way Celery calls them."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.installation = install(app)

        @app.task(name="budget.noop")
        def noop(*args: object, **kwargs: object) -> None:
            return None

        self.task = noop

    def publish(self) -> dict[str, Any]:
        """Run the publish handler on a fresh message's headers, as apply_async does."""
        headers: dict[str, Any] = {
            "lang": "py",
            "task": self.task.name,
            "id": str(uuid.uuid4()),
            "eta": None,
            "expires": None,
            "group": None,
            "retries": 0,
            "root_id": None,
            "parent_id": None,
            "argsrepr": "()",
            "kwargsrepr": "{}",
            "origin": "gen@host",
        }
        on_before_task_publish(
            sender=self.task.name,
            body=((), {}, {}),
            exchange="",
            routing_key="celery",
            headers=headers,
            properties={},
        )
        return headers

    def run(self, message_headers: dict[str, Any], *args: Any) -> Callable[[], None]:
        """One task run through the worker handlers, with the request a worker builds."""
        worker = self.installation.worker
        task = self.task
        trace_headers = {
            k: v for k, v in message_headers.items() if k.startswith(("x-", "trace", "bag"))
        }

        def run_once() -> None:
            task_id = str(uuid.uuid4())
            task.push_request(
                id=task_id,
                headers=dict(trace_headers),
                delivery_info={"routing_key": "celery"},
                hostname="worker@host",
                retries=0,
                **trace_headers,
            )
            try:
                worker.on_task_prerun(sender=task, task_id=task_id, task=task, args=args, kwargs={})
                worker.on_task_postrun(
                    sender=task, task_id=task_id, task=task, retval=None, state="SUCCESS"
                )
            finally:
                task.pop_request()

        return run_once


@pytest.fixture
def harness(capture: CaptureServer) -> Iterator[Harness]:
    app = Celery("hot-path-budget")
    yield Harness(app)
    uninstall(app)


def headers_in_a_trace(harness: Harness) -> dict[str, Any]:
    with get_client().start_as_current_observation(name="request"):
        return harness.publish()


def langfuse_attributes(observation: Any) -> int:
    names = [k for k in observation.attributes if k.startswith("langfuse.")]
    metadata = [k for k in names if k.startswith(METADATA_PREFIX)]
    return len(names) - len(metadata) + (1 if metadata else 0)


def emptied(capture: CaptureServer) -> None:
    """Send what is buffered, then forget it: only what follows is counted."""
    client.flush(10)
    capture.clear()


def exported(capture: CaptureServer, name: str) -> list[Any]:
    client.flush(10)
    return [o for o in capture.observations if o.name == name]


def test_publish_in_a_trace_is_one_observation_within_budget(
    harness: Harness, capture: CaptureServer
) -> None:
    with get_client().start_as_current_observation(name="request"):
        calls = median_calls(harness.publish)
        emptied(capture)
        harness.publish()
    within_budget("publish in a trace", calls)
    (publish,) = exported(capture, "publish budget.noop")
    assert langfuse_attributes(publish) <= MAX_ATTRIBUTES["publish"]


def test_publish_without_a_trace_makes_no_observation_within_budget(
    harness: Harness, capture: CaptureServer
) -> None:
    calls = median_calls(harness.publish)
    emptied(capture)
    harness.publish()
    within_budget("publish without a trace", calls)
    assert exported(capture, "publish budget.noop") == []


def test_run_continuing_a_trace_is_one_observation_within_budget(
    harness: Harness, capture: CaptureServer
) -> None:
    run = harness.run(headers_in_a_trace(harness))
    calls = median_calls(run)
    emptied(capture)
    run()
    within_budget("run continuing a trace", calls)
    (observation,) = exported(capture, "budget.noop")
    assert langfuse_attributes(observation) <= MAX_ATTRIBUTES["run"]


def test_run_starting_a_trace_within_budget(harness: Harness, capture: CaptureServer) -> None:
    within_budget("run starting a trace", median_calls(harness.run(harness.publish())))


def test_a_huge_argument_costs_only_what_is_kept(harness: Harness) -> None:
    run = harness.run(headers_in_a_trace(harness), "x" * 1_000_000)
    run()
    gc.collect()
    tracemalloc.start()
    try:
        run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"\npeak allocation of a run with a 1 MB argument: {peak} bytes")
    assert peak <= MAX_PEAK_BYTES_PER_RUN


def test_runs_leave_nothing_behind_once_exported(harness: Harness, capture: CaptureServer) -> None:
    run = harness.run(headers_in_a_trace(harness))

    def settle() -> None:
        emptied(capture)  # the capture server lives in this process: drop what it kept
        gc.collect()

    for _ in range(200):
        run()
    settle()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(1000):
            run()
        settle()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_run = (after - before) / 1000
    print(f"\nretained after 1000 runs and a flush: {per_run:.1f} bytes per run")
    assert per_run <= MAX_RETAINED_BYTES_PER_RUN


def test_trace_ids_on_log_records_within_budget(harness: Harness) -> None:
    logger = logging.getLogger("budget.logs")
    logger.addHandler(logging.NullHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    observation = client.start_observation("budget.logging")
    token = otel_context.attach(client.context_with(observation))
    try:
        with_ids = median_calls(lambda: logger.info("step"))
        record = logging.getLogRecordFactory()("x", logging.INFO, "", 0, "m", (), None)
        trace_logs.uninstall_record_factory()
        try:
            without_ids = median_calls(lambda: logger.info("step"))
        finally:
            trace_logs.install_record_factory()
    finally:
        otel_context.detach(token)
        observation.end()
    assert (record.langfuse_trace_id, record.langfuse_observation_id) == (
        observation.trace_id,
        observation.id,
    )
    within_budget("trace ids on a log record", with_ids - without_ids)
