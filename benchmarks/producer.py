"""The producer side of the benchmark, one job per process; prints one JSON line.

``python -m benchmarks.producer publish N MODE PER_PARENT``
    Time ``noop.apply_async()`` N times (after a warm-up). MODE ``trace``: inside an
    active trace, PER_PARENT publishes per incoming-request span (the span is opened
    and closed outside the timed calls); MODE ``bare``: no active trace.
``python -m benchmarks.producer fill QUEUE N KEY PER_PARENT``
    Queue the worker workload: a ``start`` mark, N/2 no-ops, a ``mid`` mark, N/2
    no-ops and an ``end`` mark, published from inside active traces as in ``publish``.
``python -m benchmarks.producer latency N KEY``
    Publish ``probe`` tasks one at a time to an idle worker, each from inside an active
    trace, and report how long each took from the call to the task's start.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

from benchmarks import contenders
from benchmarks.app import app, mark, noop, probe, results

WARMUP = 200


def _parents(mode: str, n: int, per_parent: int) -> Iterator[int]:
    """Yield batch sizes, each inside a fresh active trace (or none for ``bare``)."""
    done = 0
    while done < n:
        size = min(per_parent, n - done)
        with contenders.active_trace() if mode == "trace" else nullcontext():
            yield size
        done += size


def publish(n: int, mode: str, per_parent: int) -> dict[str, Any]:
    for size in _parents(mode, WARMUP, per_parent):
        for _ in range(size):
            noop.apply_async()
    clock = time.perf_counter
    spent = 0.0
    for size in _parents(mode, n, per_parent):
        for _ in range(size):
            started = clock()
            noop.apply_async()
            spent += clock() - started
    return {"n": n, "mode": mode, "seconds_per_publish": spent / n}


def fill(queue: str, n: int, key: str, per_parent: int) -> dict[str, Any]:
    started = time.perf_counter()
    with contenders.active_trace():
        mark.apply_async((key, "start"), queue=queue)
    for half in range(2):
        for size in _parents("trace", n // 2, per_parent):
            for _ in range(size):
                noop.apply_async(queue=queue)
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
        result = publish(int(args[0]), args[1], int(args[2]))
    elif job == "fill":
        result = fill(args[0], int(args[1]), args[2], int(args[3]))
    elif job == "latency":
        result = latency(int(args[0]), args[1])
    else:
        raise SystemExit(f"unknown job {job!r}")
    contenders.flush()
    app.pool.force_close_all()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
