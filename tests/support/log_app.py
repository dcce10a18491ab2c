"""A Celery app whose tasks log, for tests/test_trace_logs.py, in-thread and as a real
prefork worker: Celery's task log format carries the trace ids, and ``project_id`` is
set so runs know their trace URL. Broker and queue as in :mod:`tests.support.tasks`."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery

from celery_langfuse import install

BROKER = os.environ.get("CELERY_LANGFUSE_TEST_BROKER", "redis://127.0.0.1:6379/1")
QUEUE = os.environ.get("CELERY_LANGFUSE_TEST_QUEUE", "celery-langfuse-fanout-logs")
PROJECT_ID = "proj-fanout-logs"
TASK_LOG_FORMAT = (
    "%(task_name)s[%(task_id)s] trace=%(langfuse_trace_id)s "
    "observation=%(langfuse_observation_id)s: %(message)s"
)

app = Celery("log_app", broker=BROKER, backend=BROKER)
app.conf.update(
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_task_log_format=TASK_LOG_FORMAT,
    result_expires=300,
)
INSTALL_OPTIONS = {"project_id": PROJECT_ID}
install(app, **INSTALL_OPTIONS)  # for a worker process; tests install and uninstall it

log = logging.getLogger("tests.support.log_app")


@app.task(bind=True)
def logged(self: Any, steps: int = 2) -> dict[str, Any]:
    """Logs ``steps`` lines (through its own logger and Celery's task logger) and
    returns what ``task.request`` says about its trace."""
    from celery.utils.log import get_task_logger

    task_log = get_task_logger(__name__)
    for step in range(steps):
        log.info("step %d", step)
        task_log.info("task step %d", step)
    return {
        "trace_id": self.request.langfuse_trace_id,
        "trace_url": self.request.langfuse_trace_url,
    }


@app.task
def logs_a_bare_record() -> str:
    """Emits a record made without the record factory (as a socket listener would)
    through a handler whose format asks for the trace ids."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(langfuse_trace_id)s %(message)s"))
    handler.handle(logging.makeLogRecord({"msg": "no ids here", "levelno": logging.INFO}))
    return "done"
