"""The whole example on one machine, traced, in about fifteen seconds.

    python -m example_project.demo

Starts the API (uvicorn on 127.0.0.1), a Celery worker and Celery beat as
subprocesses, sends a burst of requests from three users, waits for the work to
finish, and prints the traces Langfuse receives as trees. Nothing to install besides
``pip install -e '.[demo]'``:

- broker: the local Redis when it answers (``--redis-url``), otherwise kombu's
  ``filesystem://`` transport in a temporary folder, which needs no server;
- Langfuse: a local capture server (``celery_langfuse.testing.CaptureServer``) that
  rebuilds the traces Langfuse would show. When LANGFUSE_PUBLIC_KEY,
  LANGFUSE_SECRET_KEY and LANGFUSE_BASE_URL are set, everything goes to that
  Langfuse instead and the demo prints the trace ids to look up.

Exits 0 when every request trace is complete (request -> tasks -> nested runs in one
trace, user and session on every observation, no orphans), 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import httpx

from celery_langfuse.testing import CaptureServer, Trace

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_SECONDS = 30.0
BEAT_INTERVAL_SECONDS = 2.0
LANGFUSE_KEYS = ("LANGFUSE_PUBLIC_KEY", "LANGFUSE_SECRET_KEY", "LANGFUSE_BASE_URL")
#: A prefork worker that is ready in about a second.
WORKER_ARGS = (
    "worker", "-l", "INFO", "-P", "prefork", "-c", "2",
    "--without-mingle", "--without-gossip", "--without-heartbeat",
)  # fmt: skip


def uvicorn_command(target: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", target,
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip


def celery_command(app: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", app, *args]


@dataclass(frozen=True)
class Site:
    """How one variant of the example starts; the burst, checks and report are shared.

    ``commands(port, workdir)`` gives the api, worker and beat command lines, in that
    order; ``setup`` runs once before them; ``env`` is added to every process's.
    """

    prog: str
    commands: Callable[[int, Path], dict[str, list[str]]]
    env: Mapping[str, str] = field(default_factory=dict)
    setup: tuple[str, ...] = ()
    deadline_seconds: float = DEADLINE_SECONDS


#: The FastAPI example: uvicorn, a worker and beat with its schedule file.
FASTAPI = Site(
    prog="python -m example_project.demo",
    commands=lambda port, workdir: {
        "api": uvicorn_command("example_project.api:app", port),
        "worker": celery_command("example_project.celery_app", *WORKER_ARGS),
        "beat": celery_command(
            "example_project.celery_app", "beat", "-l", "INFO", "-s", str(workdir / "beat-schedule")
        ),
    },
)

REPORT = (
    "revenue grew in every region while support costs fell after the new triage flow "
    "shipped and the team closed the backlog of enterprise tickets before the audit "
    "began so the board approved the hiring plan for the next two quarters"
)
WORDS = REPORT.split()


@dataclass(frozen=True)
class Document:
    user: str
    session: str
    title: str
    text: str


DOCUMENTS = (
    Document("alice", "s-alice-1", "Quarterly report", " ".join(WORDS * 3)),  # 3 chunks
    # "[busy]" makes the fake model fail once: the retry stays in the same trace.
    Document("bob", "s-bob-7", "Incident review", "[busy] " + " ".join(WORDS * 2)),
    Document("carol", "s-carol-2", "Release notes", " ".join(WORDS[:30])),
)


@dataclass
class DemoResult:
    """What the demo did and what Langfuse received (``traces``: capture mode only)."""

    broker: str
    sink: str
    summary_ids: list[str] = field(default_factory=list)
    request_trace_ids: list[str] = field(default_factory=list)
    traces: list[Trace] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def main(argv: list[str] | None = None, site: Site = FASTAPI, description: str = __doc__) -> int:
    parser = argparse.ArgumentParser(prog=site.prog, description=description)
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("DEMO_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis to use as broker when it answers (default: %(default)s)",
    )
    parser.add_argument(
        "--no-redis", action="store_true", help="use the filesystem broker even if Redis answers"
    )
    parser.add_argument(
        "--capture",
        action="store_true",
        help="show traces locally even when LANGFUSE_* point at a real Langfuse",
    )
    args = parser.parse_args(argv)
    result = run(
        redis_url=None if args.no_redis else args.redis_url,
        real_langfuse=None if not args.capture else False,
        site=site,
    )
    return 0 if result.ok else 1


def run(
    *,
    redis_url: str | None = "redis://127.0.0.1:6379/0",
    real_langfuse: bool | None = None,
    out: TextIO = sys.stdout,
    site: Site = FASTAPI,
) -> DemoResult:
    """Run the demo once. ``real_langfuse=None`` decides from the LANGFUSE_* variables."""
    if real_langfuse is None:
        real_langfuse = all(os.environ.get(key) for key in LANGFUSE_KEYS)
    progress = Progress(out)
    with ExitStack() as stack:
        workdir = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="celery-langfuse-demo-"))
        )
        broker_env, broker = _broker(redis_url, workdir)
        capture: CaptureServer | None = None
        if real_langfuse:
            sink_env: dict[str, str] = {}
            sink = f"Langfuse at {os.environ['LANGFUSE_BASE_URL']}"
        else:
            capture = stack.enter_context(CaptureServer())
            sink_env, sink = capture.env, f"local capture server at {capture.base_url}"
        result = DemoResult(broker=broker, sink=sink)
        progress.say(f"broker: {broker}; traces go to the {sink}")

        port = _free_port()
        database = workdir / "summaries.sqlite3"
        env = {
            **os.environ,
            **sink_env,
            **broker_env,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
            "CELERY_QUEUE": f"demo-{uuid.uuid4().hex[:8]}",
            "SUMMARIES_DATABASE": str(database),
            "BEAT_INTERVAL_SECONDS": str(BEAT_INTERVAL_SECONDS),
            "LANGFUSE_TRACING_ENVIRONMENT": os.environ.get("LANGFUSE_TRACING_ENVIRONMENT", "demo"),
            **site.env,
        }
        deadline = time.monotonic() + site.deadline_seconds
        if site.setup:
            progress.say(f"setting up: {' '.join(site.setup)}")
            subprocess.run(
                [sys.executable, *site.setup],
                cwd=ROOT,
                env=env,
                check=True,
                timeout=site.deadline_seconds,
            )
        services = stack.enter_context(_services(env, site.commands(port, workdir), workdir))
        base_url = f"http://127.0.0.1:{port}"

        progress.step("starting api, worker and beat", lambda: _ready(services, base_url), deadline)
        with httpx.Client(base_url=base_url, timeout=10) as http:
            _send_burst(http, result, progress)
            progress.step(
                "summarising",
                lambda: _all_done(database, result.summary_ids, progress, capture),
                deadline,
            )
            # One read of a finished summary, as a user would poll it.
            http.get(
                f"/summaries/{result.summary_ids[0]}",
                headers=_auth(DOCUMENTS[0]),
            ).raise_for_status()
        if capture is not None:
            progress.step(
                "waiting for beat and the last observations",
                lambda: _traces_complete(capture, result),
                deadline,
            )
        for service in reversed(services):
            service.stop()
        progress.done()

        if capture is None:
            _report_real(result, out)
        else:
            result.traces = capture.traces()
            result.problems = check(result.traces, result.request_trace_ids)
            _report_captured(result, out)
        for service in services:
            if service.returncode not in (0, -signal.SIGTERM):
                result.problems.append(f"{service.name} exited with {service.returncode}")
        return result


# -- the burst of requests -----------------------------------------------------------


def _auth(document: Document) -> dict[str, str]:
    return {"Authorization": f"Bearer {document.user}", "X-Session-Id": document.session}


def _send_burst(http: httpx.Client, result: DemoResult, progress: Progress) -> None:
    for document in DOCUMENTS:
        response = http.post(
            "/summaries",
            json={"title": document.title, "text": document.text},
            headers=_auth(document),
        )
        response.raise_for_status()
        body = response.json()
        result.summary_ids.append(body["id"])
        if body.get("trace_id"):
            result.request_trace_ids.append(body["trace_id"])
        progress.update(requests=len(result.summary_ids))
    # What goes wrong, too: an unknown id (404), an empty text (422), a health check
    # (excluded: no trace at all).
    http.get("/summaries/does-not-exist", headers=_auth(DOCUMENTS[0]))
    http.post("/summaries", json={"text": ""}, headers=_auth(DOCUMENTS[1]))
    http.get("/health")
    progress.update(requests=len(DOCUMENTS) + 3)


def _all_done(
    database: Path, summary_ids: list[str], progress: Progress, capture: CaptureServer | None
) -> bool:
    with sqlite3.connect(database, timeout=5) as db:
        marks = ",".join("?" * len(summary_ids))
        rows = db.execute(
            f"SELECT COUNT(*) FROM summaries WHERE status = 'done' AND id IN ({marks})", summary_ids
        ).fetchone()
    done = int(rows[0])
    progress.update(done=done, observations=len(capture.observations) if capture else None)
    return done == len(summary_ids)


def _traces_complete(capture: CaptureServer, result: DemoResult) -> bool:
    traces = {trace.id: trace for trace in capture.traces()}
    complete = all(
        trace_id in traces and traces[trace_id].find_all("summaries.store_summary")
        for trace_id in result.request_trace_ids
    )
    beat_runs = [t for t in traces.values() if _is_beat(t)]
    return complete and len(beat_runs) >= 2


# -- checks and reports ------------------------------------------------------------


def check(traces: list[Trace], request_trace_ids: list[str]) -> list[str]:
    """What must hold for every POST /summaries trace; an empty list means all is well."""
    problems: list[str] = []
    by_id = {trace.id: trace for trace in traces}
    for trace_id in request_trace_ids:
        trace = by_id.get(trace_id)
        if trace is None:
            problems.append(f"trace {trace_id} never arrived")
            continue
        names = {obs.name for obs in trace.observations}
        for expected in (
            "POST /summaries",
            "summaries.summarise_document",
            "summaries.summarise_chunk",
            "summarise chunk",
            "summaries.combine_summaries",
            "summaries.store_summary",
        ):
            if expected not in names:
                problems.append(f"trace {trace_id} has no {expected!r} observation")
        if trace.orphans():
            problems.append(f"trace {trace_id} has {len(trace.orphans())} orphan observation(s)")
        if len(trace.root_observations()) != 1:
            problems.append(f"trace {trace_id} has {len(trace.root_observations())} roots")
        missing_ids = [
            obs.name for obs in trace.observations if not (obs.user_id and obs.session_id)
        ]
        if missing_ids:
            problems.append(f"trace {trace_id}: no user/session on {sorted(set(missing_ids))}")
    if any(obs.name.startswith("GET /health") for trace in traces for obs in trace.observations):
        problems.append("the excluded /health request was traced")
    if not any(_is_beat(trace) for trace in traces):
        problems.append("no beat run was traced")
    return problems


def _is_beat(trace: Trace) -> bool:
    return any(obs.name.startswith("maintenance.") for obs in trace.observations)


def _report_captured(result: DemoResult, out: TextIO) -> None:
    requests = [t for t in result.traces if not _is_beat(t)]
    beat: dict[str, Trace] = {}
    for trace in result.traces:
        if _is_beat(trace):
            beat.setdefault(str(trace.name), trace)  # the first run of each entry
    observations = sum(len(t.observations) for t in result.traces)
    orphans = sum(len(t.orphans()) for t in result.traces)
    out.write(f"\n=== {len(requests)} request traces ===\n\n")
    out.write("\n\n".join(trace.tree() for trace in requests))
    out.write(
        f"\n\n=== beat: {len(result.traces) - len(requests)} runs, first of each entry ===\n\n"
    )
    out.write("\n\n".join(trace.tree() for trace in beat.values()))
    out.write(
        f"\n\n{len(result.traces)} traces, {observations} observations, {orphans} orphans"
        f" (broker: {result.broker})\n"
    )
    if result.problems:
        out.write("PROBLEMS:\n" + "".join(f"  - {problem}\n" for problem in result.problems))
    else:
        out.write(
            "every request trace is complete: request -> tasks -> nested runs, "
            "with user and session\n"
        )


def _report_real(result: DemoResult, out: TextIO) -> None:
    out.write(f"\nSent to {result.sink}. Look up these traces (one per POST /summaries):\n")
    out.write("".join(f"  {trace_id}\n" for trace_id in result.request_trace_ids))
    out.write("Beat runs appear as their own traces, tagged cron.\n")


# -- processes ---------------------------------------------------------------------


class Service:
    """One subprocess of the demo, its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a warm shutdown that flushes traces), SIGKILL after ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@contextmanager
def _services(
    env: dict[str, str], commands: dict[str, list[str]], workdir: Path
) -> Iterator[list[Service]]:
    services = [Service(name, command, env, workdir) for name, command in commands.items()]
    try:
        yield services
    except BaseException:
        for service in services:
            service.stop(timeout=5)
        logs = "\n".join(f"--- {s.name} log ---\n{s.log()[-3000:]}" for s in services)
        sys.stderr.write(f"{logs}\n")
        raise
    finally:
        for service in services:
            service.stop(timeout=5)


def _ready(services: list[Service], base_url: str) -> bool:
    for service in services:
        if service.returncode is not None:
            raise RuntimeError(f"{service.name} exited early:\n{service.log()[-3000:]}")
    if "ready." not in services[1].log():
        return False
    try:
        return httpx.get(f"{base_url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _broker(redis_url: str | None, workdir: Path) -> tuple[dict[str, str], str]:
    if redis_url and _redis_answers(redis_url):
        return {"CELERY_BROKER_URL": redis_url, "CELERY_RESULT_BACKEND": redis_url}, redis_url
    folder = workdir / "broker"
    return (
        {"CELERY_BROKER_URL": "filesystem://", "CELERY_BROKER_FOLDER": str(folder)},
        f"filesystem:// in {folder} (no Redis at {redis_url})" if redis_url else "filesystem://",
    )


def _redis_answers(url: str) -> bool:
    try:
        from redis import Redis
    except ImportError:
        return False
    try:
        return bool(Redis.from_url(url, socket_connect_timeout=1).ping())
    except Exception:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- progress ----------------------------------------------------------------------


class Progress:
    """One status line, redrawn in place on a terminal; plain lines otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.started = time.monotonic()
        self.live = bool(getattr(out, "isatty", lambda: False)())
        self.stage = "starting"
        self.counts: dict[str, Any] = {"requests": 0, "done": 0, "observations": None}

    def say(self, message: str) -> None:
        self._clear()
        self.out.write(f"[demo] {message}\n")
        self.out.flush()

    def update(self, **counts: Any) -> None:
        self.counts.update(counts)
        self._draw()

    def step(self, stage: str, condition: Any, deadline: float) -> None:
        self.stage = stage
        if not self.live:
            self.say(f"{self._elapsed()} {stage}...")
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"demo: gave up while {stage} (past its deadline)")
            self._draw()
            time.sleep(0.1)

    def done(self) -> None:
        self.stage = "done"
        self._draw()
        if self.live:
            self.out.write("\n")
        else:
            self.say(f"{self._elapsed()} done")

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self.started:5.1f}s"

    def _draw(self) -> None:
        if not self.live:
            return
        observations = self.counts["observations"]
        line = (
            f"[demo] {self._elapsed()}  {self.stage:<42} requests {self.counts['requests']}"
            f"  summaries done {self.counts['done']}/{len(DOCUMENTS)}"
            + (f"  observations {observations}" if observations is not None else "")
        )
        self.out.write("\r" + line[: self._width()].ljust(self._width()))
        self.out.flush()

    def _clear(self) -> None:
        if self.live:
            self.out.write("\r" + " " * self._width() + "\r")

    @staticmethod
    def _width() -> int:
        # One column short of the terminal, so the line never wraps and \r redraws it.
        return max(shutil.get_terminal_size().columns - 1, 20)


if __name__ == "__main__":
    sys.exit(main())
