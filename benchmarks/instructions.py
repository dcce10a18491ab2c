"""Count the CPU instructions each Celery tracer costs per task, in a real worker.

    python benchmarks/instructions.py         # all contenders, 5-9 minutes on 2 cores
    python benchmarks/instructions.py --contenders plain,celery-langfuse --tasks 200,1000
    python benchmarks/instructions.py --reps 2 --profile   # keep callgrind files to annotate

Why: on a small shared machine the wall-clock and CPU-time figures of ``run.py`` move by
±30% from one run to the next, more than the differences between tracers. The number of
instructions a process executes does not depend on how busy the machine is: repeated
runs agree to within 0.2%, so one repetition compares tracers.

How: for each contender and two task counts N1 < N2 (``--tasks``), ``run.py``'s producer
fills a fresh queue natively (a ``start`` mark, N no-op tasks published inside request
spans, a ``mid`` and an ``end`` mark), then ``celery -A benchmarks.app worker -P solo``
drains it under ``valgrind --tool=callgrind``, which counts every instruction the
process executes (``Ir``), in all its threads. With ``BENCH_EXIT_AFTER_END=1`` the
worker exits right after the ``end`` mark has flushed the exporter, so valgrind writes
its totals. Startup, imports, one-time lazy work, the final flush's fixed part and exit
cost the same in both runs, so

    instructions per task = (Ir(N2) - Ir(N1)) / (N2 - N1)

is the cost of one task in the steady loop: receiving it, running it, the tracer's
work around it and the exporter's work for its spans. ``fixed`` is what is left of a
run: Ir(N1) - N1 x that slope.

Threads: callgrind's ``--separate-threads=no`` (its default, passed explicitly) writes
one file per process with the totals over all threads, so the exporter threads' work is
counted; the script still sums every file the worker's pid left. Valgrind runs one
thread at a time, which changes when threads run but not what they execute.

Time under valgrind: the worker runs 15-30x slower (6-35 tasks/s), and whatever it
does per second of wall time rather than per task is counted that many times more per
task. The exporters' flush timers are the case that matters: natively a worker runs
~500 tasks/s, so a batch processor sends full batches of 512 spans long before its 5 s
timer fires; under valgrind the timer fires every ~100 tasks and sends 4-5x as many
requests (+0.8% instructions per task for celery-langfuse and OTel when measured). So
``LANGFUSE_FLUSH_INTERVAL`` (celery-langfuse, Langfuse SDK) and ``OTEL_BSP_SCHEDULE_DELAY``
(OTel SDK) are set to ``--flush-interval`` (300 s, longer than those runs) and batches
go by size, as natively; ``--flush-interval 0`` leaves the SDKs' 5 s (compare the export
requests columns). What remains is small: kombu's periodic timers (restoring unacked
messages every 10 s) and threads waking up. An idle worker under callgrind executes about
0.6 M instructions per second (polling included, which a busy worker does not do): at
most 1% of a task at these rates, and running the workers 1.5x slower moved the figures
by less than 0.1%. Sentry sends one request per transaction whatever the timing.

Results go to ``benchmarks/results/instructions.json`` and ``instructions.md``. Needs
valgrind and Redis on 127.0.0.1:6379 (databases 13 and 14, as ``run.py``; it deletes
only its own keys).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from queue import Queue
from typing import Any, Optional
from urllib.request import Request, urlopen

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from benchmarks.contenders import LABELS  # noqa: E402
from benchmarks.run import (  # noqa: E402
    Bench,
    add_bench_arguments,
    check_contenders,
    machine,
    worker_command,
)

#: Worker seconds per task under callgrind relative to plain Celery's, roughly: only used
#: to start the longest runs first, so that parallel jobs end together.
_SLOWNESS = {"sentry": 4.0}
TIMES = "\N{MULTIPLICATION SIGN}"


@dataclass(frozen=True)
class Job:
    contender: str
    tasks: int
    rep: int

    @property
    def weight(self) -> float:
        return self.tasks * _SLOWNESS.get(self.contender, 1.3 if self.contender != "plain" else 1)


@dataclass
class Sample:
    """One worker run under callgrind."""

    contender: str
    tasks: int
    rep: int
    instructions: int
    #: Seconds the valgrind worker ran (start-up included), and tasks/s from start to end.
    seconds: float
    tasks_per_s: float
    #: Requests the exporter sent to the sink during the worker's run, per path.
    export_requests: dict[str, int]
    callgrind_files: list[str]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    parser.add_argument(
        "--tasks",
        default="300,1500",
        help="the two task counts N1,N2 whose difference is measured (default 300,1500)",
    )
    parser.add_argument("--reps", type=int, default=1, help="runs of each (contender, N)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="valgrind workers at once (default: 2, or 1 on one core)",
    )
    parser.add_argument(
        "--flush-interval",
        type=float,
        default=300.0,
        help="exporters' flush interval in seconds under valgrind (default 300, the most "
        "celery-langfuse accepts: batches go by size, as natively); 0 leaves the SDKs' 5 s",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help="seconds one valgrind worker may run (default 180 + 0.5 s per task)",
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        type=Path,
        const=ROOT / "benchmarks" / "results" / "callgrind",
        metavar="DIR",
        help="keep the callgrind files of each contender's first N1 and N2 runs in DIR "
        "(default benchmarks/results/callgrind), and write there each contender's "
        "instructions per task by C function (their difference)",
    )
    parser.add_argument(
        "--report-only",
        type=Path,
        metavar="JSON",
        help="measure nothing: write instructions.md again from an instructions.json",
    )
    args = parser.parse_args(argv)
    check_contenders(parser, args)
    try:
        n1, n2 = (int(n) for n in args.tasks.split(","))
    except ValueError:
        parser.error("--tasks takes two task counts, N1,N2")
    if not 0 < n1 < n2 or n1 % 2 or n2 % 2:
        parser.error("--tasks: 0 < N1 < N2, both even (the producer queues N/2 twice)")
    args.tasks = (n1, n2)
    if args.reps < 1 or args.jobs < 1:
        parser.error("--reps and --jobs must be at least 1")
    if not 0 <= args.flush_interval <= 300:
        parser.error("--flush-interval: 0 to 300 s (celery-langfuse accepts at most 300)")
    return args


def valgrind_version(profile: bool) -> str:
    """valgrind's version; exits with a message when it (or, for ``--profile``,
    callgrind_annotate) is not installed."""
    for tool in ("valgrind", *(["callgrind_annotate"] if profile else [])):
        if shutil.which(tool) is None:
            raise SystemExit(
                f"{tool} is not installed (or not on PATH); valgrind counts the "
                "instructions: apt-get install valgrind"
            )
    done = subprocess.run(["valgrind", "--version"], capture_output=True, text=True, check=True)
    return done.stdout.strip()


class Runner:
    """Runs jobs on a few :class:`Bench` slots, each with its own sink, so that what a
    sink received is what one worker sent."""

    def __init__(self, args: argparse.Namespace, workdir: Path, benches: list[Bench]) -> None:
        self.args = args
        self.workdir = workdir
        self.free: Queue[Bench] = Queue()
        for bench in benches:
            self.free.put(bench)
        #: Valgrind workers running now, killed if the run is interrupted.
        self.processes: set[subprocess.Popen[bytes]] = set()

    def run(self, job: Job) -> Sample:
        bench = self.free.get()
        try:
            return self._measure(bench, job)
        finally:
            self.free.put(bench)

    def _measure(self, bench: Bench, job: Job) -> Sample:
        queue = f"bench-instr-{uuid.uuid4().hex[:8]}"
        key = f"marks-{queue}"
        outdir = self.workdir / queue
        outdir.mkdir()
        try:
            bench.python(
                bench.env(job.contender, queue=queue),
                "fill",
                queue,
                str(job.tasks),
                key,
                str(self.args.per_parent),
            )
            _reset_sink(bench)  # the producer's own exports are not the worker's
            started = time.monotonic()
            pid = self._valgrind_worker(bench, job, queue, outdir)
            seconds = time.monotonic() - started
            marks = {m["label"]: m for m in map(json.loads, bench.results.lrange(key, 0, -1))}
            if "end" not in marks or "cpu_after_flush" not in marks["end"]:
                raise RuntimeError(f"{job}: the worker exited before the end mark flushed")
            files = sorted(outdir.glob(f"cg.{pid}.out*"))
            instructions = sum(callgrind_total(path) for path in files)
            collected = _collected(outdir / "valgrind.log")
            if collected is not None and collected != instructions:
                raise RuntimeError(
                    f"{job}: callgrind files sum to {instructions} Ir, valgrind reports "
                    f"{collected}; are some threads or processes missing?"
                )
            kept = self._keep(job, files)
        finally:
            cleanup(bench, queue, key)
        requests = bench.sink_stats()["requests"]
        return Sample(
            contender=job.contender,
            tasks=job.tasks,
            rep=job.rep,
            instructions=instructions,
            seconds=round(seconds, 1),
            tasks_per_s=round(job.tasks / (marks["end"]["wall"] - marks["start"]["wall"]), 2),
            export_requests=dict(requests),
            callgrind_files=kept,
        )

    def _valgrind_worker(self, bench: Bench, job: Job, queue: str, outdir: Path) -> int:
        """Run the worker under callgrind until it exits by itself; its pid."""
        env = bench.env(job.contender, queue=queue)
        env["BENCH_EXIT_AFTER_END"] = "1"
        # String hashing that is the same in every run: one less source of variation.
        env["PYTHONHASHSEED"] = "0"
        if self.args.flush_interval:
            env["LANGFUSE_FLUSH_INTERVAL"] = f"{self.args.flush_interval:g}"
            env["OTEL_BSP_SCHEDULE_DELAY"] = f"{self.args.flush_interval * 1000:.0f}"
        command = [
            "valgrind",
            "--tool=callgrind",
            "--cache-sim=no",
            "--branch-sim=no",
            "--separate-threads=no",
            f"--callgrind-out-file={outdir}/cg.%p.out",
            f"--log-file={outdir}/valgrind.log",
            *worker_command(queue, "solo", self.args.worker_loglevel),
        ]
        timeout = self.args.timeout or 180 + 0.5 * job.tasks
        log_path = outdir / "worker.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.processes.add(process)
            try:
                returncode = process.wait(timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"{job}: the worker did not finish in {timeout:.0f} s (--timeout)\n"
                    + _tails(log_path, outdir / "valgrind.log")
                ) from None
            finally:
                self.processes.discard(process)
                _kill(process)
        if returncode != 0:
            raise RuntimeError(
                f"{job}: the worker exited {returncode}\n"
                + _tails(log_path, outdir / "valgrind.log")
            )
        return process.pid

    def _keep(self, job: Job, files: list[Path]) -> list[str]:
        if self.args.profile is None or job.rep != 0:
            return []
        self.args.profile.mkdir(parents=True, exist_ok=True)
        kept = []
        for path in files:
            target = self.args.profile / f"{job.contender}.{job.tasks}.{path.name}"
            shutil.copyfile(path, target)
            kept.append(str(target))
        return kept


def function_costs(path: Path) -> dict[str, int]:
    """Instructions executed in each C function (self cost), per ``callgrind_annotate``."""
    done = subprocess.run(
        ["callgrind_annotate", "--threshold=100", "--auto=no", "--show-percs=no", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    costs: dict[str, int] = {}
    for line in done.stdout.splitlines():
        match = _COST_LINE.match(line)
        if match and "PROGRAM TOTALS" not in line:
            name = _short_name(match.group(2))
            costs[name] = costs.get(name, 0) + int(match.group(1).replace(",", ""))
    return costs


_COST_LINE = re.compile(r"^\s*([\d,]+)\s+(\S.*)$")


def _short_name(text: str) -> str:
    """``/build/Python-3.11/Objects/obmalloc.c:_PyObject_Free [/lib/libpython3.11.so]`` ->
    ``_PyObject_Free (obmalloc.c, libpython3.11.so)``; recursion marks (``'2``) dropped."""
    location, _, binary = text.partition(" [")
    file, _, function = location.rpartition(":")
    function = re.sub(r"'\d+$", "", function)
    where = [Path(part).name for part in (file, binary.rstrip("]")) if part and part != "???"]
    return f"{function} ({', '.join(where)})" if where else function


def per_task_profile(n1_file: Path, n2_file: Path, tasks: tuple[int, int]) -> dict[str, float]:
    """Instructions per task in each C function: the difference of the two runs' profiles,
    so that start-up (imports, compiling) drops out as it does from the totals."""
    first, second = function_costs(n1_file), function_costs(n2_file)
    span = tasks[1] - tasks[0]
    return {
        name: (second.get(name, 0) - first.get(name, 0)) / span for name in set(first) | set(second)
    }


def write_profiles(samples: list[Sample], args: argparse.Namespace) -> list[Path]:
    """``<contender>.per-task.txt`` in the profile directory: each contender's
    instructions per task by C function and, for a tracer, what it adds to plain
    Celery's in each, largest first."""
    profiles: dict[str, dict[str, float]] = {}
    for contender in args.contenders:
        files = {
            s.tasks: Path(s.callgrind_files[0])
            for s in samples
            if s.contender == contender and s.rep == 0 and len(s.callgrind_files) == 1
        }
        if len(files) == 2:
            profiles[contender] = per_task_profile(
                files[args.tasks[0]], files[args.tasks[1]], args.tasks
            )
    plain = profiles.get("plain", {})
    written = []
    n1, n2 = args.tasks
    for contender, costs in profiles.items():
        total = sum(costs.values())
        compared = contender != "plain" and bool(plain)
        added = {name: costs.get(name, 0) - plain.get(name, 0) for name in set(costs) | set(plain)}
        lines = [
            f"# {LABELS[contender]}: instructions per task by C function (self cost): "
            f"(N={n2} run - N={n1} run) / {n2 - n1}; total {total:,.0f}.",
            "# Python code shows as the interpreter's functions (_PyEval_EvalFrameDefault ...).",
        ]
        if compared:
            lines.append(
                f"# 'added': minus plain Celery's; total {total - sum(plain.values()):+,.0f}. "
                "Sorted by added."
            )
            lines.append(f"{'per task':>12}  {'added':>10}  function")
            order = sorted(added, key=lambda name: -added[name])
            lines += [
                f"{costs.get(name, 0):12,.0f}  {added[name]:+10,.0f}  {name}"
                for name in order
                if round(costs.get(name, 0)) or round(added[name])
            ]
        else:
            lines.append(f"{'per task':>12}  {'share':>6}  function")
            order = sorted(costs, key=lambda name: -costs[name])
            lines += [
                f"{costs[name]:12,.0f}  {costs[name] / total:6.1%}  {name}"
                for name in order
                if round(costs[name])
            ]
        path = args.profile / f"{contender}.per-task.txt"
        path.write_text("\n".join(lines) + "\n")
        written.append(path)
    return written


def _tails(*logs: Path) -> str:
    """The ends of the run's logs, for an error message (they go with the temporary
    directory)."""
    return "\n".join(
        f"--- {log.name}:\n{log.read_text(errors='replace')[-2000:]}"
        for log in logs
        if log.exists()
    )


def _kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker's process group (it leads one) unless it has exited."""
    if process.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def callgrind_total(path: Path) -> int:
    """The event total of a callgrind output file (``totals:``, else ``summary:``)."""
    found: dict[str, int] = {}
    with open(path, errors="replace") as lines:
        for line in lines:
            if line.startswith(("totals:", "summary:")):
                name, _, value = line.partition(":")
                found[name] = int(value.split()[0])
    if not found:
        raise RuntimeError(f"{path}: no totals; did valgrind finish writing it?")
    return found.get("totals", found.get("summary", 0))


def _collected(log: Path) -> Optional[int]:
    """valgrind's own total (``Collected : N``) from its log, if there."""
    match = re.search(r"Collected\s*:\s*(\d+)", log.read_text(errors="replace"))
    return int(match.group(1)) if match else None


def _reset_sink(bench: Bench) -> None:
    request = Request(f"http://127.0.0.1:{bench.sink_port}/__reset", data=b"", method="POST")
    with urlopen(request, timeout=5):
        pass


def cleanup(bench: Bench, queue: str, key: str) -> None:
    """What ``Bench.cleanup`` deletes, and what else a worker that exits without a
    shutdown leaves: kombu's permanent binding set for the queue, and the ``end`` mark's
    message, still in kombu's ``unacked`` hash (a later worker would restore it)."""
    bench.cleanup(queue, key)
    bench.broker.delete(f"_kombu.binding_permanent.{queue}")
    for tag, value in bench.broker.hscan_iter("unacked"):
        try:
            routing_key = json.loads(value)[2]
        except (ValueError, IndexError, TypeError):
            continue
        if routing_key == queue:
            bench.broker.hdel("unacked", tag)
            bench.broker.zrem("unacked_index", tag)


def summarise(samples: list[Sample], contenders: list[str], tasks: tuple[int, int]) -> dict:
    """Instructions per task of each contender (median over repetitions, each paired
    N1 with N2 run of the same repetition), the spread, and comparisons to plain."""
    n1, n2 = tasks
    summary: dict[str, Any] = {}
    for contender in contenders:
        by_rep: dict[int, dict[int, int]] = {}
        for s in samples:
            if s.contender == contender:
                by_rep.setdefault(s.rep, {})[s.tasks] = s.instructions
        slopes = [(ir[n2] - ir[n1]) / (n2 - n1) for ir in by_rep.values()]
        fixed = [ir[n1] - n1 * (ir[n2] - ir[n1]) / (n2 - n1) for ir in by_rep.values()]
        per_task = statistics.median(slopes)
        requests = [
            sum(s.export_requests.values())
            for s in samples
            if s.contender == contender and s.tasks == n2
        ]
        summary[contender] = {
            "per_task": per_task,
            "per_task_reps": slopes,
            "spread": (max(slopes) - min(slopes)) / per_task if len(slopes) > 1 else None,
            "fixed": statistics.median(fixed),
            "export_requests_n2": statistics.median(requests) if requests else 0,
        }
    plain = summary["plain"]["per_task"]
    for entry in summary.values():
        entry["ratio"] = entry["per_task"] / plain
        entry["added"] = entry["per_task"] - plain
    return summary


def table(summary: dict[str, Any], contenders: list[str], tasks: tuple[int, int]) -> str:
    lines = [
        f"| contender | instructions/task | {TIMES} plain | added/task vs plain | fixed (startup, "
        f"exit) | export requests, N={tasks[1]} run | spread over reps |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for contender in contenders:
        e = summary[contender]
        spread = "-" if e["spread"] is None else f"{e['spread']:.2%}"
        added = "-" if contender == "plain" else f"{e['added'] / 1e6:+.3f} M"
        lines.append(
            f"| {LABELS[contender]} | {e['per_task'] / 1e6:.3f} M | {e['ratio']:.2f}{TIMES} | "
            f"{added} | {e['fixed'] / 1e9:.2f} G | {e['export_requests_n2']:g} | {spread} |"
        )
    return "\n".join(lines)


def markdown(doc: dict[str, Any]) -> str:
    n1, n2 = doc["settings"]["tasks"]
    contenders = doc["settings"]["contenders"]
    m = doc["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    flush = doc["settings"]["flush_interval"]
    out = [
        "# Instructions per task in a `celery worker -P solo`, counted by callgrind\n",
        f"(Ir({n2}) - Ir({n1})) / {n2 - n1}: the instructions the worker process executes "
        "(all threads) per task in the steady loop, including the exporter's work for its "
        "spans; fixed costs (startup, imports, the flush's fixed part, exit) cancel and "
        "are shown as *fixed*. Median over "
        f"{doc['settings']['reps']} repetition(s). Exporters' flush interval: "
        + (f"{flush:g} s (batches go by size, as natively)." if flush else "the SDKs' own.")
        + "\n",
        table(doc["summary"], contenders, (n1, n2)),
        "",
        "Counted: the user-space instructions of the worker process, all its threads. Not "
        "counted: the kernel's work for its system calls (Redis, the exporters' HTTP "
        "requests: Sentry sends one per task), the sink's and Redis's work, and how fast "
        "the instructions run (cache misses): instructions are not time, but they do not "
        "vary with the machine's load. *Export requests*: what the worker sent to the "
        "sink in the N2 run.\n",
        "Runs:\n",
        "| contender | N | rep | instructions | valgrind s | tasks/s under valgrind "
        "| export requests |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in doc["samples"]:
        requests = sum(s["export_requests"].values())
        out.append(
            f"| {LABELS[s['contender']]} | {s['tasks']} | {s['rep'] + 1} | "
            f"{s['instructions']:,} | {s['seconds']:.0f} | {s['tasks_per_s']:.1f} | {requests} |"
        )
    out.append("")
    out.append(
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['platform']}, "
        f"{doc['valgrind']}. Versions: {versions}. Commit {m['commit']}. "
        f"Took {doc['seconds']:.0f} s with {doc['settings']['jobs']} parallel job(s): "
        f"`{doc['command']}`.\n"
    )
    return "\n".join(out)


def _jobs(args: argparse.Namespace) -> list[Job]:
    jobs = [Job(c, n, rep) for rep in range(args.reps) for c in args.contenders for n in args.tasks]
    return sorted(jobs, key=lambda job: -job.weight)  # longest first: parallel jobs end together


def _benches(args: argparse.Namespace, workdir: Path, stack: ExitStack) -> Iterator[Bench]:
    for _ in range(args.jobs):
        yield stack.enter_context(Bench(args, workdir).running())


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        text = markdown(json.loads(args.report_only.read_text()))
        (args.out / "instructions.md").write_text(text)
        print(text)
        return 0
    valgrind = valgrind_version(args.profile is not None)
    command = "python benchmarks/instructions.py" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])
    )
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = _jobs(args)
    started = time.monotonic()
    samples: list[Sample] = []
    with (
        tempfile.TemporaryDirectory(prefix="celery-langfuse-instr-") as tmp,
        ExitStack() as stack,
    ):
        runner = Runner(args, Path(tmp), list(_benches(args, Path(tmp), stack)))
        pool = ThreadPoolExecutor(args.jobs)
        try:
            for job, sample in zip(jobs, pool.map(runner.run, jobs)):
                samples.append(sample)
                print(
                    f"{job.contender:<16} N={job.tasks:<6} rep {job.rep + 1}/{args.reps}  "
                    f"{sample.instructions:>15,} Ir  {sample.seconds:6.1f} s  "
                    f"exports {sum(sample.export_requests.values())}",
                    flush=True,
                )
        finally:
            # On an error or ^C: start no more runs, and stop those still going.
            pool.shutdown(wait=False, cancel_futures=True)
            for process in list(runner.processes):
                _kill(process)
            pool.shutdown(wait=True)
    samples.sort(key=lambda s: (args.contenders.index(s.contender), s.tasks, s.rep))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    doc = {
        "command": command,
        "settings": settings,
        "machine": machine(),
        "valgrind": valgrind,
        "seconds": round(time.monotonic() - started, 1),
        "samples": [asdict(s) for s in samples],
        "summary": summarise(samples, args.contenders, args.tasks),
    }
    (args.out / "instructions.json").write_text(json.dumps(doc, indent=2) + "\n")
    text = markdown(doc)
    (args.out / "instructions.md").write_text(text)
    print()
    print(text)
    print(f"wrote {args.out}/instructions.json and instructions.md in {doc['seconds']} s")
    if args.profile is not None:
        for path in write_profiles(samples, args):
            print(f"wrote {path}")
        print(f"callgrind files in {args.profile}: callgrind_annotate FILE | head -40")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
