"""Real `celery worker -P prefork` subprocesses: traces survive forks, recycling,
warm shutdown, and an unreachable Langfuse."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import pytest
from langfuse import get_client, propagate_attributes
from redis import Redis

from celery_langfuse.testing import CaptureServer
from tests.conftest import (
    REDIS_URL,
    flush_in_process,
    sigkill_the_child_running,
    worker_process,
)

pytestmark = pytest.mark.timeout(120)
ADD = "tests.support.tasks.add"


def runs_of(capture: CaptureServer, task_ids: set[str]) -> dict[str, Any]:
    return {
        o.metadata.get("task_id"): o
        for o in capture.observations
        if o.metadata.get("task_id") in task_ids and not o.name.startswith("publish ")
    }


def test_prefork_runs_join_the_producers_trace(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    with worker_process(capture.env, "-P", "prefork", "-c", "2", tmp_path=tmp_path) as worker:
        with get_client().start_as_current_observation(name="request") as root:
            with propagate_attributes(user_id="user-1", session_id="sess-1"):
                results = [
                    tasks_app.spawn_child.apply_async((i,), queue=worker.queue) for i in range(4)
                ]
        for r in results:
            r.get(timeout=20)
        capture.wait_for(
            lambda s: (
                len([o for o in s.observations if o.trace_id == root.trace_id and o.name == ADD])
                == 4
            ),
            timeout=20,
        )
    flush_in_process()  # the request and its publishes, made here

    trace = capture.trace(root.trace_id)
    assert trace.orphans() == []
    assert len(trace.find_all("tests.support.tasks.spawn_child")) == 4
    for run in trace.find_all(ADD):
        assert run.attributes["user.id"] == "user-1"
        assert run.attributes["session.id"] == "sess-1"


def test_recycling_children_after_every_task_loses_nothing(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    with worker_process(
        capture.env, "-P", "prefork", "-c", "2", "--max-tasks-per-child", "1", tmp_path=tmp_path
    ) as worker:
        results = [tasks_app.add.apply_async((i, i), queue=worker.queue) for i in range(8)]
        for r in results:
            r.get(timeout=30)
        ids = {r.id for r in results}
        capture.wait_for(lambda s: len(runs_of(s, ids)) == 8, timeout=20)
    assert {run.output for run in runs_of(capture, ids).values()} == {i + i for i in range(8)}


def test_warm_shutdown_by_sigterm_loses_nothing(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    with worker_process(capture.env, "-P", "prefork", "-c", "2", tmp_path=tmp_path) as worker:
        started_key = f"started-{uuid.uuid4()}"
        results = [
            tasks_app.slow.apply_async((1.0, started_key), queue=worker.queue) for _ in range(2)
        ]
        # SIGTERM once both runs are in flight (a message merely received would be
        # requeued, not run): they finish, then the children exit.
        started = Redis.from_url(REDIS_URL)
        deadline = time.monotonic() + 15
        while int(started.get(started_key) or 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert int(started.get(started_key) or 0) == 2, worker.log()
        worker.stop()
        ids = {r.id for r in results}
        assert all(r.get(timeout=10) == 1.0 for r in results)
    # Nothing is waited for here: the children flushed before they exited.
    assert len(runs_of(capture, ids)) == 2


def test_a_child_killed_mid_task_closes_its_run_as_an_error_and_the_worker_keeps_tracing(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    name = "tests.support.tasks.report_pid_and_sleep"
    pid_key = f"celery-langfuse-test-pid-{uuid.uuid4().hex}"
    with worker_process(capture.env, "-P", "prefork", "-c", "1", tmp_path=tmp_path) as worker:
        with get_client().start_as_current_observation(name="request") as root:
            doomed = tasks_app.report_pid_and_sleep.apply_async((pid_key, 60), queue=worker.queue)
        sigkill_the_child_running(doomed, pid_key, worker)
        # The pool replaces the child; the new one traces as before.
        after = tasks_app.add.apply_async((1, 2), queue=worker.queue)
        assert after.get(timeout=20) == 3
        capture.wait_for(lambda s: s.trace(root.trace_id).find(name), timeout=20)
        capture.wait_for(lambda s: runs_of(s, {after.id}), timeout=20)
    flush_in_process()  # the request and its publish, made here

    trace = capture.trace(root.trace_id)
    lost = trace.find(name)
    assert lost.level == "ERROR"
    assert "the process running it died" in (lost.status_message or "")
    assert "WorkerLostError" in (lost.status_message or "")
    assert lost.metadata["task_id"] == doomed.id
    assert lost.parent_id == trace.find(f"publish {name}").id
    assert trace.orphans() == []
    assert runs_of(capture, {after.id})[after.id].output == 3


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_langfuse_unreachable_tasks_succeed_and_shutdown_meets_the_deadline(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    down = {
        **capture.env,
        "LANGFUSE_BASE_URL": f"http://127.0.0.1:{closed_port()}",
        "CELERY_LANGFUSE_TEST_FLUSH_TIMEOUT": "2",
    }
    with worker_process(down, "-P", "prefork", "-c", "2", tmp_path=tmp_path) as worker:
        results = [tasks_app.spawn_child.apply_async((i,), queue=worker.queue) for i in range(20)]
        children = [tasks_app.app.AsyncResult(r.get(timeout=30)) for r in results]
        assert [c.get(timeout=30) for c in children] == [i + 1 for i in range(20)]
        # Idle at SIGTERM: billiard alone can hold a busy child for 30 s at shutdown.
        shutdown_seconds = worker.stop()
    # two flush deadlines at most (children in parallel, then the main process) plus
    # Celery's own shutdown; an unbounded flush would retry exports for much longer.
    assert shutdown_seconds < 2 * 2 + 4, worker.log()


@pytest.mark.parametrize(
    ("status", "delay", "retry_after"),
    [(500, 0.0, None), (503, 0.0, None), (429, 0.0, 5.0), (200, 10.0, None)],
    ids=["500", "503", "429-retry-after", "slow-10s"],
)
def test_failing_or_slow_langfuse_never_fails_a_task_and_shutdown_meets_the_deadline(
    tasks_app: Any,
    capture: CaptureServer,
    tmp_path: Path,
    status: int,
    delay: float,
    retry_after: Optional[float],
) -> None:
    capture.set_response(status, delay=delay, retry_after=retry_after)
    env = {**capture.env, "CELERY_LANGFUSE_TEST_FLUSH_TIMEOUT": "2"}
    with worker_process(env, "-P", "prefork", "-c", "2", tmp_path=tmp_path) as worker:
        started = time.monotonic()
        results = [tasks_app.add.apply_async((i, i), queue=worker.queue) for i in range(40)]
        assert [r.get(timeout=30) for r in results] == [i + i for i in range(40)]
        elapsed = time.monotonic() - started
        capture.wait_for(lambda s: s.requests > 0, timeout=10)  # the exporters did try
        shutdown_seconds = worker.stop()
    # A healthy run of 40 tasks takes well under a second; a task waiting on an export
    # would take the export's 5 s timeout, or the 10 s delay.
    assert elapsed < 4, elapsed
    assert shutdown_seconds < 2 * 2 + 4, worker.log()
    assert "Traceback" not in worker.log(), worker.log()


def test_a_worker_whose_tasks_never_use_the_sdk_does_not_load_it(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    """Lean spans are sent without the SDK until something needs it (user or session
    ids to re-apply, media, cron scores, a client the tasks make): the worker's memory
    is then plain Celery's plus this library's."""
    with worker_process(capture.env, "-P", "prefork", "-c", "1", tmp_path=tmp_path) as worker:
        with get_client().start_as_current_observation(name="request") as root:
            result = tasks_app.sdk_loaded.apply_async(queue=worker.queue)
        assert result.get(timeout=20) is False
        capture.wait_for(
            lambda s: any(o.name == "tests.support.tasks.sdk_loaded" for o in s.observations),
            timeout=20,
        )
    flush_in_process()  # the request and its publish, made here
    trace = capture.trace(root.trace_id)
    run = trace.find("tests.support.tasks.sdk_loaded")
    assert trace.find("publish tests.support.tasks.sdk_loaded").id == run.parent_id
    assert run.metadata.get("task_id") == result.id
    assert trace.orphans() == []
