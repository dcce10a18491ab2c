"""A Celery app with a celery-batches task, for tests/test_batches.py (real prefork
worker). Broker and queue as in :mod:`tests.support.tasks`."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery_batches import Batches

from celery_langfuse import install

BROKER = os.environ.get("CELERY_LANGFUSE_TEST_BROKER", "redis://127.0.0.1:6379/1")
QUEUE = os.environ.get("CELERY_LANGFUSE_TEST_QUEUE", "celery-langfuse-fanout-batches")
PROJECT_ID = "proj-batches"

app = Celery("batch_app", broker=BROKER, backend=BROKER)
app.conf.update(
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=0,  # celery-batches needs every message prefetched
    result_expires=300,
)
INSTALL_OPTIONS = {"project_id": PROJECT_ID}
install(app, **INSTALL_OPTIONS)  # for a worker process; tests install and uninstall it


@app.task(base=Batches, flush_every=100, flush_interval=5)
def count_words(requests: list[Any]) -> int:
    """One run for up to 100 messages, each ``count_words.delay(text)``."""
    for request in requests:
        app.backend.mark_as_done(request.id, len(request.args[0].split()), request=request)
    return len(requests)
