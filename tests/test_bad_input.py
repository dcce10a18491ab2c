"""Trace headers are untrusted input: whatever a message carries, the task runs.

Property-based tests of ``headers.extract``, then raw Celery messages with garbage,
missing, oversized or wrongly typed trace headers published straight to Redis with
kombu, bypassing our ``before_task_publish`` handler, to an in-thread worker and to a
real prefork worker.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celery_langfuse import headers, logs
from celery_langfuse.headers import TraceAttributes, TraceParent
from celery_langfuse.testing import CaptureServer
from tests.conftest import in_thread_worker, worker_process

pytestmark = pytest.mark.timeout(120)

HEX = "0123456789abcdef"
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=300)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
almost_valid_strings = st.one_of(
    st.text(alphabet=HEX, min_size=15, max_size=33),
    st.text(alphabet=HEX + "-", min_size=50, max_size=60),
    st.builds(
        lambda v, t, s, f: f"{v}-{t}-{s}-{f}",
        st.text(alphabet=HEX, min_size=2, max_size=2),
        st.text(alphabet=HEX, min_size=32, max_size=32),
        st.text(alphabet=HEX, min_size=16, max_size=16),
        st.text(alphabet=HEX + "g", min_size=2, max_size=2),
    ),
    st.just("[" * 5_000),
    st.just("x" * 20_000),
    st.just('{"k": "' + "v" * 300 + '"}'),
)
#: Any value a message's trace header could hold after the broker decoded it.
header_values = json_values | almost_valid_strings
#: A message's headers: our names (and some others) mapped to anything.
any_headers = st.dictionaries(
    st.sampled_from([*headers.ALL_HEADERS, "tracestate", "baggage", "x-other"])
    | st.text(max_size=20),
    header_values,
    max_size=12,
)


@given(any_headers)
@settings(max_examples=400, deadline=None)
def test_extract_never_raises_and_returns_only_valid_values(
    message_headers: dict[str, Any],
) -> None:
    extracted = headers.extract(message_headers)

    if extracted.parent is not None:
        assert re.fullmatch(r"[0-9a-f]{32}", extracted.parent.trace_id)
        assert re.fullmatch(r"[0-9a-f]{16}", extracted.parent.parent_id)
        assert extracted.parent.trace_id != "0" * 32
        assert extracted.parent.parent_id != "0" * 16
    attributes = extracted.attributes
    for value in (attributes.user_id, attributes.session_id, attributes.trace_name):
        assert value is None or (isinstance(value, str) and 0 < len(value) <= 200)
    assert len(attributes.tags) <= 50
    assert all(isinstance(tag, str) and 0 < len(tag) <= 200 for tag in attributes.tags)
    assert len(attributes.metadata) <= 50
    assert all(isinstance(v, str) and len(v) <= 200 for v in attributes.metadata.values())
    assert attributes.environment is None or re.fullmatch(
        r"[a-z0-9_-]{1,40}", attributes.environment
    )
    assert extracted.published_at is None or extracted.published_at > 0
    assert set(extracted.malformed) <= set(message_headers)


@given(
    trace_id=st.text(alphabet=HEX, min_size=32, max_size=32).filter(lambda v: v != "0" * 32),
    parent_id=st.text(alphabet=HEX, min_size=16, max_size=16).filter(lambda v: v != "0" * 16),
    user_id=st.none()
    | st.text(alphabet=st.characters(max_codepoint=127), min_size=1, max_size=200),
    tags=st.lists(st.text(min_size=1, max_size=200), max_size=50).map(tuple),
    environment=st.none() | st.from_regex(r"(?!langfuse)[a-z0-9_-]{1,40}", fullmatch=True),
)
@settings(max_examples=200, deadline=None)
def test_what_inject_writes_extract_reads_back_unchanged(
    trace_id: str,
    parent_id: str,
    user_id: str | None,
    tags: tuple[str, ...],
    environment: str | None,
) -> None:
    attributes = TraceAttributes(user_id=user_id, tags=tags, environment=environment)
    out: dict[str, Any] = {}
    headers.inject(out, parent=TraceParent(trace_id, parent_id), attributes=attributes)

    back = headers.extract(out)
    assert back.parent == TraceParent(trace_id, parent_id, sampled=True, from_langfuse=True)
    assert back.attributes == attributes
    assert back.malformed == ()


# -- raw broker messages ------------------------------------------------------------

#: Header sets a buggy or hostile producer could send; the task must run regardless.
NASTY_HEADERS: list[dict[str, Any]] = [
    {},
    {"traceparent": None, "x-langfuse-trace-id": None},
    {"traceparent": 42, "x-langfuse-trace-id": ["a"], "x-langfuse-parent-id": {"b": 1}},
    {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01" + " " * 100_000},
    {"x-langfuse-user-id": "u" * 1_000_000, "x-langfuse-session-id": 3.5},
    {"x-langfuse-tags": "[" * 100_000, "x-langfuse-metadata": "{" * 10},
    {"x-langfuse-tags": '["ok", 1, null, {"x": 1}]', "x-langfuse-metadata": '{"a": [1, 2]}'},
    {"x-langfuse-published-at": 10**400, "x-langfuse-environment": "langfuse-internal"},
    {"x-langfuse-published-at": "nan", "x-langfuse-trace-name": ""},
    {
        "x-langfuse-published-at": [],
        "x-langfuse-trace-id": "0" * 32,
        "x-langfuse-parent-id": "0" * 16,
    },
    {"traceparent": "ff-" + "a" * 32 + "-" + "b" * 16 + "-01", "baggage": "\x00" * 50},
    {"x-langfuse-trace-id": "A" * 32, "x-langfuse-parent-id": "B" * 16},  # valid, upper case
]


def publish_raw(
    app: Any, task_name: str, args: tuple[Any, ...], trace_headers: dict[str, Any], queue: str
) -> str:
    """Publish a protocol 2 task message with kombu, bypassing before_task_publish."""
    task_id = str(uuid.uuid4())
    message = app.amqp.as_task_v2(task_id, task_name, args, {})
    # Celery's own protocol headers win: a generated name can be "task" or "id", and a
    # message without its task name is not the case under test.
    message_headers = {**trace_headers, **message.headers}
    with app.producer_or_acquire() as producer:
        producer.publish(
            message.body,
            exchange="",
            routing_key=queue,
            headers=message_headers,
            serializer="json",
            retry=True,
            **message.properties,
        )
    return task_id


@pytest.fixture
def quiet_interval() -> Iterator[None]:
    """Forget earlier rate-limited warnings so this test sees the first one."""
    logs._last_logged.clear()
    yield
    logs._last_logged.clear()


@given(st.lists(any_headers, min_size=25, max_size=25))
@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
def test_raw_messages_with_any_trace_headers_run_on_an_in_thread_worker(
    tasks_app: Any, capture: CaptureServer, header_sets: list[dict[str, Any]]
) -> None:
    queue = tasks_app.QUEUE
    # Values a JSON broker message cannot carry (NaN is fine, integers past 64 bits too).
    with in_thread_worker(tasks_app.app, pool="threads", concurrency=2):
        ids = [
            publish_raw(tasks_app.app, "tests.support.tasks.add", (i, 1), h, queue)
            for i, h in enumerate(header_sets)
        ]
        results = [tasks_app.app.AsyncResult(task_id).get(timeout=20) for task_id in ids]
    assert results == [i + 1 for i in range(len(header_sets))]


def test_malformed_headers_warn_once_per_interval_and_every_task_runs(
    tasks_app: Any, capture: CaptureServer, quiet_interval: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_langfuse")
    queue = tasks_app.QUEUE
    with in_thread_worker(tasks_app.app):
        ids = [
            publish_raw(tasks_app.app, "tests.support.tasks.add", (i, 1), h, queue)
            for i, h in enumerate(NASTY_HEADERS)
        ]
        results = [tasks_app.app.AsyncResult(task_id).get(timeout=20) for task_id in ids]

    assert results == [i + 1 for i in range(len(NASTY_HEADERS))]
    warnings = [r for r in caplog.records if "malformed trace header" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert not warnings[0].exc_info  # a bad header is not an exception worth a traceback
    capture.wait_for(lambda s: {o.metadata.get("task_id") for o in s.observations} >= set(ids))
    upper_case = next(o for o in capture.observations if o.metadata.get("task_id") == ids[-1])
    assert (upper_case.trace_id, upper_case.parent_id) == ("a" * 32, "b" * 16)


def test_raw_messages_with_nasty_headers_never_crash_a_prefork_worker(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    with worker_process(capture.env, "-P", "prefork", "-c", "2", tmp_path=tmp_path) as worker:
        ids = [
            publish_raw(tasks_app.app, "tests.support.tasks.add", (i, 1), h, worker.queue)
            for i, h in enumerate(NASTY_HEADERS * 3)
        ]
        results = [tasks_app.app.AsyncResult(task_id).get(timeout=30) for task_id in ids]
        assert worker.process.poll() is None, worker.log()
        capture.wait_for(
            lambda s: {o.metadata.get("task_id") for o in s.observations} >= set(ids), timeout=20
        )
        log = worker.log()

    assert results == [i + 1 for i in range(len(ids))]
    # Rate-limited: two pool children, so at most one warning from each.
    assert 1 <= log.count("malformed trace header") <= 2, log
    assert "Traceback" not in log, log
