"""The tests' Celery app with a beat schedule, for real ``celery beat`` subprocesses.

Same app, broker and queue as :mod:`tests.support.tasks` (so a worker started with
``-A tests.support.beat_app`` runs the scheduled tasks), plus schedule entries chosen
by the environment:

CELERY_LANGFUSE_TEST_BEAT_ENTRIES
    Comma-separated kinds from :data:`ENTRY_KINDS` (default ``tick``). Each entry is
    named ``<kind>-<queue>`` so that a test's traces are told apart by name.
CELERY_LANGFUSE_TEST_BEAT_INTERVAL
    Seconds between runs of every entry (default 1).
CELERY_LANGFUSE_TEST_BEAT_TRACING
    ``off`` uninstalls celery-langfuse from the app: the same beat, untraced, for
    comparisons.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from celery_langfuse import uninstall
from tests.support.tasks import QUEUE, app

#: What each kind of entry runs: a task that succeeds, and one that always fails.
ENTRY_KINDS: dict[str, dict[str, Any]] = {
    "tick": {"task": "tests.support.tasks.add", "args": (2, 3)},
    "boom": {"task": "tests.support.tasks.fail", "args": ("cron boom",)},
    # Arguments for the capture policy: a key only the installation's redact_keys names.
    "secret": {
        "task": "tests.support.tasks.echo",
        "args": ("plain",),
        "kwargs": {"customer_ref": "cust-4711", "note": "kept"},
    },
}


def entry_name(kind: str, queue: str = QUEUE) -> str:
    return f"{kind}-{queue}"


_kinds = os.environ.get("CELERY_LANGFUSE_TEST_BEAT_ENTRIES", "tick").split(",")
_interval = timedelta(seconds=float(os.environ.get("CELERY_LANGFUSE_TEST_BEAT_INTERVAL", "1")))

app.conf.update(
    beat_schedule={
        entry_name(kind): {**ENTRY_KINDS[kind], "schedule": _interval}
        for kind in filter(None, (kind.strip() for kind in _kinds))
    },
    # celery-redbeat: keep each test's schedule and lock apart on the shared Redis.
    redbeat_redis_url=app.conf.broker_url,
    redbeat_key_prefix=f"redbeat-{QUEUE}:",
    redbeat_lock_timeout=10,
    # Re-read the schedule at least once a second (beat's --max-interval 1), also for
    # beat embedded in a worker (-B), which has no such option.
    beat_max_loop_interval=1,
)

if os.environ.get("CELERY_LANGFUSE_TEST_BEAT_TRACING") == "off":
    uninstall(app)

if os.environ.get("CELERY_LANGFUSE_TEST_BEAT_USER_OBSERVATION") == "1":
    from celery import signals

    @signals.before_task_publish.connect(weak=False)
    def _user_code_in_beat(**_: Any) -> None:
        """User code that observes in beat: inside each cron run, as beat publishes."""
        from langfuse import get_client

        with get_client().start_as_current_observation(name="user code in beat"):
            pass
