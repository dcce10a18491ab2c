"""Real `celery worker -P prefork` subprocesses: traces survive forks, recycling,
warm shutdown, and an unreachable Langfuse."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest
from langfuse import get_client, propagate_attributes

from celery_langfuse.testing import CaptureServer
from tests.conftest import worker_process

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
        results = [tasks_app.slow.apply_async((0.5,), queue=worker.queue) for _ in range(2)]
        # SIGTERM while both runs are in flight: they finish, then the children exit.
        deadline = time.monotonic() + 10
        while "Task tests.support.tasks.slow" not in worker.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        worker.stop()
        ids = {r.id for r in results}
        assert all(r.get(timeout=10) == 0.5 for r in results)
    # Nothing is waited for here: the children flushed before they exited.
    assert len(runs_of(capture, ids)) == 2


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
    assert "giving up so shutdown is not delayed" in worker.log() or shutdown_seconds < 4
