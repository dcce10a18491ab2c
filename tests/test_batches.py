"""celery-batches: one run for many messages, traced as one batch run, and each
message's own trace told which batch processed it.

A ``Batches`` task runs once for a list of messages, with a fresh task id and no
request headers: without this, the run is an orphan trace and every message's user and
session are lost. Real Redis, a real ``celery worker -P prefork``, the capture server.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from langfuse import get_client, propagate_attributes

from celery_langfuse.testing import CaptureServer
from tests.conftest import flush_in_process, worker_process
from tests.support.installed import support_app

pytestmark = pytest.mark.timeout(180)

COUNT_WORDS = "tests.support.batch_app.count_words"
MESSAGES = 100


def test_a_batch_of_100_messages_is_one_run_and_each_message_trace_names_it(
    capture: CaptureServer, tmp_path: Path
) -> None:
    with support_app("batch_app") as batch_app, worker_process(
        capture.env, "-P", "prefork", "-c", "1", tmp_path=tmp_path,
        module="tests.support.batch_app",
    ) as worker:
        traces = []
        results = []
        for i in range(MESSAGES):
            with get_client().start_as_current_observation(name=f"request {i}") as request:
                with propagate_attributes(user_id=f"user-{i}", session_id="s-batch"):
                    results.append(
                        batch_app.count_words.apply_async((f"one two {i}",), queue=worker.queue)
                    )
            traces.append(request.trace_id)
        assert [r.get(timeout=60) for r in results] == [3] * MESSAGES
        capture.wait_for(
            lambda s: len([o for o in s.observations if o.name == COUNT_WORDS]) >= MESSAGES + 1,
            timeout=60,
        )
    flush_in_process()

    batch_runs = [
        o for o in capture.observations if o.name == COUNT_WORDS and "batch_size" in o.metadata
    ]
    assert sum(run.metadata["batch_size"] for run in batch_runs) == MESSAGES
    for run in batch_runs:
        assert run.parent_id is None  # its own trace: one run for many messages
        assert capture.trace(run.trace_id).orphans() == []
    batch_by_id = {run.id: run for run in batch_runs}

    for i, (trace_id, result) in enumerate(zip(traces, results)):
        trace = capture.trace(trace_id)
        assert trace.orphans() == [], trace.tree()
        (message,) = trace.find_all(COUNT_WORDS)
        assert message.parent_id == trace.find(f"publish {COUNT_WORDS}").id
        assert (message.user_id, message.session_id) == (f"user-{i}", "s-batch")
        assert message.metadata["task_id"] == result.id
        batch = batch_by_id[message.metadata["batch_observation_id"]]
        assert message.metadata["batch_trace_id"] == batch.trace_id
        assert message.metadata["batch_trace_url"].endswith(
            f"/project/proj-batches/traces/{batch.trace_id}"
        )
        assert result.id in str(batch.input["args"])  # the batch run shows its messages
    print(
        f"\ncelery-batches: {MESSAGES} messages, {len(batch_runs)} batch run(s) "
        f"(sizes {[r.metadata['batch_size'] for r in batch_runs]}), "
        f"{MESSAGES} message traces each naming its batch"
    )
