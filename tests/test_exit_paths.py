"""Observations made by user code inside tasks survive every way a worker process ends.

Each test runs real ``celery worker`` subprocesses (``celery beat``, ``uvicorn``,
``gunicorn`` for their paths) whose tasks observe with the Langfuse SDK
(tests/support/user_tasks.py), with ``LANGFUSE_FLUSH_INTERVAL=30``: nothing leaves
a process on the export timer during the test, so what arrives was sent by the exit
path under test. Each counts: N observations opened by user code, N arrive, each a
child of its task run, in the run's trace. Nothing is waited for after a worker stops:
a process that exited has sent everything it is going to. The last section calls the
flush that every exit path makes directly, for what a worker test cannot set up.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any

import pytest

from celery_langfuse.testing import PUBLIC_KEY, SECRET_KEY, CaptureServer
from tests.conftest import (
    REDIS_URL,
    WorkerProcess,
    beat_process,
    sigkill_the_child_running,
    worker_process,
)

pytestmark = pytest.mark.timeout(150)

USER_TASKS = "tests.support.user_tasks"
#: Nothing is exported on the timer while a test runs: only exit paths send.
HOLD = {"LANGFUSE_FLUSH_INTERVAL": "30", "CELERY_LANGFUSE_TEST_FLUSH_TIMEOUT": "5"}


def user_observations(
    capture: CaptureServer, results: Sequence[Any], task: str, name: str
) -> tuple[int, list[str]]:
    """How many of the runs in ``results`` have exactly one child observation named
    ``name.format(n=<index>)`` in their own trace; and what is wrong with the others."""
    observations = capture.observations
    runs = {o.metadata.get("task_id"): o for o in observations if o.name == f"{USER_TASKS}.{task}"}
    problems = []
    for n, result in enumerate(results):
        run = runs.get(result.id)
        if run is None:
            problems.append(f"run {n} ({result.id}) did not arrive")
            continue
        expected = name.format(n=n)
        children = [o for o in observations if o.parent_id == run.id and o.name == expected]
        if len(children) != 1:
            problems.append(f"run {n}: {len(children)} child(ren) named {expected!r}")
        elif children[0].trace_id != run.trace_id:
            problems.append(f"run {n}: {expected!r} is in another trace")
    names = {name.format(n=n) for n in range(len(results))}
    made = [o for o in observations if o.name in names]
    if len(made) != len(results):  # none elsewhere, none twice
        problems.append(f"{len(made)} observations named {sorted(names)[:3]}...")
    return len(results) - len(problems), problems


def assert_all_arrived(
    capture: CaptureServer,
    results: Sequence[Any],
    task: str,
    name: str,
    worker: WorkerProcess,
) -> None:
    arrived, problems = user_observations(capture, results, task, name)
    assert problems == [], f"{arrived}/{len(results)} arrived\n" + "\n".join(problems) + (
        "\n--- worker log ---\n" + worker.log()[-4000:]
    )


def generation_and_its_run(capture: CaptureServer, n: int, result: Any) -> tuple[Any, Any]:
    """The one generation ``llm <n>`` and its parent, checked to be the run of ``result``
    in the same trace."""
    [generation] = [o for o in capture.observations if o.name == f"llm {n}"]
    [run] = [o for o in capture.observations if o.id == generation.parent_id]
    assert (run.metadata.get("task_id"), run.trace_id) == (result.id, generation.trace_id)
    return generation, run


# -- a fake OpenAI-compatible server (the real openai package calls it) -------------


class _FakeOpenAI(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = request["messages"][-1]["content"]
        body = json.dumps(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": request["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"answer to {question}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def fake_openai() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


# -- prefork ---------------------------------------------------------------------

WAYS_OF_OBSERVING = {
    # task: name of the observation it makes, for run n
    "llm_call": "llm {n}",
    "observed": "observed step",
    "openai_call": "openai {n}",
}


@pytest.mark.parametrize("task", list(WAYS_OF_OBSERVING))
def test_prefork_warm_shutdown_right_after_the_last_task_keeps_every_user_observation(
    task: str, tasks_app: Any, capture: CaptureServer, tmp_path: Path, fake_openai: str
) -> None:
    from tests.support import user_tasks

    env = {**HOLD, "CELERY_LANGFUSE_TEST_OPENAI_URL": fake_openai}
    with worker_process(
        capture.env, "-P", "prefork", "-c", "2", env=env, tmp_path=tmp_path, module=USER_TASKS
    ) as worker:
        results = [
            getattr(user_tasks, task).apply_async((n,), queue=worker.queue) for n in range(10)
        ]
        for result in results:
            result.get(timeout=30)
        worker.stop()
    assert_all_arrived(capture, results, task, WAYS_OF_OBSERVING[task], worker)


def test_children_recycled_after_every_task_keep_every_user_observation(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    from tests.support import user_tasks

    with worker_process(
        capture.env, "-P", "prefork", "-c", "2", "--max-tasks-per-child", "1",
        env=HOLD, tmp_path=tmp_path, module=USER_TASKS,
    ) as worker:
        results = [user_tasks.llm_call.apply_async((n,), queue=worker.queue) for n in range(20)]
        assert [r.get(timeout=60) for r in results] == list(range(20))
        # Every child but the two last ones has exited by now, by os._exit.
        worker.stop()
    assert_all_arrived(capture, results, "llm_call", "llm {n}", worker)


def test_children_recycled_for_memory_keep_every_user_observation(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    from tests.support import user_tasks

    # Each task keeps 120 MB: past the 100 MB limit, so its child is replaced after it.
    with worker_process(
        capture.env, "-P", "prefork", "-c", "1", "--max-memory-per-child", str(100 * 1024),
        env=HOLD, tmp_path=tmp_path, module=USER_TASKS,
    ) as worker:
        results = [
            user_tasks.llm_call.apply_async((n, 120), queue=worker.queue) for n in range(4)
        ]
        pids = [r.get(timeout=60) for r in results]
        worker.stop()
    assert len(set(pids)) == 4, pids  # each task ran in a fresh child
    assert_all_arrived(capture, results, "llm_call", "llm {n}", worker)


def test_soft_time_limit_keeps_every_user_observation(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    from tests.support import user_tasks

    with worker_process(
        capture.env, "-P", "prefork", "-c", "2", env=HOLD, tmp_path=tmp_path, module=USER_TASKS
    ) as worker:
        results = [
            user_tasks.llm_then_sleep.apply_async((n, 10), soft_time_limit=0.5, queue=worker.queue)
            for n in range(4)
        ]
        assert [r.get(timeout=30) for r in results] == ["soft limit"] * 4
        worker.stop()
    assert_all_arrived(capture, results, "llm_then_sleep", "llm {n}", worker)


def test_hard_time_limit_keeps_the_killed_runs_observations_and_earlier_ones(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    """Billiard ends the child with SIGTERM, then SIGKILL 0.1 s later: the child ends
    its open run as an ERROR and flushes in between."""
    from tests.support import user_tasks

    with worker_process(
        capture.env, "-P", "prefork", "-c", "1", env=HOLD, tmp_path=tmp_path, module=USER_TASKS
    ) as worker:
        done = [user_tasks.llm_call.apply_async((n,), queue=worker.queue) for n in range(3)]
        assert [r.get(timeout=30) for r in done] == [0, 1, 2]
        killed = [
            user_tasks.llm_then_hang.apply_async((n, 30), time_limit=1, queue=worker.queue)
            for n in range(3, 5)
        ]
        for result in killed:
            with pytest.raises(Exception, match="TimeLimitExceeded"):
                result.get(timeout=30)
        worker.stop()
    assert_all_arrived(capture, done, "llm_call", "llm {n}", worker)
    for n, result in enumerate(killed, start=3):
        _, run = generation_and_its_run(capture, n, result)
        assert run.level == "ERROR"
        assert "terminated while running" in (run.status_message or "")


#: How a cold shutdown is asked for: the worker's extra environment, and its signal.
COLD_SHUTDOWNS = {
    "SIGQUIT": ({}, signal.SIGQUIT),
    # Celery's (billiard's) REMAP_SIGTERM=SIGQUIT, for platforms that stop with SIGTERM
    # only (Heroku, some container schedulers): SIGTERM is then a cold shutdown.
    "SIGTERM-with-REMAP_SIGTERM": ({"REMAP_SIGTERM": "SIGQUIT"}, signal.SIGTERM),
}


@pytest.mark.parametrize("how", list(COLD_SHUTDOWNS))
def test_cold_shutdown_keeps_the_observations_of_finished_tasks(
    how: str, tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    """The pool children are terminated at once. Finished tasks' observations are
    flushed by each child as it is terminated; the running task's run is ended as an
    ERROR with the observations it had finished (its still-open ones are lost)."""
    from tests.support import user_tasks

    extra_env, cold_signal = COLD_SHUTDOWNS[how]
    with worker_process(
        capture.env, "-P", "prefork", "-c", "2",
        env={**HOLD, **extra_env}, tmp_path=tmp_path, module=USER_TASKS,
    ) as worker:
        done = [user_tasks.llm_call.apply_async((n,), queue=worker.queue) for n in range(6)]
        assert [r.get(timeout=30) for r in done] == list(range(6))
        running = user_tasks.llm_then_hang.apply_async((6, 30), queue=worker.queue)
        wait_until_received([running], worker)
        time.sleep(0.3)  # inside the task's sleep, after its generation ended
        started = time.monotonic()
        worker.process.send_signal(cold_signal)
        worker.process.wait(30)
    assert time.monotonic() - started < 20, "a warm shutdown: it waited for the task"
    assert_all_arrived(capture, done, "llm_call", "llm {n}", worker)
    _, run = generation_and_its_run(capture, 6, running)
    assert run.level == "ERROR"
    assert "terminated while running" in (run.status_message or "")


def test_a_second_sigterm_is_still_a_warm_shutdown_and_keeps_everything(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    """Celery repeats the warm shutdown on each SIGTERM (only SIGQUIT, a second Ctrl+C
    or REMAP_SIGTERM make it cold): the running task finishes, and nothing is lost."""
    from tests.support import user_tasks

    with worker_process(
        capture.env, "-P", "prefork", "-c", "2", env=HOLD, tmp_path=tmp_path, module=USER_TASKS
    ) as worker:
        done = [user_tasks.llm_call.apply_async((n,), queue=worker.queue) for n in range(6)]
        assert [r.get(timeout=30) for r in done] == list(range(6))
        running = user_tasks.llm_then_hang.apply_async((6, 3), queue=worker.queue)
        wait_until_received([running], worker)
        time.sleep(0.3)
        worker.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        worker.process.send_signal(signal.SIGTERM)
        worker.process.wait(30)
    assert worker.log().count("worker: Warm shutdown (MainProcess)") == 2, worker.log()
    assert running.get(timeout=5) == "slept"
    assert_all_arrived(capture, done, "llm_call", "llm {n}", worker)
    _, run = generation_and_its_run(capture, 6, running)
    assert (run.level, run.output) == ("DEFAULT", "slept")


def wait_until_received(results: Sequence[Any], worker: WorkerProcess) -> None:
    """Until the worker's log shows that it received each of ``results``."""
    deadline = time.monotonic() + 20
    while not all(f"[{r.id}] received" in worker.log() for r in results):
        assert time.monotonic() < deadline, worker.log()
        time.sleep(0.05)


def test_soft_shutdown_lets_running_tasks_finish_and_keeps_their_observations(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    """Celery >= 5.5: a cold shutdown request first waits ``--soft-shutdown-timeout``
    seconds for running tasks (soft shutdown), then goes on as a cold shutdown. The
    tasks have no time limit: only the soft shutdown decides that they finish."""
    from tests.support import user_tasks

    with worker_process(
        capture.env, "-P", "prefork", "-c", "2",
        # Celery waits all of it (with tasks running): 6 s, for tasks 1.2 s from the end.
        env={**HOLD, "CELERY_LANGFUSE_TEST_SOFT_SHUTDOWN": "6"},
        tmp_path=tmp_path, module=USER_TASKS,
    ) as worker:
        results = [
            user_tasks.llm_then_hang.apply_async((n, 1.5), queue=worker.queue) for n in range(2)
        ]
        wait_until_received(results, worker)
        time.sleep(0.3)
        worker.process.send_signal(signal.SIGQUIT)
        worker.process.wait(30)
    assert [r.get(timeout=5) for r in results] == ["slept"] * 2
    assert_all_arrived(capture, results, "llm_then_hang", "llm {n}", worker)


def test_a_child_killed_by_sigkill_keeps_what_it_had_already_sent(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    """SIGKILL gives a process no chance to flush: what the child had buffered is lost,
    and so is its open run. What it had sent stays: finished tasks' observations and
    the generation the killed task had ended, in the trace the task was published in,
    where the main process records the run as lost (an ERROR)."""
    from langfuse import get_client

    from tests.support import user_tasks

    env = {"LANGFUSE_FLUSH_INTERVAL": "0.1"}  # sent within 0.1 s of ending
    pid_key = f"celery-langfuse-test-pid-{uuid.uuid4().hex}"
    with worker_process(
        capture.env, "-P", "prefork", "-c", "1", env=env, tmp_path=tmp_path, module=USER_TASKS
    ) as worker:
        done = [user_tasks.llm_call.apply_async((n,), queue=worker.queue) for n in range(3)]
        assert [r.get(timeout=30) for r in done] == [0, 1, 2]
        with get_client().start_as_current_observation(name="request") as producer:
            doomed = user_tasks.llm_then_hang.apply_async((3, 60, pid_key), queue=worker.queue)
        # Sent before the kill: the runs and their generations, the doomed one's generation.
        capture.wait_for(lambda s: user_observations(s, done, "llm_call", "llm {n}")[0] == 3, 20)
        capture.wait_for_observations(1, timeout=20, name="llm 3")
        sigkill_the_child_running(doomed, pid_key, worker)
        worker.stop()
    assert_all_arrived(capture, done, "llm_call", "llm {n}", worker)
    [generation] = [o for o in capture.observations if o.name == "llm 3"]
    [lost] = [
        o for o in capture.observations
        if o.name == f"{USER_TASKS}.llm_then_hang" and o.metadata.get("task_id") == doomed.id
    ]
    assert generation.trace_id == lost.trace_id == producer.trace_id
    assert lost.level == "ERROR"
    assert "WorkerLostError" in (lost.status_message or ""), lost.status_message


def explicit_keys_env(capture: CaptureServer, **user_export: str) -> dict[str, str]:
    """The environment of a worker whose Langfuse client is made in code, with explicit
    keys (tests/support/explicit_keys.py), and ``user_export``: its
    ``CELERY_LANGFUSE_TEST_EXPLICIT_*`` settings of the user's own export."""
    return {
        **HOLD,
        # No keys in the environment: the client is made in code, before install().
        "LANGFUSE_PUBLIC_KEY": "",
        "LANGFUSE_SECRET_KEY": "",
        "LANGFUSE_BASE_URL": "",
        "CELERY_LANGFUSE_TEST_EXPLICIT_PUBLIC_KEY": PUBLIC_KEY,
        "CELERY_LANGFUSE_TEST_EXPLICIT_SECRET_KEY": SECRET_KEY,
        "CELERY_LANGFUSE_TEST_EXPLICIT_BASE_URL": capture.base_url,
        "CELERY_LANGFUSE_TEST_EXPLICIT_FLUSH_INTERVAL": "30",
        **user_export,
    }


def run_8_tasks_in_recycled_children(
    env: dict[str, str], capture: CaptureServer, tmp_path: Path
) -> tuple[list[Any], WorkerProcess]:
    """8 ``llm_call`` runs in a prefork worker of tests/support/explicit_keys.py whose
    children are replaced after 2 tasks each, then a warm shutdown."""
    from tests.support import user_tasks

    with worker_process(
        capture.env, "-P", "prefork", "-c", "2", "--max-tasks-per-child", "2",
        env=env, tmp_path=tmp_path, module="tests.support.explicit_keys",
    ) as worker:
        results = [user_tasks.llm_call.apply_async((n,), queue=worker.queue) for n in range(8)]
        assert [r.get(timeout=30) for r in results] == list(range(8))
        worker.stop()
    return results, worker


@pytest.mark.parametrize("exporter", ["sdk", "custom"])
def test_a_client_made_in_code_with_explicit_keys_is_flushed_by_every_child(
    exporter: str, tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    """The user's client, with its keys in code and no LANGFUSE_* variables, with the
    SDK's exporter or one of the user's own: flushed, never replaced (the user's
    exporter marks what it sends)."""
    mark = f"user exporter {uuid.uuid4().hex[:8]}"
    user_export = {"CELERY_LANGFUSE_TEST_EXPLICIT_EXPORTER": mark} if exporter == "custom" else {}
    results, worker = run_8_tasks_in_recycled_children(
        explicit_keys_env(capture, **user_export), capture, tmp_path
    )
    assert_all_arrived(capture, results, "llm_call", "llm {n}", worker)
    generations = [o for o in capture.observations if o.name.startswith("llm ")]
    sent_by_the_users_exporter = [o for o in generations if mark in o.resource.values()]
    assert len(sent_by_the_users_exporter) == (8 if exporter == "custom" else 0)


def test_a_span_processor_the_user_added_to_the_clients_tracer_provider_is_flushed_too(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    """The user added a batch span processor of their own to the tracer provider of their
    client; its exporter writes spans to a file, and its timer never fires during the
    test: every child's exit flush writes what that child observed."""
    spans_file = tmp_path / "user-processor.jsonl"
    env = explicit_keys_env(capture, CELERY_LANGFUSE_TEST_EXPLICIT_SPAN_FILE=str(spans_file))
    results, worker = run_8_tasks_in_recycled_children(env, capture, tmp_path)
    assert_all_arrived(capture, results, "llm_call", "llm {n}", worker)
    written = [json.loads(line) for line in spans_file.read_text().splitlines()]
    runs = {
        o.metadata.get("task_id"): o
        for o in capture.observations
        if o.name == f"{USER_TASKS}.llm_call"
    }
    for n, result in enumerate(results):
        lines = [line for line in written if line["name"] == f"llm {n}"]
        assert [(line["parent_id"], line["trace_id"]) for line in lines] == [
            (runs[result.id].id, runs[result.id].trace_id)
        ], written
    # 8 tasks, 2 per child: at least 4 children, each wrote what it observed when it left.
    assert len({line["pid"] for line in written if line["name"].startswith("llm ")}) >= 4


@pytest.fixture
def slow_langfuse() -> Iterator[CaptureServer]:
    """A Langfuse that answers nothing in time (after 30 s). Not the session's capture
    server: what it was sent is stored when it answers, 30 s on, in a later test."""
    with CaptureServer() as server:
        server.set_response(200, delay=30)
        yield server


def test_langfuse_slow_at_exit_bounds_shutdown_and_says_what_it_gave_up(
    tasks_app: Any, slow_langfuse: CaptureServer, tmp_path: Path
) -> None:
    from tests.support import user_tasks

    env = {**HOLD, "CELERY_LANGFUSE_TEST_FLUSH_TIMEOUT": "2"}
    with worker_process(
        slow_langfuse.env, "-P", "prefork", "-c", "1", env=env, tmp_path=tmp_path, module=USER_TASKS
    ) as worker:
        results = [user_tasks.llm_call.apply_async((n,), queue=worker.queue) for n in range(5)]
        assert [r.get(timeout=30) for r in results] == list(range(5))
        shutdown_seconds = worker.stop()
    # the child's flush deadline, then the main process's, plus Celery's own shutdown
    assert shutdown_seconds < 2 * 2 + 4, worker.log()
    log = worker.log()
    assert re.search(r"giving up on \d+ queued observation\(s\)", log), log[-3000:]


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_langfuse_slow_at_exit_costs_one_flush_timeout_where_tasks_run_in_the_main_process(
    pool: str, tasks_app: Any, slow_langfuse: CaptureServer, tmp_path: Path
) -> None:
    """Solo and threads run tasks in the worker's own process, which passes three exit
    hooks (worker_process_shutdown, worker_shutdown, atexit): they share one
    ``flush_timeout`` and one warning, not one each."""
    from tests.support import user_tasks

    env = {**HOLD, "CELERY_LANGFUSE_TEST_FLUSH_TIMEOUT": "3"}
    with worker_process(
        slow_langfuse.env, "-P", pool, "-c", "1", env=env, tmp_path=tmp_path, module=USER_TASKS
    ) as worker:
        results = [user_tasks.llm_call.apply_async((n,), queue=worker.queue) for n in range(5)]
        assert [r.get(timeout=30) for r in results] == list(range(5))
        shutdown_seconds = worker.stop()
    log = worker.log()
    assert shutdown_seconds < 3 + 2.5, log[-3000:]
    assert len(re.findall(r"giving up on \d+ queued observation\(s\)", log)) == 1, log[-3000:]


# -- the other pools -------------------------------------------------------------


@pytest.mark.parametrize("pool", ["solo", "threads", "gevent", "eventlet"])
def test_warm_shutdown_right_after_the_last_task_keeps_every_user_observation(
    pool: str, tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    from tests.support import user_tasks

    concurrency = "1" if pool == "solo" else "4"
    with worker_process(
        capture.env, "-P", pool, "-c", concurrency, env=HOLD, tmp_path=tmp_path, module=USER_TASKS
    ) as worker:
        results = [user_tasks.llm_call.apply_async((n,), queue=worker.queue) for n in range(10)]
        assert [r.get(timeout=30) for r in results] == list(range(10))
        worker.stop()
    assert_all_arrived(capture, results, "llm_call", "llm {n}", worker)


# -- beat ------------------------------------------------------------------------


@pytest.mark.parametrize("embedded", [False, True], ids=["beat", "worker-B"])
def test_beat_exit_keeps_the_cron_roots_and_what_user_code_in_beat_observed(
    embedded: bool, tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    """User code in beat (here a ``before_task_publish`` handler that opens an
    observation, tests/support/beat_app.py) observes inside each cron run."""
    queue = f"q-{uuid.uuid4().hex[:8]}"
    env = {**HOLD, "CELERY_LANGFUSE_TEST_BEAT_USER_OBSERVATION": "1"}
    if embedded:
        context = worker_process(
            capture.env, "-B", "-s", str(tmp_path / "schedule"),
            queue=queue, env=env, tmp_path=tmp_path, module="tests.support.beat_app",
        )
    else:
        context = beat_process(capture.env, queue=queue, env=env, tmp_path=tmp_path)
    with context as beat:
        deadline = time.monotonic() + 30
        while beat.log().count("Sending due task") < 3:
            assert time.monotonic() < deadline, beat.log()
            time.sleep(0.1)
        beat.stop()
    sent = beat.log().count("Sending due task")
    roots = [o for o in capture.observations if o.name == f"cron tick-{queue}"]
    user = [o for o in capture.observations if o.name == "user code in beat"]
    # Beat may send one more after its last log line was read; the log is the count.
    assert len(roots) == sent, beat.log()[-3000:]
    # A run whose send beat's SIGTERM interrupted is marked so (its message may not
    # have left, and user code in it may not have run); every other run has the user's
    # observation under its root.
    completed = [o for o in roots if not (o.status_message or "").startswith("interrupted")]
    assert len(completed) >= sent - 1, [o.status_message for o in roots]
    assert {o.parent_id for o in user} >= {o.id for o in completed}
    assert {o.parent_id for o in user} <= {o.id for o in roots}
    assert len(user) <= len(roots)


# -- the web side: API processes with several workers, stopped gracefully ----------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "server",
    [
        ["-m", "uvicorn", "tests.support.web_exit_apps:fastapi_app", "--workers", "2",
         "--host", "127.0.0.1", "--port", "{port}"],
        ["-m", "gunicorn", "--preload", "-w", "2", "-b", "127.0.0.1:{port}",
         "--graceful-timeout", "10", "tests.support.web_exit_apps:flask_app"],
    ],
    ids=["uvicorn-workers-2", "gunicorn-preload-w-2"],
)
def test_an_api_stopped_gracefully_right_after_its_requests_keeps_every_observation(
    server: list[str], tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    import subprocess
    import sys

    import httpx

    from tests.conftest import ROOT

    port = _free_port()
    log_path = tmp_path / "api.log"
    env = {
        **os.environ,
        **capture.env,
        **HOLD,
        "PYTHONPATH": str(ROOT),
        "CELERY_LANGFUSE_TEST_BROKER": REDIS_URL,
        "CELERY_LANGFUSE_TEST_QUEUE": f"q-web-{uuid.uuid4().hex[:8]}",
    }
    with open(log_path, "wb") as log:
        api = subprocess.Popen(
            [sys.executable, *(part.format(port=port) for part in server)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.HTTPError:
                assert api.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        # A fresh connection for each request, so that both server workers serve some:
        # the kernel hands each new connection to one of them (one keep-alive
        # connection would have stayed with one worker).
        answers: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + 60
        while len(answers) < 12 or len({a["pid"] for a in answers.values()}) < 2:
            assert time.monotonic() < deadline, f"one worker served all: {answers}"
            order = len(answers)
            reply = httpx.post(f"http://127.0.0.1:{port}/orders/{order}", timeout=10)
            assert reply.status_code == 200, reply.text
            answers[order] = reply.json()
    finally:
        api.send_signal(signal.SIGTERM)
        api.wait(30)
    log_text = log_path.read_text(errors="replace")
    pids = {answer["pid"] for answer in answers.values()}
    assert len(pids) >= 2, answers
    arrived, problems = _requests_with_their_observations(capture, answers)
    assert problems == [], (
        f"{arrived}/{len(answers)} requests arrived with their observations "
        f"(served by pids {sorted(pids)})\n" + "\n".join(problems) + "\n" + log_text[-3000:]
    )


def _requests_with_their_observations(
    capture: CaptureServer, answers: dict[int, dict[str, Any]]
) -> tuple[int, list[str]]:
    """How many requests arrived as one trace each: the request's observation, with
    exactly its own two children, the generation ``llm <order>`` made by the server
    worker that answered and the publish of the task id it answered with."""
    observations = capture.observations
    by_id = {o.id: o for o in observations}
    requests = [o for o in observations if o.name.startswith("POST /orders")]
    problems = []
    if len(requests) != len(answers):
        problems.append(f"{len(requests)} request observations for {len(answers)} requests")
    for order, answer in answers.items():
        generations = [o for o in observations if o.name == f"llm {order}"]
        if len(generations) != 1:
            problems.append(f"request {order}: {len(generations)} generations 'llm {order}'")
            continue
        [generation] = generations
        request = by_id.get(generation.parent_id or "")
        if request is None or request not in requests:
            problems.append(f"request {order}: its generation's parent did not arrive")
            continue
        children = [o for o in observations if o.parent_id == request.id]
        publishes = [o for o in children if o.name == "publish tests.support.tasks.add"]
        if len(children) != 2 or len(publishes) != 1:
            problems.append(f"request {order}: children {sorted(o.name for o in children)}")
        elif publishes[0].metadata.get("task_id") != answer["task_id"]:
            problems.append(f"request {order}: the publish of another task")
        elif {o.trace_id for o in (request, generation, publishes[0])} != {request.trace_id}:
            problems.append(f"request {order}: its observations are in several traces")
        elif generation.metadata.get("pid") != answer["pid"]:
            problems.append(f"request {order}: generation made by pid {generation.metadata}")
    if len({o.trace_id for o in requests}) != len(requests):
        problems.append("requests share a trace")
    return len(answers) - len(problems), problems


# -- the flush every exit path makes ----------------------------------------------


def test_the_flush_reaches_a_global_tracer_provider_the_user_built(
    capture: CaptureServer,
) -> None:
    """No Langfuse client flushes a tracer provider the user built and registered
    globally (for their other instrumentations): the flush does, spans of the user's
    own span processor included. In a fresh interpreter: OTel lets a process register
    its global tracer provider once, and this one's is the SDK's."""
    import subprocess
    import sys

    script = """
from celery import Celery
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from celery_langfuse import client, install

exported = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(exported, schedule_delay_millis=600_000))
trace.set_tracer_provider(provider)
install(Celery("user-provider", broker="memory://"))
for n in range(3):
    with trace.get_tracer("the user's instrumentation").start_as_current_span(f"user {n}"):
        pass
assert exported.get_finished_spans() == (), "sent on the timer"
assert client.flush(5)
print(sorted(span.name for span in exported.get_finished_spans()))
"""
    from tests.conftest import ROOT

    finished = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, **capture.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.split("\n")[-2] == "['user 0', 'user 1', 'user 2']", finished.stdout
