"""Redeliveries: with ``acks_late`` and ``task_reject_on_worker_lost``, a message whose
pool process died is delivered again. Celery reports no failure for a requeued run, so
the worker's main process records the earlier delivery when the message comes back,
and the new run says it is a redelivery, its attempt number, and which observation it
repeats: all in the caller's trace.

A real ``celery worker -P prefork`` whose child is SIGKILLed, real Redis, the capture
server.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from langfuse import get_client
from redis import Redis

from celery_langfuse.headers import read_redelivery, redelivery_value
from celery_langfuse.testing import CaptureServer
from tests.conftest import REDIS_URL, flush_in_process, worker_process
from tests.support.installed import support_app

pytestmark = pytest.mark.timeout(180)

DIES_ONCE = "tests.support.fanout_app.dies_once"


def test_a_run_whose_process_died_is_recorded_and_its_redelivery_marked_in_the_same_trace(
    capture: CaptureServer, tmp_path: Path
) -> None:
    key = f"fanout-dies-once-{uuid.uuid4().hex[:8]}"
    try:
        with support_app("fanout_app") as fanout_app, worker_process(
            capture.env, "-P", "prefork", "-c", "1", tmp_path=tmp_path,
            module="tests.support.fanout_app",
        ) as worker:
            with get_client().start_as_current_observation(name="request") as request:
                result = fanout_app.dies_once.apply_async((key,), queue=worker.queue)
            assert result.get(timeout=60) == 2
            capture.wait_for(
                lambda s: len([o for o in s.observations if o.name == DIES_ONCE]) >= 2,
                timeout=30,
            )
            log_text = worker.log()
    finally:
        Redis.from_url(REDIS_URL).delete(key)
    flush_in_process()
    assert "SIGKILL" in log_text or "signal 9" in log_text, log_text[-2000:]

    trace = capture.trace(request.trace_id)
    publish = trace.find(f"publish {DIES_ONCE}")
    earlier, rerun = sorted(trace.find_all(DIES_ONCE), key=lambda o: o.start_time)
    assert trace.orphans() == [], trace.tree()
    # The earlier delivery, recorded by the main process when the message came back.
    assert earlier.parent_id == publish.id
    assert earlier.level == "WARNING"
    assert "delivered again" in (earlier.status_message or "")
    assert (earlier.metadata["attempt"], earlier.metadata["task_id"]) == (1, result.id)
    # The redelivered run: same trace, same parent, linked to the earlier one.
    assert rerun.parent_id == publish.id
    assert rerun.metadata["redelivered"] is True
    assert rerun.metadata["attempt"] == 2
    assert rerun.metadata["lost_run_observation_id"] == earlier.id
    assert rerun.output == 2
    print(f"\n{trace.tree()}")


def test_the_redelivery_value_is_read_back_and_bad_ones_ignored() -> None:
    assert read_redelivery(redelivery_value(3, "ab" * 8)) == (3, "ab" * 8)
    assert read_redelivery(redelivery_value(2, None)) == (2, None)
    for bad in (None, 3, "x:y", "2:" + "z" * 16, "1" * 10 + ":"):
        assert read_redelivery(bad) is None


