"""Captured input and output: secrets never reach Langfuse, capture can be turned off.

Every check searches the raw span attributes the capture server received (what the
SDK sent over HTTP), not only the decoded input and output.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import pytest
from langfuse import get_client

from celery_langfuse.payload import REDACTED
from celery_langfuse.testing import CaptureServer, Observation
from tests.conftest import flush_in_process, in_thread_worker


def reinstalled(**options: Any) -> AbstractContextManager[Any]:
    """tests/support/tasks.py's app installed with ``options`` inside the block.

    Imported here, not at collection: installing the app needs the capture server's
    keys in the environment, which the ``capture`` fixture sets.
    """
    from tests.support.config_tasks import reinstalled

    return reinstalled(**options)


pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def worker(tasks_app: Any, extra: Any) -> Iterator[Any]:
    # ``extra`` first: a worker knows only the tasks registered when it starts.
    with in_thread_worker(tasks_app.app):
        yield tasks_app


@pytest.fixture
def extra(tasks_app: Any) -> Any:
    """tests/support/config_tasks.py: more tasks on the same app."""
    from tests.support import config_tasks

    return config_tasks


def raw(capture: CaptureServer) -> str:
    """Everything received, as sent: every attribute of every span and its resource."""
    return json.dumps(
        [
            {"attributes": o.attributes, "resource": o.resource, "name": o.name}
            for o in capture.observations
        ],
        default=str,
    )


def run_of(capture: CaptureServer, task_id: str) -> Observation:
    capture.wait_for(lambda s: any(o.metadata.get("task_id") == task_id for o in s.observations))
    flush_in_process()
    return next(
        o
        for o in capture.observations
        if o.metadata.get("task_id") == task_id and not o.name.startswith("publish ")
    )


def test_a_password_kwarg_is_redacted(worker: Any, capture: CaptureServer) -> None:
    result = worker.echo.delay(user="bob", password="hunter2-kwarg")
    assert result.get(timeout=10)["kwargs"]["password"] == "hunter2-kwarg"  # the task saw it

    run = run_of(capture, result.id)
    assert run.input["kwargs"] == {"user": "bob", "password": REDACTED}
    assert run.output["kwargs"]["password"] == REDACTED
    assert "hunter2" not in raw(capture)


def test_secrets_nested_at_any_depth_are_redacted(worker: Any, capture: CaptureServer) -> None:
    config = {
        "db": {"host": "db.internal", "credentials": {"user": "app", "password": "hunter2-deep"}},
        "http": [{"headers": {"Authorization": "Bearer hunter2-bearer", "Accept": "json"}}],
        "stripe": {"API-Key": "hunter2-api", "card_number": "4111111111111111", "cvv": "123"},
        "max_tokens": 256,
    }
    result = worker.echo.delay(config)
    result.get(timeout=10)

    run = run_of(capture, result.id)
    sent = run.input["args"][0]
    assert sent["db"] == {"host": "db.internal", "credentials": REDACTED}
    assert sent["http"][0]["headers"] == {"Authorization": REDACTED, "Accept": "json"}
    assert sent["stripe"] == {"API-Key": REDACTED, "card_number": REDACTED, "cvv": REDACTED}
    assert sent["max_tokens"] == 256  # a word that merely contains "token" stays
    text = raw(capture)
    for secret in ("hunter2", "4111111111111111"):
        assert secret not in text


def test_secrets_in_plain_string_arguments_are_scrubbed(
    worker: Any, capture: CaptureServer
) -> None:
    """A string argument holding a header dump or a query string: the values of its
    sensitive ``name: value`` and ``name=value`` pairs never leave, the rest does."""
    dump = "GET /v1 HTTP/1.1\r\nHost: api.internal\r\nAuthorization: Bearer hunter2-hdr\r\n"
    result = worker.echo.delay(dump, ["retry?user=bob&api_key=hunter2-query"], note="ok: yes")
    result.get(timeout=10)

    run = run_of(capture, result.id)
    sent_dump, (sent_query,) = run.input["args"]
    assert sent_dump == f"GET /v1 HTTP/1.1\r\nHost: api.internal\r\nAuthorization: {REDACTED}\r\n"
    assert sent_query == f"retry?user=bob&api_key={REDACTED}"
    assert run.input["kwargs"] == {"note": "ok: yes"}
    assert "hunter2" not in raw(capture)


def test_a_secret_in_the_result_is_redacted(
    worker: Any, extra: Any, capture: CaptureServer
) -> None:
    result = extra.issue_token.delay("bob")
    assert "hunter2" in result.get(timeout=10)["access_token"]

    run = run_of(capture, result.id)
    assert run.output == {"user": "bob", "access_token": REDACTED}
    assert "hunter2" not in raw(capture)


def test_secrets_in_an_error_message_and_traceback_are_scrubbed(
    worker: Any, capture: CaptureServer
) -> None:
    result = worker.fail.delay("login failed: password='hunter2-exc' user=bob")
    with pytest.raises(ValueError):
        result.get(timeout=10)

    run = run_of(capture, result.id)
    assert run.status_message == f"ValueError: login failed: password={REDACTED} user=bob"
    assert "Traceback" in run.metadata["traceback"]
    # the message is also the task's input: that is redacted by its own rules
    assert "hunter2" not in json.dumps(run.metadata)


def test_objects_are_captured_without_their_secrets(tasks_app: Any, capture: CaptureServer) -> None:
    @dataclass
    class Login:
        user: str
        password: str

    class Session:
        def __repr__(self) -> str:
            return "Session(id=7, session_key='hunter2-repr')"

    with get_client().start_as_current_observation(name="request") as root:
        tasks_app.echo.apply(kwargs={"login": Login("bob", "hunter2-dc"), "session": Session()})
    flush_in_process()

    run = capture.trace(root.trace_id).find("tests.support.tasks.echo")
    assert run.input["kwargs"]["login"] == {"user": "bob", "password": REDACTED}
    assert run.input["kwargs"]["session"] == f"Session(id=7, session_key={REDACTED})"
    assert "hunter2" not in raw(capture)


def test_more_keys_can_be_redacted(worker: Any, capture: CaptureServer) -> None:
    with reinstalled(redact_keys=["tax_id"]):
        result = worker.echo.delay(taxId="DE-hunter2", name="Acme")
        result.get(timeout=10)
        run = run_of(capture, result.id)
    assert run.input["kwargs"] == {"taxId": REDACTED, "name": "Acme"}


def test_a_mask_callable_sees_the_captured_value(worker: Any, capture: CaptureServer) -> None:
    def mask(value: Any) -> Any:
        return json.loads(json.dumps(value).replace("bob@example.com", "<email>"))

    with reinstalled(mask=mask):
        result = worker.echo.delay(email="bob@example.com", password="hunter2-mask")
        result.get(timeout=10)
        run = run_of(capture, result.id)
    assert run.input["kwargs"] == {"email": "<email>", "password": REDACTED}
    assert "bob@example.com" not in raw(capture)


def test_a_failing_mask_sends_nothing_of_the_value(worker: Any, capture: CaptureServer) -> None:
    def mask(value: Any) -> Any:
        raise RuntimeError("mask bug")

    with reinstalled(mask=mask):
        result = worker.echo.delay(email="bob@example.com")
        assert result.get(timeout=10)["kwargs"] == {"email": "bob@example.com"}
        run = run_of(capture, result.id)
    assert run.input == {
        "args": "<not captured: mask failed>",
        "kwargs": "<not captured: mask failed>",
    }
    assert "bob@example.com" not in raw(capture)


def test_a_task_can_turn_capture_off_for_itself(
    worker: Any, extra: Any, capture: CaptureServer
) -> None:
    result = extra.keep_private.delay("medical record hunter2")
    assert result.get(timeout=10) == "MEDICAL RECORD HUNTER2"

    run = run_of(capture, result.id)
    assert run.name == "tests.support.config_tasks.keep_private"
    assert run.input is None and run.output is None
    assert "hunter2" not in raw(capture).lower()


def test_capture_is_off_for_tasks_matching_a_pattern(worker: Any, capture: CaptureServer) -> None:
    with reinstalled(capture_exclude_tasks=["tests.support.tasks.ech*"]):
        private = worker.echo.delay("hunter2-pattern")
        public = worker.add.delay(1, 2)
        private.get(timeout=10)
        public.get(timeout=10)
        private_run, public_run = run_of(capture, private.id), run_of(capture, public.id)
    assert private_run.input is None and private_run.output is None
    assert public_run.input == {"args": [1, 2], "kwargs": {}}
    assert "hunter2" not in raw(capture)


def test_capture_can_be_turned_off_globally(worker: Any, capture: CaptureServer) -> None:
    with reinstalled(capture_input=False, capture_output=False):
        result = worker.echo.delay("hunter2-global")
        result.get(timeout=10)
        run = run_of(capture, result.id)
    assert run.input is None and run.output is None
    assert "hunter2" not in raw(capture)


def test_large_values_are_cut_with_a_visible_marker(worker: Any, capture: CaptureServer) -> None:
    with reinstalled(max_payload_chars=200):
        result = worker.echo.delay("x" * 5_000, list(range(1_000)))
        result.get(timeout=10)
        run = run_of(capture, result.id)
    encoded = json.dumps(run.input)
    assert "...[truncated]" in encoded
    assert len(encoded) < 600
