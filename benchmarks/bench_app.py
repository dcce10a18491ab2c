"""The Celery app the fault benchmark runs: one trivial task that times the run.

Configured from the environment by ``benchmarks/faults.py``, for the worker subprocess
and the publishing benchmark process alike.
"""

from __future__ import annotations

import os
import time
from typing import Optional

from celery import Celery
from redis import Redis

from celery_langfuse import install

BROKER = os.environ.get("CELERY_LANGFUSE_BENCH_BROKER", "redis://127.0.0.1:6379/12")
QUEUE = os.environ.get("CELERY_LANGFUSE_BENCH_QUEUE", "celery-langfuse-bench")
RUN = os.environ.get("CELERY_LANGFUSE_BENCH_RUN", "run")
TOTAL = int(os.environ.get("CELERY_LANGFUSE_BENCH_TASKS", "0"))
WORK_SECONDS = float(os.environ.get("CELERY_LANGFUSE_BENCH_WORK_MS", "0")) / 1000

app = Celery("bench", broker=BROKER)
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

_durable_url = os.environ.get("CELERY_LANGFUSE_BENCH_DURABLE_URL")
if os.environ.get("CELERY_LANGFUSE_BENCH_TRACING", "1") == "1":
    install(
        app,
        **(
            {
                "export": "durable",
                "durable_url": _durable_url,
                "durable_queue": os.environ["CELERY_LANGFUSE_BENCH_DURABLE_QUEUE"],
            }
            if _durable_url
            else {}
        ),
    )

_redis: Optional[Redis] = None


@app.task
def unit(i: int) -> int:
    """Count this run; the first, a tenth and the last task stamp their times."""
    global _redis
    if _redis is None:
        _redis = Redis.from_url(BROKER)
    if WORK_SECONDS:
        deadline = time.perf_counter() + WORK_SECONDS
        while time.perf_counter() < deadline:
            pass
    done = _redis.incr(f"{RUN}:done")
    now = time.time()
    if done == 1:
        _redis.set(f"{RUN}:start", now)
    if done == TOTAL // 10:
        _redis.set(f"{RUN}:warm", now)  # every pool child has run tasks by now
    if done == TOTAL:
        _redis.set(f"{RUN}:end", now)
    return i
