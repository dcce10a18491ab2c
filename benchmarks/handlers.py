"""Time celery-langfuse's signal handlers in-process, without a broker.

    python benchmarks/handlers.py [--n 20000]

Prints µs per call of the publish handler (inside an active trace and without one) and
of a task run (``task_prerun`` + ``task_postrun`` around Celery's push/pop of the
request), as a worker calls them: wall time, and the calling thread's CPU time in its
best batch. Exports go to a
local sink that answers 200; a loop this tight outruns the export thread, so its queue
bound drops the excess (and says so), as it would in any process. This isolates this
library's per-task work from Celery's and Redis's; the side-by-side ratios are
``benchmarks/run.py``'s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="calls timed per handler")
    args = parser.parse_args()

    from benchmarks.run import _free_port

    port = _free_port()
    sink = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "sink.py"), str(port)], stdout=subprocess.PIPE
    )
    assert sink.stdout is not None
    try:
        if sink.stdout.readline().strip() != b"ready":
            raise SystemExit("the sink did not start")
        os.environ.update(
            LANGFUSE_PUBLIC_KEY="pk-lf-bench",
            LANGFUSE_SECRET_KEY="sk-lf-bench",
            LANGFUSE_BASE_URL=f"http://127.0.0.1:{port}",
        )
        _measure(args.n)
    finally:
        sink.terminate()
        sink.wait()


def _measure(n: int) -> None:
    from celery import Celery
    from langfuse import get_client

    from celery_langfuse import client, install
    from celery_langfuse.publish import on_before_task_publish

    app = Celery("handlers", broker="memory://")
    installation = install(app)

    @app.task(name="handlers.noop")
    def noop() -> None:
        return None

    def publish() -> dict[str, Any]:
        headers: dict[str, Any] = {"task": noop.name, "id": str(uuid.uuid4()), "retries": 0}
        on_before_task_publish(
            sender=noop.name, body=((), {}, {}), exchange="", routing_key="celery", headers=headers
        )
        return headers

    with get_client().start_as_current_observation(name="request"):
        message = publish()
    trace_headers = {k: v for k, v in message.items() if k.startswith(("x-", "trace", "bag"))}
    worker = installation.worker

    def run() -> None:
        task_id = str(uuid.uuid4())
        noop.push_request(
            id=task_id,
            headers=dict(trace_headers),
            delivery_info={"routing_key": "celery"},
            hostname="worker@host",
            retries=0,
            **trace_headers,
        )
        try:
            worker.on_task_prerun(sender=noop, task_id=task_id, task=noop, args=(), kwargs={})
            worker.on_task_postrun(
                sender=noop, task_id=task_id, task=noop, retval=None, state="SUCCESS"
            )
        finally:
            noop.pop_request()

    def push_pop_only() -> None:
        noop.push_request(id=str(uuid.uuid4()), headers=dict(trace_headers), **trace_headers)
        noop.pop_request()

    with get_client().start_as_current_observation(name="request"):
        _report("publish, in an active trace", publish, n)
    _report("publish, no active trace", publish, n)
    _report("task run (prerun + postrun)", run, n)
    _report("  of which Celery's push/pop of the request", push_pop_only, n)
    client.flush(10)


def _report(label: str, operation: Callable[[], object], n: int) -> None:
    """Wall time per call over ``n`` calls, and the calling thread's CPU time per call
    in the best of 9 batches: on a noisy machine the best batch is the least disturbed
    (the export thread's work and other processes are not in it)."""
    from celery_langfuse import client

    for _ in range(min(n, 500)):  # warm: first-use setup is not per-task work
        operation()
    started = time.perf_counter()
    for _ in range(n):
        operation()
    wall = (time.perf_counter() - started) / n * 1e6
    batch, best = max(n // 9, 100), float("inf")
    for _ in range(9):
        client.flush(10)  # an empty export queue for each batch
        cpu = time.thread_time()
        for _ in range(batch):
            operation()
        best = min(best, (time.thread_time() - cpu) / batch * 1e6)
    print(f"{label:45s} {wall:8.2f} µs wall {best:8.2f} µs CPU (best batch)")


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
    main()
