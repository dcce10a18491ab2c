"""A Celery app whose tasks fan out, for tests/test_linked_traces.py, run by a real
prefork worker (a process of its own, so this app's settings are the ones its
publishes follow: publish settings are per process, the first installed app's).

``CELERY_LANGFUSE_TEST_LINKED`` (comma-separated patterns) sets ``linked_trace_tasks``;
``CELERY_LANGFUSE_MAX_TRACE_OBSERVATIONS`` the guard, as any setting. Broker and queue
as in :mod:`tests.support.tasks`.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, chord, group

from celery_langfuse import install

BROKER = os.environ.get("CELERY_LANGFUSE_TEST_BROKER", "redis://127.0.0.1:6379/1")
QUEUE = os.environ.get("CELERY_LANGFUSE_TEST_QUEUE", "celery-langfuse-fanout")
PROJECT_ID = "proj-fanout"

app = Celery("fanout_app", broker=BROKER, backend=BROKER)
app.conf.update(
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=300,
)
INSTALL_OPTIONS = {
    "project_id": PROJECT_ID,
    "linked_trace_tasks": [
        p for p in os.environ.get("CELERY_LANGFUSE_TEST_LINKED", "").split(",") if p
    ],
}
install(app, **INSTALL_OPTIONS)  # for a worker process; tests install and uninstall it


@app.task
def leaf(i: int) -> int:
    return i


@app.task
def linked_leaf(i: int) -> int:
    return i


@app.task(bind=True, max_retries=1, default_retry_delay=0)
def linked_flaky(self: Any, i: int) -> int:
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return i


@app.task
def fan_out(task_name: str, count: int) -> int:
    """Publishes ``count`` runs of ``task_name`` (one message each)."""
    for i in range(count):
        app.send_task(task_name, (i,))
    return count


@app.task
def total(values: list[int]) -> int:
    return sum(values)


@app.task
def fan_out_group(count: int) -> str:
    return str(group(leaf.s(i) for i in range(count)).apply_async().id)


@app.task
def fan_out_chord(count: int) -> str:
    return str(chord(leaf.s(i) for i in range(count))(total.s()).id)


@app.task(acks_late=True, reject_on_worker_lost=True)
def dies_once(key: str) -> int:
    """Its pool process SIGKILLs itself on the first delivery; the message is delivered
    again and that run returns the delivery count."""
    import signal

    from redis import Redis

    deliveries = int(Redis.from_url(BROKER).incr(key))
    if deliveries == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return deliveries
