"""Measure what each Celery tracer costs, side by side, in one command.

    python benchmarks/run.py                 # every workload, about 27 minutes on 2 cores
    python benchmarks/run.py --quick         # a smoke run (about 7 minutes)
    python benchmarks/run.py --n-worker 30000 --reps 5 --workloads solo,sink-down

Every measurement runs the contender in fresh processes (a producer process, a
``celery worker`` process), started with this checkout's ``src`` first on
``PYTHONPATH`` and with no ``LANGFUSE_*``/``OTEL_*``/``SENTRY_*`` variables inherited.
Within each repetition every workload runs for every contender in turn (A B C D E,
rotated one step per repetition), so drift in machine load spreads over all of them.
Results are medians over repetitions, and ratios (or differences) to plain Celery
paired by repetition: the median of each repetition's comparison. They are
written to ``benchmarks/results/`` as ``results.json``, ``results.md`` and
``results.png``. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from benchmarks import isolation, report  # noqa: E402
from benchmarks.contenders import CONTENDERS  # noqa: E402


@dataclass(frozen=True)
class Workload:
    """One row group of the report: what the producer publishes, and who measures it."""

    name: str
    #: "publish" (time the publishes), "worker" (a worker drains them) or "latency"
    job: str
    pool: str = "solo"
    #: Published inside request spans ("trace"), or with no active trace ("bare").
    mode: str = "trace"
    #: Every task under one long-lived request span, instead of --per-parent per span.
    one_root: bool = False
    #: The task published: one of benchmarks.producer.TASKS.
    task: str = "noop"
    #: The share of new traces every process of the contender keeps (None: all).
    sample_rate: Optional[float] = None
    #: The producer's request spans are sampled out (its tracer's rate is 0); the
    #: workers keep their default and follow the trace's decision.
    sampled_out: bool = False
    sink_down: bool = False

    def settings(self, producer: bool) -> dict[str, str]:
        """The ``BENCH_*`` settings the contenders read (``contenders.setup``)."""
        settings = {}
        if self.sampled_out and producer:
            settings["BENCH_SAMPLE_RATE"] = "0"
        elif self.sample_rate is not None:
            settings["BENCH_SAMPLE_RATE"] = str(self.sample_rate)
        if self.task == "excluded":
            settings["BENCH_EXCLUDED_TASK"] = "bench.excluded"
        return settings


_WORKLOADS = (
    Workload("publish", "publish"),
    Workload("publish-bare", "publish", mode="bare"),
    Workload("publish-one-root", "publish", one_root=True),
    Workload("publish-sampled-out", "publish", sampled_out=True),
    Workload("publish-excluded", "publish", task="excluded"),
    Workload("solo", "worker"),
    Workload("prefork", "worker", pool="prefork"),
    Workload("latency", "latency"),
    Workload("sink-down", "worker", sink_down=True),
    Workload("new-trace", "worker", mode="bare"),
    Workload("new-trace-0.1", "worker", mode="bare", sample_rate=0.1),
    Workload("one-root", "worker", one_root=True),
    Workload("prefork-one-root", "worker", pool="prefork", one_root=True),
    Workload("sampled-out", "worker", sampled_out=True),
    Workload("excluded", "worker", task="excluded"),
    Workload("generation", "worker", task="generation"),
    Workload("large-arg", "worker", task="large-arg"),
)
WORKLOAD = {workload.name: workload for workload in _WORKLOADS}
WORKLOADS = tuple(WORKLOAD)
PYTHON = sys.executable


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--n-publish", type=int, default=2000, help="publishes timed per process")
    parser.add_argument("--n-worker", type=int, default=1500, help="no-op tasks per worker run")
    parser.add_argument("--n-latency", type=int, default=200, help="latency probes per process")
    parser.add_argument(
        "--n-large",
        type=int,
        default=500,
        help="tasks per worker run of large-arg (default 500: 100 kB each waits in Redis)",
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    add_bench_arguments(parser)
    parser.add_argument(
        "--report-only",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: write results.md and results.png again from a results.json",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small N and 1 repetition: checks the harness, not the numbers",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.n_publish, args.n_worker, args.n_latency = 1, 1000, 1000, 50
        args.n_large = 200
    args.workloads = _choices(args.workloads, WORKLOADS, "workload")
    check_contenders(parser, args)
    return args


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options :class:`Bench` reads, and the contenders; shared with the other
    benchmark scripts that run workers through it."""
    parser.add_argument(
        "--per-parent",
        type=int,
        default=10,
        help="tasks published per incoming-request span (default 10)",
    )
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument(
        "--worker-loglevel",
        default="WARNING",
        help="celery worker -l (default WARNING: no per-task log lines)",
    )
    parser.add_argument(
        "--redis",
        default="redis://127.0.0.1:6379",
        help="Redis server; uses databases --broker-db and --marks-db, deletes only its own keys",
    )
    parser.add_argument("--broker-db", type=int, default=13, help="broker database (default 13)")
    parser.add_argument(
        "--marks-db", type=int, default=14, help="database of marks and probes (default 14)"
    )
    parser.add_argument(
        "--queue-prefix", default="bench", help="queue names start with this (default bench)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")


def check_contenders(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--contenders`` as a list in the canonical order; plain Celery must be there."""
    args.contenders = _choices(args.contenders, CONTENDERS, "contender")
    if "plain" not in args.contenders:
        parser.error("plain must be among the contenders: ratios are to plain Celery")


def _choices(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    chosen = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}(s) {unknown}; allowed: {', '.join(allowed)}")
    return [item for item in allowed if item in chosen]


class Bench:
    """One benchmark run: the sink, Redis, the environment of every process."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        from redis import Redis

        self.args = args
        self.workdir = workdir
        self.broker_url = f"{args.redis}/{args.broker_db}"
        self.results_url = f"{args.redis}/{args.marks_db}"
        self.broker = Redis.from_url(self.broker_url)
        self.results = Redis.from_url(self.results_url)
        self.sink_port = _free_port()
        self.closed_port = _free_port()  # nothing listens here: "Langfuse is down"
        self.sink: Optional[subprocess.Popen[bytes]] = None
        self.hidden_modules = isolation.hidden_modules()

    @contextmanager
    def running(self) -> Iterator[Bench]:
        self.sink = subprocess.Popen(
            [PYTHON, str(ROOT / "benchmarks" / "sink.py"), str(self.sink_port)],
            stdout=subprocess.PIPE,
        )
        assert self.sink.stdout is not None
        if self.sink.stdout.readline().strip() != b"ready":
            raise SystemExit("the sink did not start")
        try:
            yield self
        finally:
            _stop(self.sink)

    def sink_stats(self) -> dict[str, Any]:
        from urllib.request import urlopen

        with urlopen(f"http://127.0.0.1:{self.sink_port}/__stats", timeout=5) as response:
            return json.loads(response.read())

    def env(
        self,
        contender: str,
        *,
        queue: str = "bench",
        pool: str = "solo",
        sink_down: bool = False,
        settings: Optional[dict[str, str]] = None,
    ) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("LANGFUSE_", "OTEL_", "SENTRY_", "BENCH_", "CELERY_"))
        }
        sink = f"http://127.0.0.1:{self.closed_port if sink_down else self.sink_port}"
        env.update(
            PYTHONPATH=os.pathsep.join(
                [
                    os.environ.get("BENCH_SITE_DIR", str(ROOT / "benchmarks" / "_site")),
                    str(ROOT / "src"),
                    str(ROOT),
                ]
            ),
            BENCH_HIDDEN_MODULES=",".join(self.hidden_modules),
            PYTHONDONTWRITEBYTECODE="1",
            BENCH_CONTENDER=contender,
            BENCH_BROKER=self.broker_url,
            BENCH_RESULTS=self.results_url,
            BENCH_QUEUE=queue,
            BENCH_POOL=pool,
            BENCH_SINK_URL=sink,
            BENCH_SINK_DOWN="1" if sink_down else "0",
            LANGFUSE_PUBLIC_KEY="pk-lf-bench",
            LANGFUSE_SECRET_KEY="sk-lf-bench",
            LANGFUSE_BASE_URL=sink,
        )
        env.update(settings or {})
        return env

    def python(self, env: dict[str, str], *argv: str, timeout: float = 600) -> dict[str, Any]:
        """Run ``python -m benchmarks.producer ...`` in a fresh process; its JSON result."""
        done = subprocess.run(
            [PYTHON, "-m", "benchmarks.producer", *argv],
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"producer {' '.join(argv)} failed ({done.returncode}):\n"
                f"{done.stderr.decode(errors='replace')[-3000:]}"
            )
        return json.loads(done.stdout.decode().strip().splitlines()[-1])

    @contextmanager
    def worker(
        self, env: dict[str, str], queue: str, pool: str
    ) -> Iterator[subprocess.Popen[bytes]]:
        log_path = self.workdir / f"worker-{queue}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                worker_command(queue, pool, self.args.worker_loglevel),
                cwd=ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its pool processes go with it (see _stop)
            )
        try:
            yield process
        finally:
            # What was measured is in Redis already: no need to wait for a graceful
            # shutdown (an exporter retrying against a closed port can take a minute).
            _stop(process, timeout=3)
            if process.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
                print(f"  worker exited {process.returncode}; log: {log_path}", file=sys.stderr)

    def cleanup(self, queue: str, key: str) -> None:
        """Delete what one measurement left in Redis (and nothing else: the
        databases may be shared)."""
        self.broker.delete(
            queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}", key
        )
        self.results.delete(key)

    # -- workloads ------------------------------------------------------------------

    def queue_name(self, kind: str) -> str:
        return f"{self.args.queue_prefix}-{kind}-{uuid.uuid4().hex[:8]}"

    def per_parent(self, workload: Workload, n: int) -> int:
        """Tasks per request span: all of them in one, or ``--per-parent``."""
        return max(n, 1) if workload.one_root else self.args.per_parent

    def publish(self, contender: str, workload: Workload) -> dict[str, Any]:
        queue = self.queue_name("publish")
        n = self.args.n_publish
        try:
            result = self.python(
                self.env(contender, queue=queue, settings=workload.settings(producer=True)),
                "publish",
                str(n),
                workload.mode,
                str(self.per_parent(workload, n)),
                workload.task,
            )
        finally:
            self.cleanup(queue, "")
        return {"publish_us": result["seconds_per_publish"] * 1e6}

    def worker_run(self, contender: str, workload: Workload) -> dict[str, Any]:
        pool = workload.pool
        queue = self.queue_name(pool)
        key = f"marks-{queue}"
        n = self.args.n_large if workload.task == "large-arg" else self.args.n_worker
        try:
            self.python(
                self.env(contender, queue=queue, settings=workload.settings(producer=True)),
                "fill",
                queue,
                str(n),
                key,
                str(self.per_parent(workload, n)),
                workload.mode,
                workload.task,
            )
            env = self.env(
                contender,
                queue=queue,
                pool=pool,
                sink_down=workload.sink_down,
                settings=workload.settings(producer=False),
            )
            deadline = time.monotonic() + 120 + n / 50
            cpu_at_start: Optional[dict[int, float]] = None
            sent_before = self.sink_stats()
            with self.worker(env, queue, pool) as process:
                while True:
                    marks = [json.loads(item) for item in self.results.lrange(key, 0, -1)]
                    labels = {m["label"] for m in marks}
                    if cpu_at_start is None and "start" in labels:
                        cpu_at_start = _group_cpu(process.pid)
                    if "end" in labels:
                        cpu_at_end = _group_cpu(process.pid)
                        sent_after = self.sink_stats()
                        break
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{contender} {workload.name} worker did not finish")
                    # Often until the start mark, so that the CPU the processes have used
                    # by then is read close to it; idle time after the end costs no CPU.
                    time.sleep(0.01 if cpu_at_start is None else 0.25)
        finally:
            self.cleanup(queue, key)
        by_label = {m["label"]: m for m in marks}
        start, mid, end = by_label["start"], by_label["mid"], by_label["end"]
        n = n // 2 * 2
        result = {
            "tasks_per_s": n / (end["wall"] - start["wall"]),
            "peak_rss_mb": end["vmhwm"] / 1024,
            "start_rss_mb": start["vmrss"] / 1024,
            "rss_growth_mb": (end["vmrss"] - mid["vmrss"]) / 1024,
        }
        result["gc_us_per_task"] = (sum(end["gc_seconds"]) - sum(start["gc_seconds"])) / n * 1e6
        result["gc_runs_per_1000_tasks"] = [
            (e - s) / n * 1000 for e, s in zip(end["gc_runs"], start["gc_runs"])
        ]
        result["heap_objects"] = start["gc_objects"]
        # What the worker sent to the sink by its end mark (which flushes in a solo
        # worker; in prefork, the other pool process may still hold some): shows what
        # each contender records on each workload, e.g. nothing of a sampled-out trace.
        for field, stat in (("export_requests", "requests"), ("export_kb", "bytes")):
            total = sum(sent_after[stat].values()) - sum(sent_before[stat].values())
            result[field] = total / 1024 if stat == "bytes" else total
        if pool == "solo" and "cpu_after_flush" in end:
            result["cpu_us_per_task"] = (end["cpu_after_flush"] - start["cpu"]) / n * 1e6
        if pool == "prefork" and cpu_at_start is not None:
            # Where a prefork worker's CPU goes: its main process (reads messages, hands
            # them to the pool, reads results) and its pool processes (run the tasks).
            used = {
                pid: cpu - cpu_at_start.get(pid, 0.0) for pid, cpu in cpu_at_end.items()
            }
            main = used.pop(process.pid, 0.0)
            result["main_cpu_us_per_task"] = main / n * 1e6
            result["pool_cpu_us_per_task"] = sum(used.values()) / n * 1e6
        return result

    def latency(self, contender: str) -> dict[str, Any]:
        queue = self.queue_name("latency")
        key = f"probe-{queue}"
        try:
            with self.worker(self.env(contender, queue=queue), queue, "solo"):
                result = self.python(
                    self.env(contender, queue=queue), "latency", str(self.args.n_latency), key
                )
        finally:
            self.cleanup(queue, key)
        return {"latency_ms": statistics.median(result["seconds"]) * 1e3}

    def measure(self, workload: str, contender: str) -> dict[str, Any]:
        chosen = WORKLOAD[workload]
        if chosen.job == "publish":
            return self.publish(contender, chosen)
        if chosen.job == "worker":
            return self.worker_run(contender, chosen)
        return self.latency(contender)


def worker_command(queue: str, pool: str, loglevel: str) -> list[str]:
    """``celery worker`` for the benchmark app on ``queue``, with this interpreter:
    ``-P solo`` or ``-P prefork -c 2``, no mingle, gossip or heartbeat."""
    return [
        PYTHON,
        "-m",
        "celery",
        "-A",
        "benchmarks.app",
        "worker",
        "-P",
        pool,
        *(["-c", "2"] if pool == "prefork" else []),
        "-Q",
        queue,
        "-n",
        f"{queue}@%h",
        "-l",
        loglevel,
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _group_cpu(group: int) -> dict[int, float]:
    """CPU seconds (user + system) used so far by each process of process group
    ``group`` (a worker started in a session of its own, and its pool processes)."""
    used = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[2]) == group:
            used[int(entry)] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return used


def _stop(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL after ``timeout``: to its process group if it leads one
    (a worker and its pool processes), else to it alone."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                if os.getpgid(process.pid) == process.pid:
                    os.killpg(process.pid, signal.SIGKILL)
                else:
                    process.kill()
            except ProcessLookupError:
                pass
            process.wait(10)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in (
        "celery",
        "kombu",
        "redis",
        "langfuse",
        "opentelemetry-sdk",
        "opentelemetry-instrumentation-celery",
        "sentry-sdk",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "src", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "commit": commit + ("+dirty" if dirty else ""),
    }


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        doc = json.loads(args.report_only.read_text())
        doc["summary"] = report.summarise(doc["samples"], doc["settings"]["contenders"])
        (args.out / "results.md").write_text(report.markdown(doc))
        report.plot(doc, args.out / "results.png")
        print(report.markdown(doc))
        return 0
    command = "python benchmarks/run.py" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])
    )
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        w: {c: [] for c in args.contenders} for w in args.workloads
    }
    load_before = os.getloadavg()
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="celery-langfuse-bench-") as tmp,
        Bench(args, Path(tmp)).running() as bench,
    ):
        for rep in range(args.reps):
            order = (
                args.contenders[rep % len(args.contenders) :]
                + args.contenders[: rep % len(args.contenders)]
            )
            for workload in args.workloads:
                for contender in order:
                    t0 = time.monotonic()
                    result = bench.measure(workload, contender)
                    samples[workload][contender].append(result)
                    print(
                        f"rep {rep + 1}/{args.reps} {workload:<12} {contender:<16} "
                        f"{_brief(result)}  ({time.monotonic() - t0:.1f} s)",
                        flush=True,
                    )
        sink_stats = bench.sink_stats()
        hidden = bench.hidden_modules
    doc = {
        "command": command,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "seconds": round(time.monotonic() - started, 1),
        "sink": sink_stats,
        "hidden_modules": hidden,
        "samples": samples,
        "summary": report.summarise(samples, args.contenders),
    }
    (args.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "results.md").write_text(report.markdown(doc))
    report.plot(doc, args.out / "results.png")
    print(report.markdown(doc))
    print(f"wrote {args.out}/results.json, results.md, results.png in {doc['seconds']} s")
    return 0


def _brief(result: dict[str, Any]) -> str:
    def text(value: Any) -> str:
        if isinstance(value, list):
            return "/".join(f"{v:.3g}" for v in value)
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    return " ".join(f"{k}={text(v)}" for k, v in result.items())


if __name__ == "__main__":
    raise SystemExit(main())
