"""Does a broken Langfuse hurt Celery tasks? Side-by-side runs of a real prefork worker.

    PYTHONPATH=src:. python benchmarks/faults.py            # every scenario, 2000 tasks
    PYTHONPATH=src:. python benchmarks/faults.py -n 500 -s healthy,down,durable

Each scenario queues N trivial tasks, starts a ``celery worker -P prefork`` subprocess
with the scenario's environment, and measures:

- throughput: tasks per second between the first and the last task (stamped by the
  tasks themselves, so worker start-up is excluded), and its ratio to ``healthy``;
- whether every task succeeded;
- the worker's memory: RSS of the main process and its pool children once a tenth
  of the tasks ran (every child is warm, its client created), at the end, and at the
  peak (sampled every 0.25 s);
- shutdown: seconds from SIGTERM, sent once the worker is idle, to exit;
- spans delivered to Langfuse (a local capture server) by the time of the report;
  for durable mode also how long the forwarder took to drain the queue after the run
  and the queue bytes per span.

Scenarios: ``off`` (tracing not installed), ``healthy``, ``down`` (closed port),
``slow`` (answers after 10 s), ``500``, ``503``, ``429`` (Retry-After: 5), and durable
mode with a forwarder running: ``durable`` and ``durable-down`` (503 during the run,
healthy again after it). Prints a table and writes JSON (``--json``).

Needs Redis on 127.0.0.1:6379 (database 12 by default, ``--redis``). Everything runs
on this machine: the capture server shares the CPU with the worker, which makes the
healthy run (the only one where every span is decoded) a conservative baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from redis import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from celery_langfuse.durable import SpanQueue  # noqa: E402
from celery_langfuse.testing import CaptureServer  # noqa: E402


@dataclass(frozen=True)
class Scenario:
    description: str
    tracing: bool = True
    down: bool = False
    status: int = 200
    delay: float = 0.0
    retry_after: Optional[float] = None
    durable: bool = False


SCENARIOS = {
    "off": Scenario("tracing not installed", tracing=False),
    "healthy": Scenario("Langfuse answers 200"),
    "down": Scenario("Langfuse port closed", down=True),
    "slow": Scenario("Langfuse answers after 10 s", delay=10.0),
    "500": Scenario("Langfuse answers 500", status=500),
    "503": Scenario("Langfuse answers 503", status=503),
    "429": Scenario("Langfuse answers 429, Retry-After: 5", status=429, retry_after=5.0),
    "durable": Scenario("durable mode, forwarder running, Langfuse 200", durable=True),
    "durable-down": Scenario(
        "durable mode, Langfuse 503 during the run, 200 after", durable=True, status=503
    ),
}


@dataclass
class Result:
    scenario: str
    description: str
    tasks: int
    all_succeeded: bool
    seconds: float
    tasks_per_second: float
    ratio_to_healthy: Optional[float] = None
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_growth_mb: float = 0.0
    shutdown_seconds: float = 0.0
    spans_delivered: int = 0
    drain_seconds: Optional[float] = None
    queue_bytes_per_span: Optional[float] = None
    notes: list[str] = field(default_factory=list)


# -- process tree memory ---------------------------------------------------------------


def tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and all its descendants, in MiB (Linux /proc)."""
    total_kb, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
        stack.extend(int(child) for child in children)
    return total_kb / 1024


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0.0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.25):
            self.peak = max(self.peak, tree_rss_mb(self.pid))


# -- one scenario ----------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_scenario(name: str, scenario: Scenario, args: argparse.Namespace) -> Result:
    # A capture server per run: a slow run's late answers must not count in the next.
    with CaptureServer() as capture:
        return _run(name, scenario, args, capture)


def _run(name: str, scenario: Scenario, args: argparse.Namespace, capture: CaptureServer) -> Result:
    redis = Redis.from_url(args.redis)
    run_id = f"bench-{name}-{uuid.uuid4().hex[:8]}"
    queue = f"{run_id}-tasks"
    durable_queue = f"{run_id}-spans"
    capture.set_response(scenario.status, delay=scenario.delay, retry_after=scenario.retry_after)

    env = {
        **os.environ,
        **capture.env,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "CELERY_LANGFUSE_BENCH_BROKER": args.redis,
        "CELERY_LANGFUSE_BENCH_QUEUE": queue,
        "CELERY_LANGFUSE_BENCH_RUN": run_id,
        "CELERY_LANGFUSE_BENCH_TASKS": str(args.tasks),
        "CELERY_LANGFUSE_BENCH_WORK_MS": str(args.work_ms),
        "CELERY_LANGFUSE_BENCH_TRACING": "1" if scenario.tracing else "0",
    }
    env.pop("LANGFUSE_FLUSH_INTERVAL")  # the SDK's production batching, not the tests'
    if scenario.down:
        env["LANGFUSE_BASE_URL"] = f"http://127.0.0.1:{closed_port()}"
    if scenario.durable:
        env["CELERY_LANGFUSE_BENCH_DURABLE_URL"] = args.redis
        env["CELERY_LANGFUSE_BENCH_DURABLE_QUEUE"] = durable_queue

    from benchmarks.bench_app import app

    with app.producer_or_acquire() as producer:
        for i in range(args.tasks):
            app.send_task("benchmarks.bench_app.unit", (i,), queue=queue, producer=producer)

    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    forwarder = None
    if scenario.durable:
        forwarder = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery_langfuse.cli",
                "forward",
                "--redis-url",
                args.redis,
                "--queue",
                durable_queue,
                "--max-backoff",
                "2",
                "--log-level",
                "WARNING",
            ],
            env=env,
            stdout=open(logs / f"{run_id}-forwarder.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
    worker_log = logs / f"{run_id}-worker.log"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "benchmarks.bench_app",
            "worker",
            "-P",
            "prefork",
            "-c",
            str(args.concurrency),
            "-Q",
            queue,
            "-n",
            f"{run_id}@%h",
            "-l",
            "WARNING",
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
        ],
        cwd=ROOT,
        env=env,
        stdout=open(worker_log, "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    sampler = RssSampler(worker.pid)
    sampler.start()
    notes: list[str] = []
    try:
        deadline = time.monotonic() + args.timeout
        while redis.get(f"{run_id}:start") is None and time.monotonic() < deadline:
            time.sleep(0.02)
        while redis.get(f"{run_id}:warm") is None and time.monotonic() < deadline:
            time.sleep(0.02)
        rss_start = tree_rss_mb(worker.pid)
        sampler.peak = rss_start
        while redis.get(f"{run_id}:end") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        done = int(redis.get(f"{run_id}:done") or 0)
        started = float(redis.get(f"{run_id}:start") or 0)
        ended = float(redis.get(f"{run_id}:end") or 0)
        rss_end = tree_rss_mb(worker.pid)
        all_succeeded = done == args.tasks and ended > 0
        if not all_succeeded:
            notes.append(f"only {done} of {args.tasks} tasks finished within {args.timeout} s")
        seconds = (ended - started) if ended else float("nan")

        time.sleep(1.0)  # idle before SIGTERM: see DESIGN.md on billiard's shutdown
        stop_started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(90)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
            notes.append("worker killed: no exit within 90 s of SIGTERM")
        shutdown = time.monotonic() - stop_started
    finally:
        sampler.stopped.set()
        if worker.poll() is None:
            worker.kill()

    drain = bytes_per_span = None
    if forwarder is not None:
        durable = SpanQueue.from_url(args.redis, durable_queue)
        stats = durable.stats()
        enqueued = stats.count("enqueued_spans")
        bytes_per_span = stats.count("enqueued_bytes") / enqueued if enqueued else None
        capture.set_response()  # durable-down: Langfuse is back
        drain_started = time.monotonic()
        while len(capture.observations) < enqueued and time.monotonic() - drain_started < 120:
            time.sleep(0.05)
        drain = time.monotonic() - drain_started
        if len(capture.observations) < enqueued:
            notes.append(f"only {len(capture.observations)} of {enqueued} spans forwarded")
        forwarder.send_signal(signal.SIGTERM)
        forwarder.wait(30)
        redis.delete(durable.stream, durable.stats_key)
        durable.close()
    if "Traceback" in worker_log.read_text(errors="replace"):
        notes.append(f"traceback in {worker_log}")
    redis.delete(*(f"{run_id}:{key}" for key in ("done", "start", "warm", "end")), queue)

    return Result(
        scenario=name,
        description=scenario.description,
        tasks=args.tasks,
        all_succeeded=all_succeeded,
        seconds=round(seconds, 3),
        tasks_per_second=round((args.tasks - 1) / seconds, 1) if seconds > 0 else 0.0,
        rss_start_mb=round(rss_start, 1),
        rss_end_mb=round(rss_end, 1),
        rss_peak_mb=round(max(sampler.peak, rss_end), 1),
        rss_growth_mb=round(rss_end - rss_start, 1),
        shutdown_seconds=round(shutdown, 2),
        spans_delivered=len(capture.observations),
        drain_seconds=round(drain, 2) if drain is not None else None,
        queue_bytes_per_span=round(bytes_per_span, 1) if bytes_per_span else None,
        notes=notes,
    )


def _median(results: list[Result]) -> Result:
    ordered = sorted(results, key=lambda r: r.tasks_per_second)
    median = ordered[len(ordered) // 2]
    if len(results) > 1:
        rates = ", ".join(f"{r.tasks_per_second:.0f}" for r in results)
        median.notes.append(f"tasks/s of each round: {rates}")
    return median


# -- report ------------------------------------------------------------------------------


def print_table(results: list[Result]) -> None:
    header = (
        f"{'scenario':<13} {'tasks/s':>8} {'vs healthy':>10} {'all ok':>6} "
        f"{'RSS MiB':>8} {'growth':>7} {'peak+':>6} {'shutdown s':>10} "
        f"{'spans in LF':>11} {'drain s':>7} {'B/span':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        ratio = f"{r.ratio_to_healthy:.2f}" if r.ratio_to_healthy is not None else "-"
        drain = f"{r.drain_seconds:.1f}" if r.drain_seconds is not None else "-"
        per_span = f"{r.queue_bytes_per_span:.0f}" if r.queue_bytes_per_span else "-"
        print(
            f"{r.scenario:<13} {r.tasks_per_second:>8.1f} {ratio:>10} "
            f"{'yes' if r.all_succeeded else 'NO':>6} {r.rss_start_mb:>8.1f} "
            f"{r.rss_growth_mb:>+7.1f} {r.rss_peak_mb - r.rss_start_mb:>+6.1f} "
            f"{r.shutdown_seconds:>10.2f} {r.spans_delivered:>11} {drain:>7} {per_span:>6}"
        )
        for note in r.notes:
            print(f"    note: {note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--tasks", type=int, default=2000)
    parser.add_argument("-c", "--concurrency", type=int, default=2)
    parser.add_argument(
        "-s", "--scenarios", default=",".join(SCENARIOS), help="comma-separated names"
    )
    parser.add_argument(
        "-r",
        "--repeat",
        type=int,
        default=1,
        help="rounds; the run of median throughput is reported",
    )
    parser.add_argument("--work-ms", type=float, default=0.0, help="CPU work per task")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--timeout", type=float, default=180.0, help="per scenario")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "faults-results.json"))
    parser.add_argument("--logs", default="/tmp/celery-langfuse-bench")
    args = parser.parse_args()

    names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {list(SCENARIOS)}")
    os.environ["CELERY_LANGFUSE_BENCH_BROKER"] = args.redis
    os.environ["CELERY_LANGFUSE_BENCH_TRACING"] = "0"  # this process only publishes

    runs: dict[str, list[Result]] = {name: [] for name in names}
    for round_number in range(args.repeat):
        for name in names:  # interleaved, so a burst of load elsewhere hits every scenario
            print(f"round {round_number + 1}: {name}: {SCENARIOS[name].description}", flush=True)
            runs[name].append(run_scenario(name, SCENARIOS[name], args))
    results = [_median(runs[name]) for name in names]
    healthy = next((r for r in results if r.scenario == "healthy"), None)
    for r in results:
        if healthy is not None and healthy.tasks_per_second:
            r.ratio_to_healthy = round(r.tasks_per_second / healthy.tasks_per_second, 3)
    print()
    print_table(results)
    report = {
        "tasks": args.tasks,
        "concurrency": args.concurrency,
        "work_ms": args.work_ms,
        "repeat": args.repeat,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "results": [asdict(r) for r in results],
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON written to {args.json}")
    return 0 if all(r.all_succeeded for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
