"""A Celery app used by the tests, both in-thread and as a real worker subprocess.

Broker, backend and queue come from the environment so a subprocess worker and the
test that drives it agree: CELERY_LANGFUSE_TEST_BROKER, CELERY_LANGFUSE_TEST_QUEUE.
"""

from __future__ import annotations

import os
from typing import Optional

from celery import Celery, chord, group
from celery.exceptions import Ignore, Reject

from celery_langfuse import install

BROKER = os.environ.get("CELERY_LANGFUSE_TEST_BROKER", "redis://127.0.0.1:6379/1")
QUEUE = os.environ.get("CELERY_LANGFUSE_TEST_QUEUE", "celery-langfuse-tests")

app = Celery(
    "support",
    broker=BROKER,
    backend=BROKER.replace("amqp://", "rpc://") if BROKER.startswith("amqp") else BROKER,
)
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=300,
    # Celery >= 5.5's soft shutdown, for the exit-path tests (0: off, Celery's default).
    worker_soft_shutdown_timeout=float(os.environ.get("CELERY_LANGFUSE_TEST_SOFT_SHUTDOWN", "0")),
)
if os.environ.get("CELERY_LANGFUSE_TEST_INSTALL", "1") == "1":
    _durable_url = os.environ.get("CELERY_LANGFUSE_TEST_DURABLE_URL")
    install(
        app,
        flush_timeout=float(os.environ.get("CELERY_LANGFUSE_TEST_FLUSH_TIMEOUT", "3")),
        **(
            {
                "export": "durable",
                "durable_url": _durable_url,
                "durable_queue": os.environ["CELERY_LANGFUSE_TEST_DURABLE_QUEUE"],
            }
            if _durable_url
            else {}
        ),
    )


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def echo(*args: object, **kwargs: object) -> dict[str, object]:
    return {"args": list(args), "kwargs": kwargs}


@app.task
def fail(message: str = "boom") -> None:
    raise ValueError(message)


@app.task(bind=True, max_retries=2, default_retry_delay=0)
def flaky(self, succeed_on: int = 1) -> int:  # type: ignore[no-untyped-def]
    if self.request.retries < succeed_on:
        raise self.retry(exc=ConnectionError("transient"), countdown=0)
    return self.request.retries


@app.task(autoretry_for=(KeyError,), max_retries=1, default_retry_delay=0)
def autoretried(state_key: str) -> str:
    from redis import Redis

    seen = Redis.from_url(BROKER).incr(state_key)
    if seen < 2:
        raise KeyError("not yet")
    return "done"


@app.task
def spawn_child(x: int) -> str:
    return add.delay(x, 1).id


@app.task
def spawn_and_wait_not(x: int) -> str:
    return add.apply_async((x, 2)).id


@app.task
def total(values: list[int]) -> int:
    return sum(values)


@app.task
def run_chord(n: int) -> str:
    return chord(group(add.s(i, i) for i in range(n)), total.s()).apply_async().id


@app.task
def ignored() -> None:
    raise Ignore()


@app.task
def rejected() -> None:
    raise Reject("not for me", requeue=False)


@app.task
def slow(seconds: float, started_key: Optional[str] = None) -> float:
    """Sleep; with ``started_key``, first count this run as started in Redis."""
    import time

    if started_key:
        from redis import Redis

        Redis.from_url(BROKER).incr(started_key)
    time.sleep(seconds)
    return seconds


@app.task(bind=True)
def header_probe(self) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """The custom headers this run received, as the task sees them."""
    return {k: v for k, v in (self.request.headers or {}).items() if k.startswith("x-")}


@app.task
def report_pid_and_sleep(key: str, seconds: float) -> int:
    """Write this process's pid to Redis under ``key``, then sleep: a test kills it."""
    import time

    from redis import Redis

    Redis.from_url(BROKER).set(key, os.getpid(), ex=60)
    time.sleep(seconds)
    return os.getpid()


@app.task
def sdk_loaded() -> bool:
    """Whether this worker process has imported the Langfuse SDK."""
    import sys

    return "langfuse" in sys.modules
