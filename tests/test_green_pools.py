"""gevent and eventlet worker pools (real subprocesses): runs are concurrent greenlets
in one thread, and each still closes in its own trace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langfuse import get_client, propagate_attributes

from celery_langfuse.testing import CaptureServer
from tests.conftest import flush_in_process, worker_process

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
def test_green_pool_runs_nest_in_the_producers_trace(
    pool: str, tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    with worker_process(capture.env, "-P", pool, "-c", "10", tmp_path=tmp_path) as worker:
        with get_client().start_as_current_observation(name="request") as root:
            with propagate_attributes(user_id="green-user"):
                results = [
                    tasks_app.spawn_child.apply_async((i,), queue=worker.queue) for i in range(10)
                ]
                results.append(tasks_app.slow.apply_async((0.2,), queue=worker.queue))
                results.append(
                    tasks_app.flaky.apply_async(kwargs={"succeed_on": 1}, queue=worker.queue)
                )
        for result in results:
            result.get(timeout=30)

        def complete(server: CaptureServer) -> bool:
            trace = server.trace(root.trace_id)
            return (
                len(trace.find_all("tests.support.tasks.add")) == 10
                and len(trace.find_all("tests.support.tasks.flaky")) == 2
                and bool(trace.find("request"))
            )

        capture.wait_for(complete, timeout=20)
        log = worker.log()
    flush_in_process()  # the publishes, made here

    trace = capture.trace(root.trace_id)
    assert trace.orphans() == []
    runs = [o for o in trace.observations if o.name.startswith("tests.support.tasks.")]
    assert {o.user_id for o in runs} == {"green-user"}
    assert [o.level for o in trace.find_all("tests.support.tasks.flaky")] == ["WARNING", "DEFAULT"]
    # each spawned add is the grandchild of its own spawn_child run, not a sibling's
    by_id = {o.id: o for o in trace.observations}
    for add in trace.find_all("tests.support.tasks.add"):
        spawner = by_id[by_id[add.parent_id].parent_id]
        assert spawner.name == "tests.support.tasks.spawn_child"
        assert spawner.output == add.metadata["task_id"]
    assert "Failed to detach context" not in log
