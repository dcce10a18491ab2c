"""The Django example (example_project/django_site) on one machine, traced, with one
command:

    python -m example_project.django_demo

Prepares a SQLite database (migrations and the beat schedule, ``demo_setup``), starts
the Django site under uvicorn (ASGI), a prefork Celery worker and Celery beat with
django-celery-beat's ``DatabaseScheduler`` as subprocesses, sends the FastAPI demo's
burst of requests from three users, waits for the work, and prints the traces
Langfuse receives. Needs ``pip install -e '.[demo,django]'``.

Broker and Langfuse as in ``python -m example_project.demo``: the local Redis when it
answers, else kombu's ``filesystem://`` transport; a local capture server, unless
LANGFUSE_PUBLIC_KEY, LANGFUSE_SECRET_KEY and LANGFUSE_BASE_URL are set.

This module sits beside the site, not in it: importing the site's package loads its
Celery app and so its Django settings, which only the subprocesses should do.

Exits 0 when every request trace is complete (request -> delay_on_commit -> tasks ->
nested runs in one trace, user and session on every observation, no orphans, beat
runs traced), 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TextIO

import httpx

from celery_langfuse.testing import CaptureServer

# The FastAPI demo's burst, checks and reports serve this one too: same documents,
# same routes (POST /summaries, GET /summaries/<id>), same promises.
from example_project import demo as shared
from example_project.demo import DOCUMENTS, DemoResult, Progress, Service, check

ROOT = shared.ROOT
DEADLINE_SECONDS = 90.0  # Django's migrations and three interpreters on a loaded machine
SETTINGS = "example_project.django_site.settings"
APP = "example_project.django_site"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m example_project.django_demo", description=__doc__
    )
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
    )
    return 0 if result.ok else 1


def run(
    *,
    redis_url: str | None = "redis://127.0.0.1:6379/0",
    real_langfuse: bool | None = None,
    out: TextIO = sys.stdout,
) -> DemoResult:
    """Run the demo once. ``real_langfuse=None`` decides from the LANGFUSE_* variables."""
    if real_langfuse is None:
        real_langfuse = all(os.environ.get(key) for key in shared.LANGFUSE_KEYS)
    progress = Progress(out)
    with ExitStack() as stack:
        workdir = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="celery-langfuse-django-"))
        )
        broker_env, broker = shared._broker(redis_url, workdir)
        broker_env.pop("CELERY_RESULT_BACKEND", None)  # results: django-celery-results
        capture: CaptureServer | None = None
        if real_langfuse:
            sink_env: dict[str, str] = {}
            sink = f"Langfuse at {os.environ['LANGFUSE_BASE_URL']}"
        else:
            capture = stack.enter_context(CaptureServer())
            sink_env, sink = capture.env, f"local capture server at {capture.base_url}"
        result = DemoResult(broker=broker, sink=sink)
        progress.say(f"broker: {broker}; traces go to the {sink}")

        port = shared._free_port()
        database = workdir / "summaries.sqlite3"
        env = {
            **os.environ,
            **sink_env,
            **broker_env,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
            "DJANGO_SETTINGS_MODULE": SETTINGS,
            "CELERY_QUEUE": f"demo-django-{uuid.uuid4().hex[:8]}",
            "SUMMARIES_DATABASE": str(database),
            "BEAT_INTERVAL_SECONDS": str(shared.BEAT_INTERVAL_SECONDS),
            "LANGFUSE_TRACING_ENVIRONMENT": os.environ.get("LANGFUSE_TRACING_ENVIRONMENT", "demo"),
        }
        deadline = time.monotonic() + DEADLINE_SECONDS
        progress.say("migrating the database and writing the beat schedule (demo_setup)")
        subprocess.run(
            [sys.executable, "-m", "django", "demo_setup"],
            cwd=ROOT,
            env=env,
            check=True,
            timeout=DEADLINE_SECONDS,
        )
        services = stack.enter_context(_services(env, port, workdir))
        base_url = f"http://127.0.0.1:{port}"

        progress.step(
            "starting django, worker and beat",
            lambda: shared._ready(services, base_url),
            deadline,
        )
        with httpx.Client(base_url=base_url, timeout=10) as http:
            shared._send_burst(http, result, progress)
            progress.step(
                "summarising",
                lambda: shared._all_done(database, result.summary_ids, progress, capture),
                deadline,
            )
            http.get(
                f"/summaries/{result.summary_ids[0]}", headers=shared._auth(DOCUMENTS[0])
            ).raise_for_status()
        if capture is not None:
            progress.step(
                "waiting for beat and the last observations",
                lambda: shared._traces_complete(capture, result),
                deadline,
            )
        for service in reversed(services):
            service.stop()
        progress.done()

        if capture is None:
            shared._report_real(result, out)
        else:
            result.traces = capture.traces()
            result.problems = check(result.traces, result.request_trace_ids)
            shared._report_captured(result, out)
        for service in services:
            if service.returncode not in (0, -15):  # SIGTERM: a warm shutdown
                result.problems.append(f"{service.name} exited with {service.returncode}")
        return result


@contextmanager
def _services(env: dict[str, str], port: int, workdir: Path) -> Iterator[list[Service]]:
    celery = [sys.executable, "-m", "celery", "-A", APP]
    services = [
        Service(
            "api",
            [
                sys.executable,
                "-m",
                "uvicorn",
                f"{APP}.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env,
            workdir,
        ),
        Service(
            "worker",
            [
                *celery,
                "worker",
                "-l",
                "INFO",
                "-P",
                "prefork",
                "-c",
                "2",
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
            ],
            env,
            workdir,
        ),
        Service(
            "beat",
            [
                *celery,
                "beat",
                "-l",
                "INFO",
                "-S",
                "django_celery_beat.schedulers:DatabaseScheduler",
                "--max-interval",
                "1",
            ],
            env,
            workdir,
        ),
    ]
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


if __name__ == "__main__":
    sys.exit(main())
