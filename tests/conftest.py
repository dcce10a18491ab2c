"""Shared fixtures: real Redis, real Celery workers, the capture harness.

Every service a test needs must answer; a missing one is a failure, never a skip.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import pytest
from celery.contrib.testing.worker import start_worker
from redis import Redis

from celery_langfuse.testing import CaptureServer, Trace

ROOT = Path(__file__).resolve().parent.parent
# A user's project (docs/testing.md), run by tests/test_user_project.py in its own pytest.
collect_ignore = ["user_project"]
REDIS_URL = os.environ.get("CELERY_LANGFUSE_TEST_REDIS", "redis://127.0.0.1:6379/1")
# The apps in tests/support read their broker from CELERY_LANGFUSE_TEST_BROKER: in this
# process too it is the Redis the workers started here listen on (a parallel run with
# its own CELERY_LANGFUSE_TEST_REDIS then publishes where its workers consume).
os.environ.setdefault("CELERY_LANGFUSE_TEST_BROKER", REDIS_URL)


def require_redis(url: str = REDIS_URL) -> None:
    try:
        Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception as exc:  # a missing service fails the test, it never skips it
        pytest.fail(f"Redis must answer at {url} for this test: {exc}")


@pytest.fixture
def capture(langfuse_capture_clean: CaptureServer) -> Iterator[CaptureServer]:
    """The session's capture server, emptied (buffered spans flushed first) for this test."""
    yield langfuse_capture_clean


@pytest.fixture
def tasks_app() -> Iterator[Any]:
    """tests/support/tasks.py's app on real Redis, with its queue purged."""
    require_redis()
    from tests.support import tasks

    tasks.app.control.purge()
    yield tasks


@pytest.fixture(scope="module")
def running_worker(langfuse_capture: CaptureServer) -> Iterator[Any]:
    """tests/support/tasks.py's app served by an in-thread worker (threads pool) for
    the whole module."""
    require_redis()
    from tests.support import tasks

    tasks.app.control.purge()
    with in_thread_worker(tasks.app, pool="threads", concurrency=2) as running:
        yield running


@contextmanager
def in_thread_worker(app: Any, pool: str = "solo", concurrency: int = 1) -> Iterator[Any]:
    with start_worker(
        app,
        pool=pool,
        concurrency=concurrency,
        perform_ping_check=False,
        shutdown_timeout=10,
        loglevel="WARNING",
    ) as worker:
        yield worker


def flush_in_process() -> None:
    from celery_langfuse import client

    client.flush(5)


def request_trace(
    capture: CaptureServer, root: str, *containing: str, timeout: float = 20.0
) -> Trace:
    """After a request: flush this process, then the one trace rooted at ``root``
    once every observation named in ``containing`` arrived too."""
    flush_in_process()
    return capture.wait_for_trace(root, containing, timeout)


class WorkerProcess:
    """A real ``celery worker`` subprocess (prefork by default)."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> float:
        """SIGTERM (warm shutdown), then SIGKILL after ``timeout``; returns seconds taken.

        Whatever the process left behind in its process group (a beat or pool child
        orphaned by a SIGKILL) is killed too, so it cannot send into a later test's
        capture server."""
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
                self._note(f"did not stop within {timeout} s of SIGTERM: SIGKILLed")
        with contextlib.suppress(ProcessLookupError):  # none left
            os.killpg(self.process.pid, signal.SIGKILL)
        return time.monotonic() - started

    def _note(self, text: str) -> None:
        with open(self.log_path, "a") as log_file:
            log_file.write(f"\n[tests/conftest.py] {text}\n")


@contextmanager
def worker_process(
    capture_env: dict[str, str],
    *extra_args: str,
    queue: Optional[str] = None,
    env: Optional[dict[str, str]] = None,
    tmp_path: Path,
    module: str = "tests.support.tasks",
    ready_timeout: float = 30.0,
) -> Iterator[WorkerProcess]:
    queue = queue or f"q-{uuid.uuid4().hex[:8]}"
    with celery_process(
        [
            "worker", "-Q", queue, "-l", "INFO", "-n", f"{queue}@%h",
            "--without-mingle", "--without-gossip", "--without-heartbeat",
            *extra_args,
        ],
        capture_env=capture_env,
        queue=queue,
        env=env,
        log_path=tmp_path / f"worker-{queue}.log",
        module=module,
        ready_marker="ready.",
        ready_timeout=ready_timeout,
    ) as worker:
        yield worker


@contextmanager
def beat_process(
    capture_env: dict[str, str],
    *extra_args: str,
    queue: str,
    env: Optional[dict[str, str]] = None,
    tmp_path: Path,
    module: str = "tests.support.beat_app",
    ready_timeout: float = 30.0,
) -> Iterator[WorkerProcess]:
    """A real ``celery beat`` subprocess with its schedule file in ``tmp_path``,
    sending to ``queue`` and re-reading its schedule at least once a second."""
    with celery_process(
        [
            "beat", "-l", "INFO", "-s", str(tmp_path / f"schedule-{queue}"),
            "--max-interval", "1", *extra_args,
        ],
        capture_env=capture_env,
        queue=queue,
        env=env,
        log_path=tmp_path / f"beat-{queue}.log",
        module=module,
        ready_marker="beat: Starting...",
        ready_timeout=ready_timeout,
    ) as beat:
        yield beat


@contextmanager
def celery_process(
    command: list[str],
    *,
    capture_env: dict[str, str],
    queue: str,
    env: Optional[dict[str, str]],
    log_path: Path,
    module: str,
    ready_marker: str,
    ready_timeout: float,
) -> Iterator[WorkerProcess]:
    """``celery -A module <command>`` as a subprocess, ready once its log shows
    ``ready_marker``; stopped (SIGTERM, then SIGKILL) on exit."""
    full_env = {
        **os.environ,
        **capture_env,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "CELERY_LANGFUSE_TEST_QUEUE": queue,
        "CELERY_LANGFUSE_TEST_BROKER": REDIS_URL,
        **(env or {}),
    }
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", module, *command],
            cwd=ROOT,
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends all of it
        )
    started = WorkerProcess(process, log_path)
    try:
        deadline = time.monotonic() + ready_timeout
        while ready_marker not in started.log():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"celery {command[0]} did not start:\n{started.log()}")
            time.sleep(0.1)
        started.queue = queue  # type: ignore[attr-defined]
        yield started
    finally:
        started.stop()


def sigkill_the_child_running(doomed: Any, pid_key: str, worker: WorkerProcess) -> None:
    """SIGKILL the pool child running ``doomed`` (a ``report_pid_and_sleep`` task that
    wrote its pid under ``pid_key``), and check the worker reports it lost."""
    redis = Redis.from_url(REDIS_URL)
    deadline = time.monotonic() + 20
    while (pid := redis.get(pid_key)) is None:
        assert time.monotonic() < deadline, worker.log()
        time.sleep(0.05)
    os.kill(int(pid), signal.SIGKILL)
    with pytest.raises(Exception, match="Worker exited prematurely"):
        doomed.get(timeout=20)
