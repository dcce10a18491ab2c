"""Does tracing move celery beat's sends? Three real beats, side by side.

Starts three ``celery beat`` processes at the same time, on the same Redis, each with
one entry due every ``--interval`` seconds (``tests/support/beat_app.py``), and
compares when each one sent its runs:

- ``untraced``: celery-langfuse uninstalled from the app;
- ``traced``: exporting to a local capture server (a Langfuse that answers);
- ``traced, Langfuse down``: exporting to a closed port on 127.0.0.1.

Running them together means they share the machine's load, so their figures compare.
For each beat the table shows how many runs it sent, how far the gaps between sends
stray from the interval (median, 95th percentile, max), and how long it took to stop
after SIGTERM (the traced ones flush with ``flush_timeout``, here 1 s).

Send times are the scheduler's own log lines ("Sending due task"), millisecond
resolution. Needs Redis; run from the repository root:

    PYTHONPATH=src:. python benchmarks/beat_jitter.py [--seconds 20] [--redis URL]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from redis import Redis

from celery_langfuse.testing import CaptureServer

ROOT = Path(__file__).resolve().parent.parent
SENT = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): INFO/\w+\] Scheduler: Sending due task"
)
FLUSH_TIMEOUT = 1.0


@dataclass
class Beat:
    label: str
    queue: str
    process: subprocess.Popen[bytes]
    log_path: Path
    stop_seconds: float = 0.0

    def send_times(self) -> list[float]:
        times = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            match = SENT.match(line)
            if match:
                stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
                times.append(stamp.timestamp())
        return times

    def stop(self) -> None:
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stop_seconds = time.monotonic() - started


def start_beat(label: str, env: dict[str, str], redis_url: str, interval: float, tmp: Path) -> Beat:
    queue = f"jitter-{uuid.uuid4().hex[:8]}"
    log_path = tmp / f"{queue}.log"
    full_env = {
        **os.environ,
        **env,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")])
        ),
        "CELERY_LANGFUSE_TEST_BROKER": redis_url,
        "CELERY_LANGFUSE_TEST_QUEUE": queue,
        "CELERY_LANGFUSE_TEST_BEAT_ENTRIES": "tick",
        "CELERY_LANGFUSE_TEST_BEAT_INTERVAL": str(interval),
        "CELERY_LANGFUSE_TEST_FLUSH_TIMEOUT": str(FLUSH_TIMEOUT),
    }
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "tests.support.beat_app", "beat",
                "-l", "INFO", "-s", str(tmp / f"schedule-{queue}"), "--max-interval", "1",
            ],
            cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    return Beat(label, queue, process, log_path)


def gap_errors_ms(times: list[float], interval: float) -> list[float]:
    return [abs((later - earlier) - interval) * 1000 for earlier, later in zip(times, times[1:])]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the beats run")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between runs")
    parser.add_argument(
        "--redis",
        default=os.environ.get("CELERY_LANGFUSE_TEST_REDIS", "redis://127.0.0.1:6379/1"),
        help="broker URL (messages are deleted afterwards)",
    )
    args = parser.parse_args()
    Redis.from_url(args.redis, socket_connect_timeout=2).ping()

    down = {
        "LANGFUSE_BASE_URL": f"http://127.0.0.1:{closed_port()}",
        "LANGFUSE_PUBLIC_KEY": "pk-lf-benchmark",
        "LANGFUSE_SECRET_KEY": "sk-lf-benchmark",
    }
    with CaptureServer() as server, tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        beats = [
            start_beat("untraced", {**down, "CELERY_LANGFUSE_TEST_BEAT_TRACING": "off"},
                       args.redis, args.interval, tmp),
            start_beat("traced", server.env, args.redis, args.interval, tmp),
            start_beat("traced, Langfuse down", down, args.redis, args.interval, tmp),
        ]
        try:
            time.sleep(args.seconds)
        finally:
            for beat in beats:
                beat.stop()
            redis = Redis.from_url(args.redis)
            for beat in beats:  # its queue and kombu's bindings for it
                redis.delete(*redis.scan_iter(f"*{beat.queue}*"))
        roots = sum(1 for obs in server.observations if obs.name.startswith("cron "))

        print(f"{args.seconds:g} s, one entry every {args.interval:g} s, "
              f"flush_timeout {FLUSH_TIMEOUT:g} s\n")
        print(f"{'beat':<24}{'runs':>6}{'gap error ms p50':>18}{'p95':>8}{'max':>8}{'stop s':>8}")
        for beat in beats:
            errors = gap_errors_ms(beat.send_times(), args.interval) or [float("nan")]
            print(
                f"{beat.label:<24}{len(beat.send_times()):>6}"
                f"{statistics.median(errors):>18.1f}{percentile(errors, 0.95):>8.1f}"
                f"{max(errors):>8.1f}{beat.stop_seconds:>8.2f}"
            )
        print(f"\ncron root observations received from the traced beat: {roots}")


if __name__ == "__main__":
    main()
