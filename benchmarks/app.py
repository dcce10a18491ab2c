"""The Celery app every benchmark process uses: the producer's and the worker's.

Configured from the environment by ``benchmarks/run.py``:
``BENCH_CONTENDER`` (which tracer, see ``contenders.py``), ``BENCH_BROKER``,
``BENCH_RESULTS`` (a Redis URL where marks and latency samples go, never the result
backend: the tasks store no results), ``BENCH_QUEUE``, ``BENCH_POOL`` and
``BENCH_SINK_DOWN``; ``BENCH_EXIT_AFTER_END=1`` makes the worker exit right after
the ``end`` mark (``benchmarks/instructions.py``).

Tasks: ``noop`` (the workload), ``mark`` (a sentinel the worker runs before, halfway
through and after the no-op tasks: it records wall time, CPU time and memory of the
process that runs it), ``probe`` (records when a task started, for latency). The
other workloads' tasks: ``excluded`` (a no-op the contenders are told not to trace,
``BENCH_EXCLUDED_TASK``), ``generation`` (makes one LLM call, recorded as a Langfuse
generation by the contenders that use the SDK: ``contenders.generation``) and
``ingest`` (takes a large JSON document and does nothing with it).
"""

from __future__ import annotations

import gc
import json
import os
import time
from typing import Any, Optional

from celery import Celery
from redis import Redis

from benchmarks import contenders, task_work

CONTENDER = os.environ.get("BENCH_CONTENDER", "plain")
QUEUE = os.environ.get("BENCH_QUEUE", "bench")

app = Celery("bench", broker=os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/13"))
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
)
contenders.setup(
    CONTENDER,
    app,
    prefork_child_init=os.environ.get("BENCH_POOL") == "prefork",
)

_results: Optional[Redis] = None

# Garbage collection, counted per generation: its cost grows with the heap (every
# library a tracer imports) and with the objects each task allocates.
_gc_seconds = [0.0, 0.0, 0.0]
_gc_runs = [0, 0, 0]
_gc_started = 0.0


def _time_gc(phase: str, info: dict[str, Any]) -> None:
    global _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
    else:
        generation = info["generation"]
        _gc_seconds[generation] += time.perf_counter() - _gc_started
        _gc_runs[generation] += 1


gc.callbacks.append(_time_gc)


def results() -> Redis:
    global _results
    if _results is None:
        _results = Redis.from_url(os.environ.get("BENCH_RESULTS", "redis://127.0.0.1:6379/14"))
    return _results


def memory_kib() -> dict[str, int]:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process, in KiB."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, amount, _ = line.split()
                values[name[:-1].lower()] = int(amount)
    return values


@app.task(name="bench.noop")
def noop() -> None:
    return None


@app.task(name="bench.excluded")
def excluded() -> None:
    return None


@app.task(name="bench.generation")
def generation() -> str:
    reply = contenders.generation(task_work.llm_call, task_work.PROMPT)
    return str(reply["choices"][0]["message"]["content"])


@app.task(name="bench.ingest")
def ingest(document: dict[str, Any]) -> None:
    return None


@app.task(name="bench.mark")
def mark(key: str, label: str, flush: bool = False) -> None:
    record: dict[str, Any] = {
        "label": label,
        "wall": time.time(),
        "cpu": time.process_time(),
        "pid": os.getpid(),
        "gc_seconds": list(_gc_seconds),
        "gc_runs": list(_gc_runs),
        "gc_objects": len(gc.get_objects()) if label == "start" else None,
    }
    if flush and os.environ.get("BENCH_SINK_DOWN") != "1":
        # Count the exporter's work for the tasks just run: it is part of their cost.
        contenders.flush()
        record["cpu_after_flush"] = time.process_time()
        record["wall_after_flush"] = time.time()
    record.update(memory_kib())
    results().rpush(key, json.dumps(record))
    if label == "end" and os.environ.get("BENCH_EXIT_AFTER_END") == "1":
        # benchmarks/instructions.py runs the worker under valgrind, which writes its
        # counts when the process exits: exit now, the exporter's work flushed above,
        # rather than wait for a signal and a shutdown whose cost is not the tasks'.
        os._exit(0)


@app.task(name="bench.probe")
def probe(key: str, sent_at: float) -> None:
    started = time.time()
    results().rpush(key, json.dumps(started - sent_at))
