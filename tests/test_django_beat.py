"""django-celery-beat's DatabaseScheduler: each run of a PeriodicTask is its own trace.

Real ``celery beat -S django_celery_beat.schedulers:DatabaseScheduler`` and a real
prefork ``celery worker`` subprocess, both on the tests' Django project, with the
schedule in the real PostgreSQL and results stored by django-celery-results there too;
the real SDK in each process exports to the capture server.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from celery_langfuse.testing import CaptureServer, Trace
from tests.conftest import beat_process, worker_process
from tests.support.django_harness.fixtures import django_site
from tests.test_beat import assert_is_cron_trace, cron_traces, score

__all__ = ["django_site"]

TICK = "shop.tick"
SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
MODULE = "tests.support.django_site"

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def schedule(django_site: Any) -> dict[str, str]:
    """An interval entry (every second) and a crontab entry (every minute, last run 90 s
    ago so it is due at once), alone in the database's schedule."""
    from django.utils import timezone
    from django_celery_beat.models import (
        CrontabSchedule,
        IntervalSchedule,
        PeriodicTask,
        PeriodicTasks,
    )

    PeriodicTask.objects.all().delete()
    suffix = uuid.uuid4().hex[:6]
    every_second, _ = IntervalSchedule.objects.get_or_create(
        every=1, period=IntervalSchedule.SECONDS
    )
    every_minute, _ = CrontabSchedule.objects.get_or_create(
        minute="*", hour="*", day_of_week="*", day_of_month="*", month_of_year="*", timezone="UTC"
    )
    names = {"interval": f"interval-{suffix}", "crontab": f"crontab-{suffix}"}
    PeriodicTask.objects.create(
        name=names["interval"], task=TICK, interval=every_second, args=json.dumps(["interval"])
    )
    PeriodicTask.objects.create(
        name=names["crontab"],
        task=TICK,
        crontab=every_minute,
        args=json.dumps(["crontab"]),
        last_run_at=timezone.now() - timedelta(seconds=90),
    )
    PeriodicTasks.update_changed()
    return names


@pytest.fixture(scope="module")
def beat_and_worker(
    langfuse_capture: CaptureServer,
    schedule: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    queue = f"django-beat-{uuid.uuid4().hex[:8]}"
    tmp_path: Path = tmp_path_factory.mktemp("django-beat")
    env = langfuse_capture.env
    with (
        worker_process(
            env, "-P", "prefork", "-c", "2", queue=queue, tmp_path=tmp_path, module=MODULE
        ) as worker,
        beat_process(env, "-S", SCHEDULER, queue=queue, tmp_path=tmp_path, module=MODULE) as beat,
    ):
        yield worker, beat


def complete(server: CaptureServer, entry: str, at_least: int) -> list[Trace]:
    server.wait_for(lambda s: len(cron_traces(s, entry, TICK)) >= at_least, timeout=60)
    return cron_traces(server, entry, TICK)


def test_each_run_of_a_periodic_task_is_its_own_trace_with_cron_scores(
    beat_and_worker: Any, schedule: dict[str, str], langfuse_capture: CaptureServer
) -> None:
    from django_celery_results.models import TaskResult

    entry = schedule["interval"]
    traces = complete(langfuse_capture, entry, at_least=3)

    assert len({trace.id for trace in traces}) == len(traces)
    for trace in traces:
        assert_is_cron_trace(trace, entry, TICK)
        root = trace.find(f"cron {entry}")
        assert root.metadata["scheduler"] == "DatabaseScheduler"
        assert root.metadata["schedule"] == "every 1.00 second"
        assert trace.find(TICK).output == "tick:interval"
        assert score(trace, "cron_success") == 1
    # django-celery-results stored each run's result; tracing changed nothing there.
    task_ids = [trace.find(TICK).metadata["task_id"] for trace in traces]
    stored = _wait_for_results(task_ids)
    assert stored == {task_id: "SUCCESS" for task_id in task_ids}
    assert [
        json.loads(r)
        for r in TaskResult.objects.filter(task_id__in=task_ids).values_list("result", flat=True)
    ] == ["tick:interval"] * len(traces)


def test_crontab_periodic_task_is_traced_with_its_cron_fields(
    beat_and_worker: Any, schedule: dict[str, str], langfuse_capture: CaptureServer
) -> None:
    entry = schedule["crontab"]
    (trace, *_) = complete(langfuse_capture, entry, at_least=1)

    assert_is_cron_trace(trace, entry, TICK)
    root = trace.find(f"cron {entry}")
    assert root.metadata["schedule"] == "crontab * * * * * (m h dom mon dow, UTC)"
    assert score(trace, "cron_success") == 1
    # Due at the first minute boundary after its last run (90 s before the schedule
    # was written), so 30 to 90 s before beat sent it.
    assert 25 <= score(trace, "cron_lateness_seconds") < 120
    assert trace.find(TICK).output == "tick:crontab"


def test_a_schedule_renamed_in_the_database_is_traced_under_its_new_name(
    beat_and_worker: Any, schedule: dict[str, str], langfuse_capture: CaptureServer
) -> None:
    from django_celery_beat.models import PeriodicTask

    old = schedule["interval"]
    complete(langfuse_capture, old, at_least=1)
    new = f"{old}-renamed"
    task = PeriodicTask.objects.get(name=old)
    task.name = new
    task.save()  # django-celery-beat marks the schedule changed; beat re-reads it

    traces = complete(langfuse_capture, new, at_least=2)

    for trace in traces:
        assert_is_cron_trace(trace, new, TICK)
    schedule["interval"] = new


def _wait_for_results(task_ids: list[str], timeout: float = 20.0) -> dict[str, str]:
    from django_celery_results.models import TaskResult

    deadline = time.monotonic() + timeout
    while True:
        stored = dict(
            TaskResult.objects.filter(task_id__in=task_ids).values_list("task_id", "status")
        )
        if len(stored) == len(task_ids) or time.monotonic() > deadline:
            return stored
        time.sleep(0.2)
