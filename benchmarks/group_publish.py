"""Publish cost per task of a big group: plain Celery, traced, and traced as linked traces.

    python benchmarks/group_publish.py                    # N=1000, 7 repetitions
    python benchmarks/group_publish.py --n 5000 --reps 15 # longer

Each mode runs in a fresh process (a producer with this checkout's ``src`` first on
``PYTHONPATH``) that publishes ``group(leaf.s(i) for i in range(N)).apply_async()`` to a
queue of its own on Redis (``--broker``, db 15 by default; the queue is deleted
afterwards, no worker runs), inside a Langfuse observation for the traced modes, and
times ``apply_async`` with ``time.perf_counter``. Langfuse is ``benchmarks/sink.py``
(answers 200). Modes alternate within each repetition; the figure is the median over
repetitions of the microseconds per published task, and the traced modes' extra cost is
the median of the per-repetition differences to plain Celery.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PRODUCER = r"""
import json, os, sys, time
from celery import Celery, group
mode, n, broker, queue = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
app = Celery("group_publish", broker=broker)
app.conf.update(task_default_queue=queue, broker_connection_retry_on_startup=True)
if mode != "plain":
    from celery_langfuse import install
    install(app, **({"linked_trace_tasks": ["bench.leaf"]} if mode == "linked" else {}))

@app.task(name="bench.leaf")
def leaf(i):
    return i

def publish():
    started = time.perf_counter()
    group(leaf.s(i) for i in range(n)).apply_async()
    return time.perf_counter() - started

group(leaf.s(i) for i in range(10)).apply_async()  # connect and warm up first
if mode == "plain":
    elapsed = publish()
else:
    from langfuse import get_client
    with get_client().start_as_current_observation(name="request"):
        elapsed = publish()
    from celery_langfuse import client
    client.flush(30)
print(json.dumps({"seconds": elapsed}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()

    port = free_port()
    sink = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "sink.py"), str(port)],
        stdout=subprocess.PIPE, text=True,
    )
    assert sink.stdout is not None and "ready" in sink.stdout.readline()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("LANGFUSE_", "OTEL_"))}
    base_env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        LANGFUSE_BASE_URL=f"http://127.0.0.1:{port}",
        LANGFUSE_PUBLIC_KEY="pk-lf-bench",
        LANGFUSE_SECRET_KEY="sk-lf-bench",
    )
    from redis import Redis

    redis = Redis.from_url(args.broker)
    modes = ["plain", "traced", "linked"]
    results: dict[str, list[float]] = {mode: [] for mode in modes}
    try:
        for rep in range(args.reps):
            for mode in modes[rep % 3 :] + modes[: rep % 3]:
                queue = f"fanout-bench-{uuid.uuid4().hex[:8]}"
                done = subprocess.run(
                    [sys.executable, "-c", PRODUCER, mode, str(args.n), args.broker, queue],
                    env=base_env, capture_output=True, text=True, check=True, timeout=300,
                )
                seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
                results[mode].append(seconds / args.n * 1e6)
                redis.delete(queue)
                for key in redis.scan_iter(f"*{queue}*"):
                    redis.delete(key)
    finally:
        sink.terminate()
        sink.wait(10)

    plain = results["plain"]
    print(f"group of {args.n}, {args.reps} repetitions, microseconds per published task:")
    for mode in modes:
        line = f"  {mode:7s} median {statistics.median(results[mode]):7.1f}"
        if mode != "plain":
            extra = statistics.median(t - p for t, p in zip(results[mode], plain))
            line += f"   extra vs plain (paired median) {extra:+6.1f}"
        print(line)
    print(json.dumps({"n": args.n, "reps": args.reps, "us_per_task": results}))


if __name__ == "__main__":
    main()
