"""Trust for task messages: which producers a worker takes user, session and parent from.

A real ``celery worker`` subprocess configured with ``CELERY_LANGFUSE_PRODUCER_SECRET``
consumes messages from three real producers on the same Redis broker: this test
process (installed without the secret), and producer subprocesses installed with the
same secret or a different one. What the capture server received shows what each
got to write.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from langfuse import propagate_attributes

from celery_langfuse import ConfigurationError, TracingConfig, headers
from celery_langfuse import client as langfuse_client
from celery_langfuse.testing import CaptureServer, Observation
from tests.conftest import REDIS_URL, ROOT, flush_in_process, worker_process

SECRET = "producer-secret-trust-0123456789"
ECHO = "tests.support.tasks.echo"

#: A producer service: publishes ``echo`` inside its own observation, as user
#: "alice" in session "s-alice", and prints the ids the worker's run should join.
PRODUCER = """
import json
import pytest
from langfuse import propagate_attributes
from celery_langfuse import client
from tests.support import tasks

with propagate_attributes(user_id="alice", session_id="s-alice"):
    with client.get_langfuse().start_as_current_observation(name="producer") as obs:
        result = tasks.echo.delay("from a producer service")
client.flush(10)
print(json.dumps({"trace_id": obs.trace_id, "id": obs.id, "task_id": result.id}))
"""


def run_producer(capture: CaptureServer, queue: str, secret: str | None) -> dict[str, str]:
    env = {
        **os.environ,
        **capture.env,
        "PYTHONPATH": str(ROOT),
        "CELERY_LANGFUSE_TEST_QUEUE": queue,
        "CELERY_LANGFUSE_TEST_BROKER": REDIS_URL,
    }
    env.pop("CELERY_LANGFUSE_PRODUCER_SECRET", None)
    if secret is not None:
        env["CELERY_LANGFUSE_PRODUCER_SECRET"] = secret
    done = subprocess.run(
        [sys.executable, "-c", PRODUCER], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    ids: dict[str, str] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return ids


def run_of(capture: CaptureServer, task_id: str) -> Observation:
    def runs(server: CaptureServer) -> list[Observation]:
        return [
            o
            for o in server.observations
            if o.name == ECHO and o.metadata.get("task_id") == task_id
        ]

    capture.wait_for(lambda s: len(runs(s)) == 1, timeout=30)
    (run,) = runs(capture)
    return run


def test_worker_with_a_producer_secret_trusts_only_signing_producers(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    worker_env = {"CELERY_LANGFUSE_PRODUCER_SECRET": SECRET}
    with worker_process(capture.env, "-P", "solo", env=worker_env, tmp_path=tmp_path) as worker:
        queue = worker.queue  # type: ignore[attr-defined]
        trusted = run_producer(capture, queue, SECRET)
        other_secret = run_producer(capture, queue, "some-other-secret-0123456789")
        # This test process is installed without a secret: an untrusted producer.
        with propagate_attributes(user_id="mallory", session_id="victim-session"):
            with langfuse_client.get_langfuse().start_as_current_observation(
                name="untrusted producer"
            ) as untrusted:
                unsigned = tasks_app.echo.apply_async(("spoof",), queue=queue)
        assert unsigned.get(timeout=30) == {"args": ["spoof"], "kwargs": {}}
        flush_in_process()

        trusted_run = run_of(capture, trusted["task_id"])
        other_run = run_of(capture, other_secret["task_id"])
        unsigned_run = run_of(capture, unsigned.id)

    # The signing producer's run continues its trace, with its user and session.
    trace = capture.trace(trusted["trace_id"])
    assert trusted_run.trace_id == trusted["trace_id"]
    assert trace.find(f"publish {ECHO}").parent_id == trusted["id"]
    assert trusted_run.parent_id == trace.find(f"publish {ECHO}").id
    assert (trusted_run.user_id, trusted_run.session_id) == ("alice", "s-alice")
    assert trace.orphans() == []

    # The others are still recorded, each in a trace of its own, without their identity.
    for run, producer_trace in (
        (other_run, other_secret["trace_id"]),
        (unsigned_run, untrusted.trace_id),
    ):
        assert run.trace_id != producer_trace
        assert run.parent_id is None
        assert (run.user_id, run.session_id) == (None, None)
        assert capture.trace(run.trace_id).name == ECHO
    assert unsigned_run.output == {"args": ["spoof"], "kwargs": {}}


def test_worker_without_a_producer_secret_trusts_every_producer(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    with worker_process(capture.env, "-P", "solo", tmp_path=tmp_path) as worker:
        queue = worker.queue  # type: ignore[attr-defined]
        unsigned = run_producer(capture, queue, None)
        signed = run_producer(capture, queue, SECRET)
        runs = [run_of(capture, ids["task_id"]) for ids in (unsigned, signed)]

    for run, ids in zip(runs, (unsigned, signed)):
        assert run.trace_id == ids["trace_id"]
        assert (run.user_id, run.session_id) == ("alice", "s-alice")


def test_signature_covers_parent_and_attributes() -> None:
    key = SECRET.encode()
    parent = headers.TraceParent("1" * 32, "2" * 16)
    message: dict[str, Any] = {}
    headers.inject(
        message,
        parent=parent,
        attributes=headers.TraceAttributes(user_id="alice"),
        signing_key=key,
    )
    assert headers.signed_by(message, key)
    assert not headers.signed_by(message, b"another key of enough length")
    for name, value in (
        (headers.USER_ID, "admin"),
        (headers.SESSION_ID, "victim"),
        (headers.TRACE_ID, "3" * 32),
        (headers.PARENT_ID, "4" * 16),
        (headers.SIGNATURE, "0" * 64),
        (headers.SIGNATURE, "x" * 100_000),
    ):
        tampered = {**message, name: value}
        assert not headers.signed_by(tampered, key), name
    # A retry published without a key no longer carries the old signature.
    headers.inject(message, parent=parent, attributes=headers.TraceAttributes())
    assert headers.SIGNATURE not in message


def test_bad_producer_secret_is_refused_at_install_without_showing_it() -> None:
    for value, shown in (("", "''"), ("hunter2", "<secret of 7 characters>")):
        with pytest.raises(ConfigurationError) as raised:
            TracingConfig.resolve({"producer_secret": value})
        assert f"producer_secret={shown}: must be a string of 16 to 1024" in str(raised.value)
        assert "hunter2" not in str(raised.value)
    # An empty variable is a secret that did not arrive, not "unset": refused too.
    with pytest.raises(ConfigurationError, match="CELERY_LANGFUSE_PRODUCER_SECRET=''"):
        TracingConfig.resolve({}, {"CELERY_LANGFUSE_PRODUCER_SECRET": ""})
