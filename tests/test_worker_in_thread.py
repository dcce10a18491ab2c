"""Producer → Redis → in-thread worker: what Langfuse shows for each kind of task run.

Real Redis broker, real Celery worker (in a thread, solo pool unless stated), the real
Langfuse SDK exporting over HTTP to the capture server.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import chain, chord, group
from langfuse import get_client, propagate_attributes

from celery_langfuse.testing import CaptureServer, Observation, Trace
from tests.conftest import in_thread_worker

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["solo", "threads"])
def worker(request: pytest.FixtureRequest, tasks_app: Any) -> Iterator[Any]:
    with in_thread_worker(tasks_app.app, pool=request.param, concurrency=2):
        yield tasks_app


def parent_of(trace: Trace, observation: Observation) -> Observation:
    return next(o for o in trace.observations if o.id == observation.parent_id)


def request_trace(capture: CaptureServer, trace_id: str, *names: str) -> Trace:
    """Wait until the trace holds the request and an observation of each name."""
    names = ("request", *(n for n in names if n != "request"))

    def complete(server: CaptureServer) -> bool:
        try:
            trace = server.trace(trace_id)
        except KeyError:
            return False
        found = [o.name for o in trace.observations]
        return all(found.count(n) >= names.count(n) for n in set(names))

    capture.wait_for(complete, timeout=20)
    trace = capture.trace(trace_id)
    assert trace.orphans() == []
    return trace


def test_task_published_in_an_observation_is_its_child_in_the_same_trace(
    worker: Any, capture: CaptureServer
) -> None:
    with get_client().start_as_current_observation(name="request") as root:
        result = worker.add.delay(2, 3)
    assert result.get(timeout=10) == 5

    trace = request_trace(
        capture,
        root.trace_id,
        "request",
        "publish tests.support.tasks.add",
        "tests.support.tasks.add",
    )
    request = trace.find("request")
    publish = trace.find("publish tests.support.tasks.add")
    run = trace.find("tests.support.tasks.add")
    assert publish.parent_id == request.id
    assert run.parent_id == publish.id
    assert run.input == {"args": [2, 3], "kwargs": {}}
    assert run.output == 5
    assert run.metadata["task_id"] == result.id
    assert run.metadata["queue_wait_seconds"] >= 0
    assert trace.name == "request"


def test_user_and_session_cross_the_broker(worker: Any, capture: CaptureServer) -> None:
    with get_client().start_as_current_observation(name="request") as root:
        with propagate_attributes(user_id="user-42", session_id="sess-7", tags=["checkout"]):
            worker.add.delay(1, 1).get(timeout=10)

    trace = request_trace(capture, root.trace_id, "tests.support.tasks.add")
    run = trace.find("tests.support.tasks.add")
    assert run.attributes["user.id"] == "user-42"
    assert run.attributes["session.id"] == "sess-7"
    assert (trace.user_id, trace.session_id) == ("user-42", "sess-7")
    assert "checkout" in trace.tags


def test_attributes_without_an_observation_still_reach_the_worker(
    worker: Any, capture: CaptureServer
) -> None:
    with propagate_attributes(user_id="user-9", session_id="sess-9"):
        result = worker.add.delay(4, 4)
    result.get(timeout=10)

    capture.wait_for(lambda s: any(o.metadata.get("task_id") == result.id for o in s.observations))
    run = next(o for o in capture.observations if o.metadata.get("task_id") == result.id)
    trace = capture.trace(run.trace_id)
    assert (trace.user_id, trace.session_id) == ("user-9", "sess-9")


def test_publish_with_no_active_trace_starts_a_trace_named_after_the_task(
    worker: Any, capture: CaptureServer
) -> None:
    result = worker.add.delay(1, 2)
    result.get(timeout=10)

    capture.wait_for(lambda s: any(o.metadata.get("task_id") == result.id for o in s.observations))
    run = next(o for o in capture.observations if o.metadata.get("task_id") == result.id)
    trace = capture.trace(run.trace_id)
    assert run.parent_id is None
    assert trace.name == "tests.support.tasks.add"
    assert [o.name for o in trace.observations] == ["tests.support.tasks.add"]


def test_failure_is_an_error_with_type_message_and_traceback(
    worker: Any, capture: CaptureServer
) -> None:
    with get_client().start_as_current_observation(name="request") as root:
        result = worker.fail.delay("card declined")
    with pytest.raises(ValueError):
        result.get(timeout=10)

    run = request_trace(capture, root.trace_id, "tests.support.tasks.fail").find(
        "tests.support.tasks.fail"
    )
    assert run.level == "ERROR"
    assert run.status_message == "ValueError: card declined"
    assert "Traceback" in run.metadata["traceback"]
    assert run.metadata["exception_type"] == "ValueError"


def test_retry_stays_in_the_same_trace(worker: Any, capture: CaptureServer) -> None:
    with get_client().start_as_current_observation(name="request") as root:
        assert worker.flaky.delay(succeed_on=2).get(timeout=20) == 2

    name = "tests.support.tasks.flaky"
    trace = request_trace(capture, root.trace_id, name, name, name)
    runs = trace.find_all(name)
    assert [r.level for r in runs] == ["WARNING", "WARNING", "DEFAULT"]
    assert "ConnectionError: transient" in (runs[0].status_message or "")
    # each retry is published from inside the run it retries
    first_retry_publish = next(o for o in trace.observations if o.parent_id == runs[0].id)
    assert runs[1].parent_id == first_retry_publish.id


def test_autoretry_stays_in_the_same_trace(worker: Any, capture: CaptureServer) -> None:
    with get_client().start_as_current_observation(name="request") as root:
        worker.autoretried.delay(f"autoretry-{uuid.uuid4()}").get(timeout=20)

    runs = request_trace(
        capture, root.trace_id, "tests.support.tasks.autoretried", "tests.support.tasks.autoretried"
    ).find_all("tests.support.tasks.autoretried")
    assert [r.level for r in runs] == ["WARNING", "DEFAULT"]


def test_nested_task_is_a_grandchild_of_the_parent_run(worker: Any, capture: CaptureServer) -> None:
    with get_client().start_as_current_observation(name="request") as root:
        worker.spawn_child.delay(1).get(timeout=10)

    trace = request_trace(
        capture, root.trace_id, "tests.support.tasks.spawn_child", "tests.support.tasks.add"
    )
    parent_run = trace.find("tests.support.tasks.spawn_child")
    child_publish = trace.find("publish tests.support.tasks.add")
    assert child_publish.parent_id == parent_run.id
    assert trace.find("tests.support.tasks.add").parent_id == child_publish.id


def test_chain_links_nest_under_the_run_that_published_them(
    worker: Any, capture: CaptureServer
) -> None:
    with get_client().start_as_current_observation(name="request") as root:
        result = chain(worker.add.s(1, 1), worker.add.s(10), worker.add.s(100)).apply_async()
    assert result.get(timeout=15) == 112

    trace = request_trace(capture, root.trace_id, *["tests.support.tasks.add"] * 3)
    first, second, third = trace.find_all("tests.support.tasks.add")
    assert parent_of(trace, parent_of(trace, second)).id == first.id
    assert parent_of(trace, parent_of(trace, third)).id == second.id


def test_group_members_are_siblings_in_one_trace(worker: Any, capture: CaptureServer) -> None:
    with get_client().start_as_current_observation(name="request") as root:
        assert group(worker.add.s(i, i) for i in range(4)).apply_async().get(timeout=15) == [
            0,
            2,
            4,
            6,
        ]

    trace = request_trace(capture, root.trace_id, *["tests.support.tasks.add"] * 4)
    request = trace.find("request")
    for run in trace.find_all("tests.support.tasks.add"):
        assert parent_of(trace, parent_of(trace, run)).id == request.id


def test_chord_header_and_callback_stay_in_the_trace(worker: Any, capture: CaptureServer) -> None:
    with get_client().start_as_current_observation(name="request") as root:
        result = chord(group(worker.add.s(i, i) for i in range(3)), worker.total.s()).apply_async()
    assert result.get(timeout=20) == 6

    trace = request_trace(
        capture, root.trace_id, *["tests.support.tasks.add"] * 3, "tests.support.tasks.total"
    )
    callback = trace.find("tests.support.tasks.total")
    assert callback.input == {"args": [[0, 2, 4]], "kwargs": {}}
    header_runs = {run.id for run in trace.find_all("tests.support.tasks.add")}
    # the callback is published by the last header task to finish
    assert parent_of(trace, parent_of(trace, callback)).id in header_runs


def test_send_task_by_name_joins_the_trace(worker: Any, capture: CaptureServer) -> None:
    with get_client().start_as_current_observation(name="request") as root:
        worker.app.send_task("tests.support.tasks.add", args=(5, 5)).get(timeout=10)

    trace = request_trace(capture, root.trace_id, "tests.support.tasks.add")
    assert trace.find("tests.support.tasks.add").output == 10


def test_headers_set_by_the_user_are_preserved(worker: Any, capture: CaptureServer) -> None:
    with get_client().start_as_current_observation(name="request"):
        result = worker.header_probe.apply_async(headers={"x-tenant": "acme"})
    seen = result.get(timeout=10)
    assert seen["x-tenant"] == "acme"
    assert "x-langfuse-trace-id" in seen


@pytest.mark.parametrize(
    "bad_headers",
    [
        {"traceparent": "garbage"},
        {"x-langfuse-trace-id": "not-hex", "x-langfuse-parent-id": "z" * 16},
        {"x-langfuse-user-id": "u" * 100_000, "x-langfuse-tags": "[" * 1_000},
        {"traceparent": "00-" + "f" * 32 + "-" + "0" * 16 + "-01", "x-langfuse-metadata": "{]"},
    ],
)
def test_malformed_trace_headers_still_run_the_task_in_a_fresh_trace(
    worker: Any, capture: CaptureServer, bad_headers: dict[str, str]
) -> None:
    # Published outside any observation, so the bad values reach the worker as sent.
    result = worker.add.apply_async((2, 2), headers=bad_headers)
    assert result.get(timeout=10) == 4

    capture.wait_for(lambda s: any(o.metadata.get("task_id") == result.id for o in s.observations))
    run = next(o for o in capture.observations if o.metadata.get("task_id") == result.id)
    assert run.parent_id is None
    assert capture.trace(run.trace_id).orphans() == []


def test_eager_run_is_a_child_of_the_callers_observation(
    tasks_app: Any, capture: CaptureServer
) -> None:
    with get_client().start_as_current_observation(name="request") as root:
        assert tasks_app.add.apply((3, 4)).get() == 7

    trace = request_trace(capture, root.trace_id, "tests.support.tasks.add")
    run = trace.find("tests.support.tasks.add")
    assert run.parent_id == trace.find("request").id
    assert run.metadata["eager"] is True


def test_always_eager_app_traces_runs_as_children(tasks_app: Any, capture: CaptureServer) -> None:
    tasks_app.app.conf.task_always_eager = True
    try:
        with get_client().start_as_current_observation(name="request") as root:
            assert tasks_app.spawn_child.delay(1).get() is not None
    finally:
        tasks_app.app.conf.task_always_eager = False

    trace = request_trace(
        capture, root.trace_id, "tests.support.tasks.spawn_child", "tests.support.tasks.add"
    )
    outer = trace.find("tests.support.tasks.spawn_child")
    assert trace.find("tests.support.tasks.add").parent_id == outer.id


def test_ignore_and_reject_close_the_run_without_an_error(
    worker: Any, capture: CaptureServer
) -> None:
    with get_client().start_as_current_observation(name="request") as root:
        ignored = worker.ignored.delay()
        rejected = worker.rejected.delay()
    trace = request_trace(
        capture, root.trace_id, "tests.support.tasks.ignored", "tests.support.tasks.rejected"
    )
    assert trace.find("tests.support.tasks.ignored").level == "DEFAULT"
    assert trace.find("tests.support.tasks.ignored").status_message == "ignored"
    assert trace.find("tests.support.tasks.rejected").level == "WARNING"
    assert "not for me" in (trace.find("tests.support.tasks.rejected").status_message or "")
    assert ignored.id and rejected.id


def test_no_run_is_left_open_after_a_burst(worker: Any, capture: CaptureServer) -> None:
    from celery_langfuse._install import _installations

    results = [worker.add.delay(i, i) for i in range(30)] + [worker.fail.delay() for _ in range(5)]
    for r in results:
        r.get(timeout=20, propagate=False)
    # The result is stored before task_postrun fires: give the last run a moment.
    runs = _installations[id(worker.app)].worker.runs
    deadline = time.monotonic() + 5
    while len(runs) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(runs) == 0
