"""The producer side of the benchmark, one job per process; prints one JSON line.

``python -m benchmarks.producer publish N MODE PER_PARENT [TASK]``
    Time ``TASK.apply_async()`` N times (after a warm-up). MODE ``trace``: inside an
    active trace, PER_PARENT publishes per incoming-request span (the span is opened
    and closed outside the timed calls; a PER_PARENT of N or more puts all N in one
    long-lived span); MODE ``bare``: no active trace.
``python -m benchmarks.producer fill QUEUE N KEY PER_PARENT [MODE [TASK]]``
    Queue the worker workload: one task, a ``start`` mark, N/2 tasks, a ``mid``
    mark, N/2 tasks and an ``end`` mark, the tasks published as in ``publish``
    (MODE ``trace`` by default), the marks each in an active trace of their own. The
    task before the ``start`` mark makes the worker pay the first-use costs of the
    workload's path (an import, a client) outside the measured window.
``python -m benchmarks.producer latency N KEY``
    Publish ``probe`` tasks one at a time to an idle worker, each from inside an active
    trace, and report how long each took from the call to the task's start.

TASK is one of :data:`TASKS`: ``noop``, ``excluded``, ``generation`` or ``large-arg``
(``ingest`` with a 100 kB JSON document: ``task_work.large_document``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

from benchmarks import contenders
from benchmarks.app import app, excluded, generation, ingest, mark, noop, probe, results
from benchmarks.task_work import large_document

WARMUP = 200

TASKS = {"noop": noop, "excluded": excluded, "generation": generation, "large-arg": ingest}


def _task_call(task: str) -> tuple[Any, tuple[Any, ...]]:
    """The task to publish for TASK, and its arguments."""
    if task == "large-arg":
        return ingest, (large_document(),)
    return TASKS[task], ()


def _parents(mode: str, n: int, per_parent: int) -> Iterator[int]:
    """Yield batch sizes, each inside a fresh active trace (or none for ``bare``)."""
    done = 0
    while done < n:
        size = min(per_parent, n - done)
        with contenders.active_trace() if mode == "trace" else nullcontext():
            yield size
        done += size


def publish(n: int, mode: str, per_parent: int, task: str = "noop") -> dict[str, Any]:
    target, args = _task_call(task)
    for size in _parents(mode, WARMUP, per_parent):
        for _ in range(size):
            target.apply_async(args)
    clock = time.perf_counter
    spent = 0.0
    for size in _parents(mode, n, per_parent):
        for _ in range(size):
            started = clock()
            target.apply_async(args)
            spent += clock() - started
    return {"n": n, "mode": mode, "task": task, "seconds_per_publish": spent / n}


def fill(
    queue: str, n: int, key: str, per_parent: int, mode: str = "trace", task: str = "noop"
) -> dict[str, Any]:
    target, args = _task_call(task)
    started = time.perf_counter()
    with contenders.active_trace() if mode == "trace" else nullcontext():
        target.apply_async(args, queue=queue)
    with contenders.active_trace():
        mark.apply_async((key, "start"), queue=queue)
    for half in range(2):
        for size in _parents(mode, n // 2, per_parent):
            for _ in range(size):
                target.apply_async(args, queue=queue)
        with contenders.active_trace():
            mark.apply_async((key, "mid" if half == 0 else "end", half == 1), queue=queue)
    contenders.flush()
    return {"n": n // 2 * 2, "seconds": time.perf_counter() - started}


def latency(n: int, key: str, warmup: int = 20) -> dict[str, Any]:
    redis = results()
    samples = []
    for index in range(warmup + n):
        with contenders.active_trace():
            probe.apply_async((key, time.time()))
        popped = redis.blpop([key], timeout=30)
        if popped is None:
            raise SystemExit("no probe result within 30 s: is the worker running?")
        if index >= warmup:
            samples.append(json.loads(popped[1]))
    return {"n": n, "seconds": samples}


def main(argv: list[str]) -> None:
    job, *args = argv
    if job == "publish":
        result = publish(int(args[0]), args[1], int(args[2]), *args[3:4])
    elif job == "fill":
        result = fill(args[0], int(args[1]), args[2], int(args[3]), *args[4:6])
    elif job == "latency":
        result = latency(int(args[0]), args[1])
    else:
        raise SystemExit(f"unknown job {job!r}")
    contenders.flush()
    app.pool.force_close_all()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
