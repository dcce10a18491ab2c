"""Sampling where a trace starts outside a worker: web requests and beat runs.

They are sampled by the rule of a task that starts a trace (trace-id ratio at
``sample_rate``, ``task_sample_rates``, ``sampler``); failures are kept; and the
decision travels with the messages they publish (W3C sampled flag plus
``x-langfuse-sampled: 0``), so the worker records nothing for a sampled-out trace but
its failures. Real Redis, a real worker (in-thread for the web, prefork for beat), real
``celery beat``, the capture server.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from celery import beat
from fastapi import FastAPI
from fastapi.testclient import TestClient
from redis import Redis

from celery_langfuse import SamplingContext, TracingConfig, _policy, install, uninstall
from celery_langfuse._policy import trace_id_sampled
from celery_langfuse.testing import CaptureServer
from celery_langfuse.web import LangfuseASGIMiddleware
from tests.conftest import REDIS_URL, beat_process, flush_in_process, worker_process
from tests.test_beat import (  # the in-process beat helpers
    InstalledApp,
    SchedulerWithItsOwnSend,
    _queued_headers,
    due_entry,
    installed,
    one_trace_named,
    started_beat,
)

__all__ = ["installed"]  # a fixture, used by name

pytestmark = pytest.mark.timeout(240)

PROBE = "tests.support.tasks.header_probe"
FAIL = "tests.support.tasks.fail"
ADD = "tests.support.tasks.add"


def web_app() -> FastAPI:
    from tests.support import tasks

    app = FastAPI(telemetry={"tracing": False})  # type: ignore[arg-type]

    @app.post("/probe")
    def probe() -> dict[str, str]:
        return {"task_id": tasks.header_probe.delay().id}

    @app.post("/enqueue-failure")
    def enqueue_failure() -> dict[str, str]:
        return {"task_id": tasks.fail.delay("from a sampled-out request").id}

    @app.get("/crash")
    def crash() -> None:
        raise RuntimeError("kaboom")

    @app.get("/ok/{n}")
    def ok(n: int) -> dict[str, int]:
        return {"n": n}

    app.add_middleware(LangfuseASGIMiddleware)
    return app


@pytest.fixture
def policy(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Set the process's sampling rule as ``install(app, **settings)`` of the first
    installed app would (``_policy.process_policy``)."""

    def use(**settings: Any) -> None:
        monkeypatch.setattr(_policy, "process_policy", TracingConfig(**settings).policy)

    return use


@pytest.fixture
def client(capture: CaptureServer) -> Iterator[TestClient]:
    with TestClient(web_app(), raise_server_exceptions=False) as test_client:
        yield test_client


def test_a_sampled_out_request_records_nothing_and_its_tasks_follow(
    running_worker: Any, policy: Any, client: TestClient, capture: CaptureServer
) -> None:
    from tests.support import tasks

    policy(sample_rate=0.0)
    task_id = client.post("/probe").json()["task_id"]
    received = tasks.app.AsyncResult(task_id).get(timeout=30)
    flush_in_process()
    time.sleep(0.5)  # the worker thread's observations, if any, are exported by now
    flush_in_process()

    assert received["x-langfuse-sampled"] == "0"
    assert [o.name for o in capture.observations] == []


def test_a_failed_request_of_a_sampled_out_trace_is_kept_as_its_root(
    policy: Any, client: TestClient, capture: CaptureServer
) -> None:
    policy(sample_rate=0.0)
    assert client.get("/ok/1").status_code == 200
    # Langfuse keeps milliseconds: a request started in this millisecond or later.
    sent = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(milliseconds=1)
    assert client.get("/crash").status_code == 500
    flush_in_process()
    capture.wait_for_observations(1, name="GET /crash", timeout=15)

    (request,) = capture.observations
    assert request.name == "GET /crash"
    assert request.level == "ERROR"
    assert request.status_message == "RuntimeError: kaboom"
    assert request.parent_id is None
    assert request.metadata["trace_sampled"] is False
    assert request.metadata["path"] == "/crash"
    assert request.output == {"status_code": 500}
    # Backdated to when the request began (a fast one may last under a millisecond).
    assert sent <= request.start_time <= request.end_time


def test_a_task_failing_in_a_sampled_out_request_trace_is_kept_in_that_trace(
    running_worker: Any, policy: Any, client: TestClient, capture: CaptureServer
) -> None:
    from tests.support import tasks

    policy(sample_rate=0.0)
    task_id = client.post("/enqueue-failure").json()["task_id"]
    with pytest.raises(ValueError):
        tasks.app.AsyncResult(task_id).get(timeout=30)
    flush_in_process()
    capture.wait_for_observations(1, name=FAIL, timeout=15)

    (run,) = capture.observations
    assert (run.name, run.level, run.parent_id) == (FAIL, "ERROR", None)
    assert run.metadata["trace_sampled"] is False
    assert run.metadata["task_id"] == task_id


def test_requests_are_sampled_by_their_trace_id_at_the_rate(
    policy: Any, client: TestClient, capture: CaptureServer
) -> None:
    policy(sample_rate=0.5)
    requests = 60
    for n in range(requests):
        assert client.get(f"/ok/{n}").status_code == 200
    flush_in_process()
    time.sleep(0.5)
    flush_in_process()

    kept = [o for o in capture.observations if o.name == "GET /ok/{n}"]
    # Binomial(60, 0.5): outside 13..47 with probability below 1e-5.
    assert 13 <= len(kept) <= 47, len(kept)
    for request in kept:
        assert trace_id_sampled(request.trace_id, 0.5)
        assert request.parent_id is None
    print(f"\nweb requests kept at sample_rate 0.5: {len(kept)}/{requests}")


def test_the_sampler_sees_web_requests_and_task_rates_match_method_and_path(
    policy: Any, client: TestClient, capture: CaptureServer
) -> None:
    seen: list[SamplingContext] = []

    def sampler(context: SamplingContext) -> bool:
        seen.append(context)
        return context.task_name.endswith("/3")

    policy(sampler=sampler, task_sample_rates={"GET /ok/1": 1.0})
    for n in range(4):
        client.get(f"/ok/{n}")
    flush_in_process()
    capture.wait_for_observations(2, name="GET /ok/{n}", timeout=15)

    assert sorted(o.output["status_code"] for o in capture.observations) == [200, 200]
    assert sorted(o.metadata["path"] for o in capture.observations) == ["/ok/1", "/ok/3"]
    # /ok/1 matched a rate pattern: the sampler is not asked about it.
    assert [(c.entry, c.task_name) for c in seen] == [
        ("web", "GET /ok/0"), ("web", "GET /ok/2"), ("web", "GET /ok/3")
    ]


def test_a_request_continuing_a_callers_trace_is_never_cut(
    policy: Any, client: TestClient, capture: CaptureServer
) -> None:
    policy(sample_rate=0.0)
    traceparent = f"00-{'ab' * 16}-{'cd' * 8}-01"
    assert client.get("/ok/9", headers={"traceparent": traceparent}).status_code == 200
    flush_in_process()
    capture.wait_for_observations(1, name="GET /ok/{n}", timeout=15)
    (request,) = capture.observations
    assert (request.trace_id, request.parent_id) == ("ab" * 16, "cd" * 8)


# -- beat --------------------------------------------------------------------------


def test_sampled_out_beat_runs_record_only_their_failures(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    queue = f"fanout-beat-{uuid.uuid4().hex[:8]}"
    env = {"CELERY_LANGFUSE_TEST_BEAT_ENTRIES": "tick,boom", "CELERY_LANGFUSE_SAMPLE_RATE": "0"}
    tick, boom = f"tick-{queue}", f"boom-{queue}"
    try:
        with beat_process(capture.env, queue=queue, env=env, tmp_path=tmp_path) as beat:
            with worker_process(capture.env, queue=queue, env=env, tmp_path=tmp_path) as worker:
                capture.wait_for(
                    lambda s: len([o for o in s.observations if o.name == FAIL]) >= 3
                    and re.search(rf"Task {ADD}\[[^\]]+\] succeeded", worker.log()),
                    timeout=60,
                )
            beat_log = beat.log()
    finally:
        keys = Redis.from_url(REDIS_URL)
        for key in keys.scan_iter(f"*{queue}*"):
            keys.delete(key)
    assert f"Sending due task {tick}" in beat_log

    names = {o.name for o in capture.observations}
    assert names == {FAIL}, names  # no cron roots, publishes, or successful runs
    failures = [o for o in capture.observations if o.name == FAIL]
    for run in failures:
        assert (run.level, run.parent_id) == ("ERROR", None)
        assert run.metadata["trace_sampled"] is False
        assert run.metadata["cron_entry"] == boom
        trace = capture.trace(run.trace_id)
        assert trace.orphans() == []
        assert [s.value for s in trace.scores if s.name == "cron_success"] == [0.0]
    # Scores only on traces Langfuse has: none for the successful, unrecorded runs.
    recorded = {run.trace_id for run in failures}
    assert {s.trace_id for s in capture.scores} <= recorded
    print(f"\nsampled-out beat runs: {len(failures)} failed runs kept, 0 successful recorded")



def test_a_sampled_out_beat_run_marks_its_message_and_records_nothing(
    installed: InstalledApp,
) -> None:
    app, queue, server = installed.app, installed.queue, installed.server
    seen: list[SamplingContext] = []

    def never(context: SamplingContext) -> bool:
        seen.append(context)
        return False

    uninstall(app)
    install(app, sampler=never)
    entry = f"sampled-out-{queue}"
    with started_beat(app, beat.Scheduler) as service:
        scheduler = service.scheduler
        scheduler.apply_entry(due_entry(app, entry), producer=scheduler.producer)
    flush_in_process()
    message_headers = _queued_headers(queue)
    assert message_headers["x-langfuse-sampled"] == "0"
    assert message_headers["traceparent"].endswith("-00")
    assert message_headers["x-langfuse-cron-entry"] == entry
    assert [(c.entry, c.task_name, tuple(c.args)) for c in seen] == [("beat", ADD, (1, 2))]
    assert server.observations == []


def test_a_sampled_out_beat_run_that_could_not_be_sent_is_kept(
    installed: InstalledApp,
) -> None:
    app, queue, server = installed.app, installed.queue, installed.server
    uninstall(app)
    install(app, sample_rate=0.0)
    entry = f"broken-{queue}"
    with started_beat(app, SchedulerWithItsOwnSend) as service:
        scheduler = service.scheduler
        scheduler.apply_entry(due_entry(app, entry), producer=scheduler.producer)  # logs, no raise
    server.wait_for(lambda s: one_trace_named(s, entry).scores)
    [trace] = [t for t in server.traces() if t.name == entry]
    root = trace.find(f"cron {entry}")
    assert root.level == "ERROR" and "broker down" in (root.status_message or "")
    assert root.parent_id is None and root.metadata["trace_sampled"] is False
    assert [s.value for s in trace.scores if s.name == "cron_success"] == [0.0]
