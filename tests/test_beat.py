"""The cron layer: each run of a beat schedule entry is its own root trace.

Real ``celery beat`` and ``celery worker`` subprocesses on the real Redis, exporting
to the capture server, plus in-process checks of the scheduler wrap.
"""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, beat, signals
from redis import Redis

from celery_langfuse import Installation, TraceAttributes, extract, inject, install, uninstall
from celery_langfuse.headers import CRON_DUE_AT, CRON_ENTRY, CronRun
from celery_langfuse.testing import CaptureServer, Observation, Score, Trace
from tests.conftest import (
    REDIS_URL,
    beat_process,
    flush_in_process,
    in_thread_worker,
    require_redis,
    worker_process,
)

ADD = "tests.support.tasks.add"
FAIL = "tests.support.tasks.fail"


def entry_name(kind: str, queue: str) -> str:
    return f"{kind}-{queue}"


def new_queue() -> str:
    return f"beat-{uuid.uuid4().hex[:8]}"


def cron_traces(server: CaptureServer, entry: str, task: str) -> list[Trace]:
    """Traces of ``entry`` whose root, publish and worker run all arrived (beat sends
    its root and its publish on different exporters' timers), oldest first."""
    complete = [
        trace
        for trace in server.traces()
        if trace.name == entry
        and trace.find_all(f"cron {entry}")
        and trace.find_all(f"publish {task}")
        and trace.find_all(task)
        and {score.name for score in trace.scores} >= {"cron_success"}
    ]
    return sorted(complete, key=lambda trace: trace.find(f"cron {entry}").start_time)


def ancestors(trace: Trace, observation: Observation) -> list[str]:
    by_id = {obs.id: obs for obs in trace.observations}
    names = []
    parent = by_id.get(observation.parent_id or "")
    while parent is not None:
        names.append(parent.name)
        parent = by_id.get(parent.parent_id or "")
    return names


def score(trace: Trace, name: str) -> Any:
    values = [score.value for score in trace.scores if score.name == name]
    assert len(values) == 1, f"expected one {name} score:\n{trace.tree()}"
    return values[0]


def assert_is_cron_trace(trace: Trace, entry: str, task: str) -> None:
    """One root 'cron <entry>' in the beat process, the worker run below it, no orphans."""
    assert trace.name == entry
    assert "celery-beat" in trace.tags
    assert [root.name for root in trace.root_observations()] == [f"cron {entry}"], trace.tree()
    assert trace.orphans() == [], trace.tree()
    assert ancestors(trace, trace.find(task))[-1] == f"cron {entry}", trace.tree()


# -- standalone beat + prefork worker, default PersistentScheduler ---------------------

WORKER_DELAY = 1.5  # seconds beat runs alone, so its first messages wait in the queue


@pytest.fixture(scope="module")
def cron_session(
    langfuse_capture: CaptureServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[Trace]]:
    """``tick`` (succeeds) and ``boom`` (fails) every second, the worker starting late.

    Returns the complete traces of each entry, oldest first.
    """
    require_redis()
    server = langfuse_capture
    queue = new_queue()
    tick, boom = entry_name("tick", queue), entry_name("boom", queue)
    tmp_path = tmp_path_factory.mktemp("cron")
    env = {"CELERY_LANGFUSE_TEST_BEAT_ENTRIES": "tick,boom"}
    try:
        with beat_process(server.env, queue=queue, env=env, tmp_path=tmp_path) as beat_proc:
            _wait_until(lambda: f"Sending due task {tick}" in beat_proc.log(), "beat to send")
            time.sleep(WORKER_DELAY)
            with worker_process(server.env, queue=queue, env=env, tmp_path=tmp_path):
                server.wait_for(
                    lambda s: len(cron_traces(s, tick, ADD)) >= 3 and cron_traces(s, boom, FAIL),
                    timeout=20,
                )
    finally:
        _delete_keys(f"*{queue}*")
    return {"tick": cron_traces(server, tick, ADD), "boom": cron_traces(server, boom, FAIL)}


def test_each_run_of_an_entry_is_its_own_root_trace(cron_session: dict[str, list[Trace]]) -> None:
    runs = cron_session["tick"]
    assert len({trace.id for trace in runs}) == len(runs) >= 3
    for trace in runs:
        entry = trace.name or ""
        assert entry.startswith("tick-")
        assert_is_cron_trace(trace, entry, ADD)
        assert [obs.name for obs in trace.observations] == [
            f"cron {entry}", f"publish {ADD}", ADD
        ], trace.tree()


def test_the_root_observation_describes_the_run(cron_session: dict[str, list[Trace]]) -> None:
    first, second = cron_session["tick"][:2]
    roots = [trace.find(f"cron {trace.name}") for trace in (first, second)]
    for trace, root in zip((first, second), roots):
        metadata = root.metadata
        assert metadata["cron_entry"] == trace.name
        assert metadata["task"] == ADD
        assert metadata["schedule"] == "every 1.00 second"
        assert metadata["beat_host"] == socket.gethostname()
        assert metadata["scheduler"] == "PersistentScheduler"
        due, sent = (datetime.fromisoformat(metadata[key]) for key in ("due_at", "sent_at"))
        assert timedelta(0) <= sent - due < timedelta(seconds=1)
        lateness = (sent - due).total_seconds()
        assert metadata["lateness_seconds"] == pytest.approx(lateness, abs=0.002)
        assert trace.input == {"args": [2, 3], "kwargs": {}}
    assert [root.metadata["run_count"] for root in roots] == [1, 2]
    assert roots[1].metadata["due_at"] > roots[0].metadata["due_at"]


def test_a_successful_run_scores_cron_success_1(cron_session: dict[str, list[Trace]]) -> None:
    for trace in cron_session["tick"]:
        assert score(trace, "cron_success") == 1
        assert trace.find(ADD).level == "DEFAULT"


def test_a_failing_run_scores_cron_success_0_and_is_an_error(
    cron_session: dict[str, list[Trace]],
) -> None:
    trace = cron_session["boom"][0]
    assert_is_cron_trace(trace, trace.name or "", FAIL)
    run = trace.find(FAIL)
    assert run.level == "ERROR"
    assert "cron boom" in (run.status_message or "")
    assert score(trace, "cron_success") == 0
    [success] = [s for s in trace.scores if s.name == "cron_success"]
    assert success.trace_id == trace.id and "cron boom" in (success.comment or "")


def test_lateness_counts_from_the_due_time_to_the_worker_start(
    cron_session: dict[str, list[Trace]],
) -> None:
    # The first run waited in the queue while no worker was running; the last
    # one was picked up by a worker that was already there.
    first, last = cron_session["tick"][0], cron_session["tick"][-1]
    assert score(first, "cron_lateness_seconds") >= WORKER_DELAY
    assert first.find(ADD).metadata["cron_lateness_seconds"] >= WORKER_DELAY
    assert 0 <= score(last, "cron_lateness_seconds") < 1.0


# -- the worker side of a cron run, from messages shaped as beat sends them ---------------


def beat_headers(entry: str, due_at: float) -> dict[str, str]:
    message_headers: dict[str, Any] = {}
    inject(message_headers, parent=None, attributes=TraceAttributes(), cron=CronRun(entry, due_at))
    return {name: value for name, value in message_headers.items() if "cron" in name}


def scores_of(server: CaptureServer, entry: str) -> list[tuple[str, Any]]:
    """(name, value) of the scores recorded for ``entry``'s runs, sorted."""
    return sorted((sc.name, sc.value) for sc in entry_scores(server, entry))


def entry_scores(server: CaptureServer, entry: str) -> list[Score]:
    return [sc for sc in server.scores if (sc.metadata or {}).get("cron_entry") == entry]


def test_a_retried_cron_run_scores_its_outcome_once_when_it_ends(
    tasks_app: Any, langfuse_capture_clean: CaptureServer
) -> None:
    server, entry = langfuse_capture_clean, f"retried-{uuid.uuid4().hex[:8]}"
    with in_thread_worker(tasks_app.app):
        result = tasks_app.flaky.apply_async((1,), headers=beat_headers(entry, time.time() - 5))
        assert result.get(timeout=10) == 1
    flush_in_process()
    server.wait_for(lambda s: len(scores_of(s, entry)) >= 2)
    (lateness_name, lateness), success = scores_of(server, entry)
    # Lateness from the first attempt only; success from the attempt that ended the run.
    assert lateness_name == "cron_lateness_seconds" and 5 <= lateness < 7
    assert success == ("cron_success", 1)


def test_a_cron_run_that_expired_in_the_queue_scores_cron_success_0(
    tasks_app: Any, langfuse_capture_clean: CaptureServer
) -> None:
    server, entry = langfuse_capture_clean, f"expired-{uuid.uuid4().hex[:8]}"
    tasks_app.add.apply_async(
        (1, 2), expires=datetime.now(timezone.utc) - timedelta(seconds=1),
        headers=beat_headers(entry, time.time()),
    )
    with in_thread_worker(tasks_app.app):
        server.wait_for(lambda s: scores_of(s, entry))
    [(name, value)] = scores_of(server, entry)
    assert (name, value) == ("cron_success", 0)
    [success] = entry_scores(server, entry)
    assert "expired" in (success.comment or "")


@pytest.mark.parametrize(
    ("message_headers", "expected"),
    [
        ({CRON_ENTRY: "nightly", CRON_DUE_AT: "1700000000.25"}, CronRun("nightly", 1700000000.25)),
        ({CRON_ENTRY: "nightly", CRON_DUE_AT: "soon"}, CronRun("nightly", None)),
        ({CRON_ENTRY: "nightly", CRON_DUE_AT: "nan"}, CronRun("nightly", None)),
        ({CRON_ENTRY: "nightly", CRON_DUE_AT: "-5"}, CronRun("nightly", None)),
        ({CRON_ENTRY: "x" * 201, CRON_DUE_AT: "1700000000"}, None),
        ({CRON_ENTRY: 42}, None),
        ({CRON_ENTRY: ""}, None),
        ({CRON_DUE_AT: "1700000000"}, None),
        ({}, None),
    ],
)
def test_cron_headers_are_validated_and_bad_ones_dropped(
    message_headers: dict[str, Any], expected: CronRun | None
) -> None:
    assert extract(message_headers).cron == expected


# -- other schedulers and ways to run beat ----------------------------------------------


def test_redbeat_runs_are_root_traces(
    langfuse_capture_clean: CaptureServer, tmp_path: Path
) -> None:
    require_redis()
    server, queue = langfuse_capture_clean, new_queue()
    tick = entry_name("tick", queue)
    redbeat = ("-S", "redbeat.RedBeatScheduler")
    try:
        with worker_process(
            server.env, queue=queue, module="tests.support.beat_app", tmp_path=tmp_path
        ), beat_process(server.env, *redbeat, queue=queue, tmp_path=tmp_path):
            server.wait_for(lambda s: len(cron_traces(s, tick, ADD)) >= 2, timeout=20)
    finally:
        _delete_keys(f"*{queue}*")
    first, second = cron_traces(server, tick, ADD)[:2]
    for trace in (first, second):
        assert_is_cron_trace(trace, tick, ADD)
        assert trace.find(f"cron {tick}").metadata["scheduler"] == "RedBeatScheduler"
        assert score(trace, "cron_success") == 1
    # RedBeat stores no last run for a new entry ("due now"): lateness from the second on.
    assert 0 <= score(second, "cron_lateness_seconds") < 1.0


def test_beat_embedded_in_a_worker_traces_its_runs_and_sends_them_at_once(
    langfuse_capture_clean: CaptureServer, tmp_path: Path
) -> None:
    require_redis()
    server, queue = langfuse_capture_clean, new_queue()
    tick = entry_name("tick", queue)
    # A long export interval: beat embedded in a worker is ended by SIGTERM and leaves
    # without exit hooks, so each run's root must be sent right away, not batched.
    try:
        with worker_process(
            server.env, "-B", "-s", str(tmp_path / "schedule"), queue=queue,
            module="tests.support.beat_app", env={"LANGFUSE_FLUSH_INTERVAL": "30"},
            tmp_path=tmp_path,
        ) as worker:
            # The roots come from beat at once; the runs only at shutdown: wait until
            # the worker ran two, or SIGTERM could leave a sent message unrun.
            server.wait_for(
                lambda s: len(roots_of(s, tick)) >= 2
                and len(re.findall(rf"Task {ADD}\[[^\]]+\] succeeded", worker.log())) >= 2,
                timeout=30,
            )
    finally:
        _delete_keys(f"*{queue}*")
    # The worker's own runs are flushed when its processes shut down.
    server.wait_for(lambda s: len(cron_traces(s, tick, ADD)) >= 2, timeout=10)
    for trace in cron_traces(server, tick, ADD)[:2]:
        assert_is_cron_trace(trace, tick, ADD)
        assert score(trace, "cron_success") == 1
        assert score(trace, "cron_lateness_seconds") < 1.0


def one_trace_named(server: CaptureServer, name: str) -> Trace:
    """The one trace called ``name``, with its ``cron <name>`` root already received."""
    [trace] = [trace for trace in server.traces() if trace.name == name]
    trace.find(f"cron {name}")
    return trace


def roots_of(server: CaptureServer, entry: str) -> list[Observation]:
    return [obs for obs in server.observations if obs.name == f"cron {entry}"]


def test_unreachable_langfuse_does_not_change_the_schedule_nor_delay_shutdown(
    tmp_path: Path,
) -> None:
    """A traced beat exporting to a closed port sends as many runs as an untraced
    beat in the same window, and stops within the flush deadline."""
    require_redis()
    flush_timeout = 1.0
    unreachable = {
        "LANGFUSE_BASE_URL": f"http://127.0.0.1:{_closed_port()}",
        "LANGFUSE_PUBLIC_KEY": "pk-lf-test",
        "LANGFUSE_SECRET_KEY": "sk-lf-test",
        "LANGFUSE_FLUSH_INTERVAL": "0.1",
        "CELERY_LANGFUSE_TEST_FLUSH_TIMEOUT": str(flush_timeout),
    }
    traced_queue, untraced_queue = new_queue(), new_queue()
    queues = (traced_queue, untraced_queue)
    window = 4.0
    try:
        with beat_process(unreachable, queue=traced_queue, tmp_path=tmp_path) as traced, \
                beat_process(
                    unreachable, queue=untraced_queue, tmp_path=tmp_path,
                    env={"CELERY_LANGFUSE_TEST_BEAT_TRACING": "off"},
                ):
            # The same window for both, once both are sending (they start one by one).
            _wait_until(lambda: all(_queued(queue) for queue in queues), "both beats to send")
            before = {queue: _queued(queue) for queue in queues}
            time.sleep(window)
            sent = {queue: _queued(queue) - before[queue] for queue in queues}
            stop_seconds = traced.stop()
    finally:
        _delete_keys(*(f"*{queue}*" for queue in queues))
    assert sent[traced_queue] >= window - 1, sent
    assert abs(sent[traced_queue] - sent[untraced_queue]) <= 1, sent
    assert stop_seconds < flush_timeout + 1.5, f"beat took {stop_seconds:.2f} s to stop"


# -- the scheduler wrap, in process --------------------------------------------------------


@dataclass
class InstalledApp:
    app: Celery
    installation: Installation
    queue: str
    server: CaptureServer


@pytest.fixture
def installed(langfuse_capture_clean: CaptureServer, tmp_path: Path) -> Iterator[InstalledApp]:
    """A fresh app on the real Redis, installed, sending to a queue of its own."""
    require_redis()
    queue = new_queue()
    app = Celery(f"beat-test-{queue}", broker=REDIS_URL, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        beat_schedule={},
        beat_schedule_filename=str(tmp_path / "schedule"),
        task_publish_retry=False,
    )
    try:
        yield InstalledApp(app, install(app), queue, langfuse_capture_clean)
    finally:
        uninstall(app)
        _delete_keys(f"*{queue}*")


class SchedulerWithItsOwnSend(beat.Scheduler):
    """A third-party scheduler that overrides the send (as celery-redbeat does)."""

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kw: Any) -> Any:
        if entry.name.startswith("stopping"):
            raise SystemExit(1)  # what billiard's SIGTERM handler raises in beat
        if entry.name.startswith("broken-leaky"):
            raise beat.SchedulingError(f"Couldn't apply {entry.name}: auth failed password=hunter2")
        if entry.name.startswith("broken"):
            raise beat.SchedulingError(f"Couldn't apply scheduled task {entry.name}: broker down")
        return super().apply_async(entry, producer=producer, advance=advance, **kw)


@contextmanager
def started_beat(app: Any, scheduler_cls: type[beat.Scheduler]) -> Iterator[beat.Service]:
    """A beat service that sent ``beat_init``, as ``celery beat`` does on start."""
    service = beat.Service(app, scheduler_cls=scheduler_cls)
    signals.beat_init.send(sender=service)
    try:
        yield service
    finally:
        service.scheduler.close()


def due_entry(app: Any, name: str, overdue: float = 2.0) -> beat.ScheduleEntry:
    """An entry running every 30 s whose run has been due for ``overdue`` seconds."""
    return beat.ScheduleEntry(
        name=name, task=ADD, schedule=timedelta(seconds=30), args=(1, 2), app=app,
        last_run_at=app.now() - timedelta(seconds=30 + overdue),
    )


def test_a_third_party_scheduler_is_traced_and_its_message_names_the_run(
    installed: InstalledApp,
) -> None:
    app, queue, server = installed.app, installed.queue, installed.server
    entry = f"nightly-{queue}"
    before = time.time()
    with started_beat(app, SchedulerWithItsOwnSend) as service:
        scheduler = service.scheduler
        scheduler.apply_entry(due_entry(app, entry), producer=scheduler.producer)
    server.wait_for(lambda s: one_trace_named(s, entry).find(f"publish {ADD}"))
    [trace] = [t for t in server.traces() if t.name == entry]
    assert [obs.name for obs in trace.observations] == [f"cron {entry}", f"publish {ADD}"]
    assert trace.orphans() == [] and "celery-beat" in trace.tags
    assert trace.find(f"cron {entry}").metadata["scheduler"] == "SchedulerWithItsOwnSend"
    message_headers = _queued_headers(queue)
    assert message_headers["x-langfuse-cron-entry"] == entry
    assert message_headers["x-langfuse-trace-id"] == trace.id
    assert message_headers["celery_beat_task"] is True
    due_at = float(message_headers["x-langfuse-cron-due-at"])
    assert before - 2.5 < due_at < before - 1.5


def test_a_run_that_could_not_be_sent_is_an_error_scored_0(
    installed: InstalledApp,
) -> None:
    app, queue, server = installed.app, installed.queue, installed.server
    entry = f"broken-{queue}"
    with started_beat(app, SchedulerWithItsOwnSend) as service:
        scheduler = service.scheduler
        scheduler.apply_entry(due_entry(app, entry), producer=scheduler.producer)  # logs, no raise
    server.wait_for(lambda s: one_trace_named(s, entry).scores)
    [trace] = [t for t in server.traces() if t.name == entry]
    root = trace.find(f"cron {entry}")
    assert root.level == "ERROR" and "broker down" in (root.status_message or "")
    assert score(trace, "cron_success") == 0
    assert _queued(queue) == 0


def test_an_entry_whose_task_is_not_traced_sends_nothing_to_langfuse(
    installed: InstalledApp,
) -> None:
    app, queue, server = installed.app, installed.queue, installed.server
    installed.installation.beat.is_traced = lambda task_name: task_name != ADD
    with started_beat(app, beat.Scheduler) as service:
        scheduler = service.scheduler
        scheduler.apply_entry(due_entry(app, f"quiet-{queue}"), producer=scheduler.producer)
    flush_in_process()
    assert _queued(queue) == 1
    assert "x-langfuse-cron-entry" not in _queued_headers(queue)
    assert [t.name for t in server.traces()] == []


def test_an_entry_whose_task_is_excluded_by_configuration_sends_nothing_to_langfuse(
    installed: InstalledApp,
) -> None:
    app, queue, server = installed.app, installed.queue, installed.server
    uninstall(app)
    install(app, exclude_tasks=["celery.*", ADD])
    with started_beat(app, beat.Scheduler) as service:
        scheduler = service.scheduler
        scheduler.apply_entry(due_entry(app, f"excluded-{queue}"), producer=scheduler.producer)
    flush_in_process()
    assert _queued(queue) == 1
    assert "x-langfuse-cron-entry" not in _queued_headers(queue)
    assert [t.name for t in server.traces()] == []


# -- beat's input follows the capture policy of a run of its task -------------------


def test_a_real_beat_captures_entry_arguments_with_the_installations_redact_keys(
    langfuse_capture_clean: CaptureServer, tmp_path: Path
) -> None:
    """``redact_keys`` set in beat's environment masks a key of the entry's kwargs, as
    it does for the worker's runs."""
    require_redis()
    server, queue = langfuse_capture_clean, new_queue()
    secret = entry_name("secret", queue)
    env = {
        "CELERY_LANGFUSE_TEST_BEAT_ENTRIES": "secret",
        "CELERY_LANGFUSE_REDACT_KEYS": "customer_ref",
    }
    try:
        with beat_process(server.env, queue=queue, env=env, tmp_path=tmp_path) as beat_proc:
            _wait_until(lambda: f"Sending due task {secret}" in beat_proc.log(), "beat to send")
            # While beat runs: it logs "Sending due task" before the send, so a SIGTERM
            # right after the line could stop it before the run's root ended.
            server.wait_for(lambda s: roots_of(s, secret), timeout=20)
    finally:
        _delete_keys(f"*{queue}*")
    for root in roots_of(server, secret):
        assert root.input == {
            "args": ["plain"],
            "kwargs": {"customer_ref": "[REDACTED]", "note": "kept"},
        }, root.input


def _entry_with_kwargs(app: Any, name: str, task: str = ADD) -> beat.ScheduleEntry:
    return beat.ScheduleEntry(
        name=name, task=task, schedule=timedelta(seconds=30), args=(1,),
        kwargs={"customer_ref": "cust-4711", "y": 2}, app=app,
        last_run_at=app.now() - timedelta(seconds=32),
    )


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"redact_keys": ["customer_ref"]},
         {"args": [1], "kwargs": {"customer_ref": "[REDACTED]", "y": 2}}),
        ({"mask": lambda value: "masked"}, {"args": "masked", "kwargs": "masked"}),
        ({"capture_exclude_tasks": [ADD]}, None),
        ({"capture_input": False}, None),
    ],
    ids=["redact_keys", "mask", "capture_exclude_tasks", "capture_input"],
)
def test_beat_input_follows_the_installations_capture_policy(
    installed: InstalledApp, options: dict[str, Any], expected: Any
) -> None:
    app, queue, server = installed.app, installed.queue, installed.server
    uninstall(app)
    install(app, **options)
    entry = f"policy-{queue}"
    with started_beat(app, beat.Scheduler) as service:
        scheduler = service.scheduler
        scheduler.apply_entry(_entry_with_kwargs(app, entry), producer=scheduler.producer)
    flush_in_process()
    server.wait_for(lambda s: roots_of(s, entry))
    [root] = roots_of(server, entry)
    assert root.input == expected


def test_beat_input_is_not_captured_for_a_task_that_opts_out(installed: InstalledApp) -> None:
    app, queue, server = installed.app, installed.queue, installed.server
    quiet = f"beat-test-quiet-{queue}"

    @app.task(name=quiet, langfuse_capture=False)
    def quiet_task(*args: Any, **kwargs: Any) -> None:
        pass

    entry = f"optout-{queue}"
    with started_beat(app, beat.Scheduler) as service:
        scheduler = service.scheduler
        scheduler.apply_entry(_entry_with_kwargs(app, entry, quiet), producer=scheduler.producer)
    flush_in_process()
    server.wait_for(lambda s: roots_of(s, entry))
    [root] = roots_of(server, entry)
    assert root.input is None


def test_the_status_of_a_run_that_could_not_be_sent_is_scrubbed(installed: InstalledApp) -> None:
    app, queue, server = installed.app, installed.queue, installed.server
    entry = f"broken-leaky-{queue}"
    with started_beat(app, SchedulerWithItsOwnSend) as service:
        scheduler = service.scheduler
        scheduler.apply_entry(due_entry(app, entry), producer=scheduler.producer)
    flush_in_process()
    server.wait_for(lambda s: roots_of(s, entry))
    [root] = roots_of(server, entry)
    assert root.level == "ERROR"
    assert "hunter2" not in (root.status_message or "")
    assert "password=[REDACTED]" in (root.status_message or ""), root.status_message


def test_a_send_interrupted_by_beat_stopping_is_marked_and_not_scored(
    installed: InstalledApp,
) -> None:
    app, queue, server = installed.app, installed.queue, installed.server
    entry = f"stopping-{queue}"
    with started_beat(app, SchedulerWithItsOwnSend) as service, pytest.raises(SystemExit):
        scheduler = service.scheduler
        scheduler.apply_entry(due_entry(app, entry), producer=scheduler.producer)
    flush_in_process()
    server.wait_for(lambda s: roots_of(s, entry))
    [root] = roots_of(server, entry)
    assert (root.level, root.status_message) == (
        "WARNING", "interrupted: beat stopped while sending (SystemExit)"
    )
    assert [t.scores for t in server.traces() if t.name == entry] == [[]]


def test_wrapping_is_idempotent_and_undone_by_uninstall(
    installed: InstalledApp,
) -> None:
    app, installation = installed.app, installed.installation
    with started_beat(app, beat.PersistentScheduler) as service:
        scheduler = service.scheduler
        wrapped = scheduler.apply_async
        assert "apply_async" in vars(scheduler)
        # Embedded beat sends both signals; a second wrap must not nest.
        signals.beat_embedded_init.send(sender=service)
        installation.beat.wrap(scheduler)
        assert scheduler.apply_async is wrapped
        uninstall(app)
        assert "apply_async" not in vars(scheduler)


def _wait_until(condition: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _queued(queue: str) -> int:
    return int(Redis.from_url(REDIS_URL).llen(queue))


def _delete_keys(*patterns: str) -> None:
    """Delete a test's queue, kombu bindings and celery-redbeat keys."""
    redis = Redis.from_url(REDIS_URL)
    for pattern in patterns:
        keys = list(redis.scan_iter(pattern))
        if keys:
            redis.delete(*keys)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _queued_headers(queue: str) -> dict[str, Any]:
    raw = Redis.from_url(REDIS_URL).lindex(queue, 0)
    assert raw is not None, f"no message in {queue}"
    headers: dict[str, Any] = json.loads(raw)["headers"]
    return headers
