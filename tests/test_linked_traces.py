"""Linked traces for fan-out: a published task may start a trace of its own, linked to
its caller's, by task name pattern, per call, or when a trace grows past the guard.

Real Redis, a real prefork worker running tests/support/fanout_app.py (whose tasks
publish the fan-out, so that app's settings are the ones publishing follows), the real
SDK in the test process, the capture server.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from langfuse import get_client, propagate_attributes
from opentelemetry import trace as otel_trace

from celery_langfuse import ConfigurationError, client, install, uninstall
from celery_langfuse.headers import (
    LINK_TRACE_ID,
    LINKED_TRACE,
    TraceAttributes,
    extract,
    inject,
    signed_by,
)
from celery_langfuse.publish import on_before_task_publish
from celery_langfuse.spans import LeanSpan
from celery_langfuse.testing import (
    CaptureServer,
    LangfuseOracle,
    Observation,
    SpanLink,
    Trace,
    compare_with_langfuse,
)
from tests.conftest import flush_in_process, worker_process
from tests.support.installed import support_app

pytestmark = pytest.mark.timeout(240)

PREFIX = "tests.support.fanout_app."
FAN_OUT, LEAF, LINKED_LEAF, LINKED_FLAKY = (
    PREFIX + name for name in ("fan_out", "leaf", "linked_leaf", "linked_flaky")
)


@pytest.fixture
def fanout(capture: CaptureServer) -> Iterator[Any]:
    with support_app("fanout_app") as module:
        yield module


def fan_out_from_a_request(fanout: Any, queue: str, task_name: str, count: int) -> str:
    """A request (user u-1, session s-1, tag "fan") that enqueues fan_out; its trace id."""
    with get_client().start_as_current_observation(name="request") as request:
        with propagate_attributes(user_id="u-1", session_id="s-1", tags=["fan"]):
            result = fanout.fan_out.apply_async((task_name, count), queue=queue)
    assert result.get(timeout=60) == count
    return request.trace_id


def fanout_worker(capture: CaptureServer, tmp_path: Path, env: dict[str, str]) -> Any:
    """A prefork worker (2 processes) of tests/support/fanout_app.py."""
    return worker_process(
        capture.env, "-P", "prefork", "-c", "2", env=env, tmp_path=tmp_path,
        module="tests.support.fanout_app",
    )


def runs(capture: CaptureServer, name: str) -> list[Observation]:
    return [o for o in capture.observations if o.name == name]


def assert_linked_child(
    child: Trace, parent: Trace, publish: Observation, task: str, base_url: str
) -> None:
    """What Langfuse shows for a linked trace: its own root run, the caller's user,
    session and tags, and metadata pointing back at the caller's trace; and what an
    OTel backend shows: the root's span link to the caller's publish observation."""
    (root,) = child.root_observations()
    assert root.name == task and root.parent_id is None, child.tree()
    assert root.links == [SpanLink(parent.id, publish.id)]
    assert publish.links == []
    assert child.orphans() == [], child.tree()
    assert (root.user_id, root.session_id) == ("u-1", "s-1")
    assert "fan" in root.tags
    assert root.trace_name == task
    assert root.trace_metadata["parent_trace_id"] == parent.id
    assert root.trace_metadata["parent_observation_id"] == publish.id
    assert root.trace_metadata["parent_trace_url"] == (
        f"{base_url}/project/proj-fanout/traces/{parent.id}"
    )
    assert publish.metadata["linked_trace_id"] == child.id
    assert publish.metadata["linked_trace_url"] == (
        f"{base_url}/project/proj-fanout/traces/{child.id}"
    )


def test_tasks_matching_a_pattern_start_linked_traces(
    fanout: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    env = {"CELERY_LANGFUSE_TEST_LINKED": "*.linked_*"}
    with fanout_worker(capture, tmp_path, env) as worker:
        trace_id = fan_out_from_a_request(fanout, worker.queue, LINKED_LEAF, 5)
        capture.wait_for_observations(5, name=LINKED_LEAF, timeout=60)
    flush_in_process()

    parent = capture.trace(trace_id)
    assert sorted(o.name for o in parent.observations) == sorted(
        ["request", f"publish {FAN_OUT}", FAN_OUT] + [f"publish {LINKED_LEAF}"] * 5
    ), parent.tree()
    assert parent.orphans() == [], parent.tree()
    publishes = parent.find_all(f"publish {LINKED_LEAF}")
    for publish in publishes:
        child = capture.trace(publish.metadata["linked_trace_id"])
        assert_linked_child(child, parent, publish, LINKED_LEAF, capture.base_url)
    assert len(capture.traces()) == 1 + 5


def test_a_retry_of_a_linked_task_stays_in_its_linked_trace(
    fanout: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    env = {"CELERY_LANGFUSE_TEST_LINKED": "*.linked_*"}
    with fanout_worker(capture, tmp_path, env) as worker:
        trace_id = fan_out_from_a_request(fanout, worker.queue, LINKED_FLAKY, 2)
        capture.wait_for(lambda s: len(runs(s, LINKED_FLAKY)) >= 4, timeout=60)
    flush_in_process()

    parent = capture.trace(trace_id)
    assert len(capture.traces()) == 1 + 2
    for publish in parent.find_all(f"publish {LINKED_FLAKY}"):
        child = capture.trace(publish.metadata["linked_trace_id"])
        first, retried = sorted(child.find_all(LINKED_FLAKY), key=lambda o: o.start_time)
        assert first.level == "WARNING" and first.parent_id is None
        assert child.find(f"publish {LINKED_FLAKY}").parent_id == first.id
        assert retried.parent_id == child.find(f"publish {LINKED_FLAKY}").id
        assert child.orphans() == [], child.tree()


def test_past_max_trace_observations_further_tasks_start_linked_traces(
    fanout: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    env = {"CELERY_LANGFUSE_MAX_TRACE_OBSERVATIONS": "10", "CELERY_LANGFUSE_TEST_LINKED": "no.*"}
    with fanout_worker(capture, tmp_path, env) as worker:
        trace_id = fan_out_from_a_request(fanout, worker.queue, LEAF, 30)
        capture.wait_for_observations(30, name=LEAF, timeout=60)
        log_text = worker.log()
    flush_in_process()

    parent = capture.trace(trace_id)
    # In the worker process that ran fan_out: its run and 9 publishes fit in 10; the
    # other 21 publishes name linked traces.
    in_parent = parent.find_all(LEAF)
    linked = [p for p in parent.find_all(f"publish {LEAF}") if "linked_trace_id" in p.metadata]
    assert (len(in_parent), len(linked)) == (9, 21), parent.tree()
    assert all(o.links == [] for o in parent.observations)  # only linked roots carry one
    for publish in linked:
        child = capture.trace(publish.metadata["linked_trace_id"])
        assert_linked_child(child, parent, publish, LEAF, capture.base_url)
    assert log_text.count("max_trace_observations") == 1, log_text[-3000:]
    # The worker says, once its app is finalized, that a pattern names no task; once
    # (its pool processes inherit the finalized app).
    assert log_text.count("linked_trace_tasks: 'no.*' match(es) none of the tasks") == 1
    assert f"(its tasks: {PREFIX}dies_once, {FAN_OUT}, {FAN_OUT}_chord," in log_text
    print(f"\nguard at 10: {len(in_parent)} runs in the trace, {len(linked)} linked traces")


def test_a_caller_links_one_message_with_a_header(
    running_worker: Any, capture: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.support import tasks

    with get_client().start_as_current_observation(name="caller") as caller:
        linked = tasks.header_probe.apply_async(headers={LINKED_TRACE: "1"})
        joined = tasks.header_probe.apply_async(headers={LINKED_TRACE: "0"})
        with caplog.at_level(logging.WARNING, logger="celery_langfuse.publish"):
            not_a_string = tasks.header_probe.apply_async(headers={LINKED_TRACE: True})
    linked_headers = linked.get(timeout=30)
    assert LINKED_TRACE not in linked_headers  # consumed by the publish: a retry won't repeat it
    assert LINK_TRACE_ID in linked_headers and "x-langfuse-parent-id" not in linked_headers
    assert joined.get(timeout=30)["x-langfuse-trace-id"] == caller.trace_id
    assert not_a_string.get(timeout=30)["x-langfuse-trace-id"] == caller.trace_id
    assert f"ignoring header {LINKED_TRACE}=True" in caplog.text

    flush_in_process()
    capture.wait_for(lambda s: len(runs(s, "tests.support.tasks.header_probe")) == 3, timeout=20)
    parent = capture.trace(caller.trace_id)
    assert len(parent.find_all("tests.support.tasks.header_probe")) == 2
    child = capture.trace(linked_headers[LINK_TRACE_ID])
    (run,) = child.observations
    assert run.parent_id is None and run.trace_metadata["parent_trace_id"] == caller.trace_id
    (publish,) = [
        p for p in parent.find_all("publish tests.support.tasks.header_probe")
        if p.metadata.get("linked_trace_id") == child.id
    ]
    assert run.links == [SpanLink(caller.trace_id, publish.id)]


def test_a_linked_message_that_never_runs_is_recorded_in_its_linked_trace(
    running_worker: Any, capture: CaptureServer
) -> None:
    """An expired message is recorded where its run would have been: the root of the
    trace its publish observation names, linked to that publish observation."""
    from tests.support import tasks

    with get_client().start_as_current_observation(name="caller") as caller:
        tasks.header_probe.apply_async(
            headers={LINKED_TRACE: "1"},
            expires=datetime.now(timezone.utc) - timedelta(seconds=1),
        )
    flush_in_process()
    capture.wait_for(lambda s: runs(s, "tests.support.tasks.header_probe"), timeout=20)
    publish = capture.trace(caller.trace_id).find("publish tests.support.tasks.header_probe")
    (expired,) = capture.trace(publish.metadata["linked_trace_id"]).observations
    assert expired.name == "tests.support.tasks.header_probe" and expired.parent_id is None
    assert "expired" in (expired.status_message or "")
    assert expired.links == [SpanLink(caller.trace_id, publish.id)]


@pytest.mark.parametrize("span_path", ["lean", "sdk"])
def test_the_root_of_a_linked_trace_carries_an_otel_span_link_to_the_publish(
    span_path: str,
    capture: CaptureServer,
    langfuse_oracle: LangfuseOracle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The link is written on both observation paths: this library's lean spans (OTLP
    encoded by hand) and the SDK's spans (a client with, say, a span filter). The
    publish handler and the worker handlers are called as Celery calls them."""
    if span_path == "sdk":
        monkeypatch.setattr(client, "_recorders", (client.get_langfuse(), None))
    app = Celery("linked-span-link")

    @app.task(name="proj.linked.probe", shared=False)
    def probe() -> None:
        return None

    installation = install(app)
    try:
        with get_client().start_as_current_observation(name="caller") as caller:
            message: dict[str, Any] = {"task": probe.name, "id": str(uuid.uuid4())}
            message[LINKED_TRACE] = "1"
            on_before_task_publish(sender=probe.name, headers=message, routing_key="q")
        run_span = run_in_worker(installation, probe, message)
    finally:
        uninstall(app)
    assert isinstance(run_span, LeanSpan) == (span_path == "lean")
    flush_in_process()

    publish = capture.trace(caller.trace_id).find("publish proj.linked.probe")
    (root,) = capture.trace(message[LINK_TRACE_ID]).observations
    assert (root.name, root.parent_id) == ("proj.linked.probe", None)
    assert root.links == [SpanLink(caller.trace_id, publish.id)]
    assert publish.links == [] and capture.trace(caller.trace_id).find("caller").links == []
    # Langfuse ignores the link but must still take the body that carries it.
    comparison = compare_with_langfuse(capture.bodies, langfuse_oracle)
    assert comparison.ok and comparison.observations == 3, comparison.report()


def test_the_link_is_read_from_a_linked_message_only_with_valid_ids() -> None:
    def linked_message(**metadata: str) -> dict[str, Any]:
        message: dict[str, Any] = {}
        inject(
            message, parent=None, attributes=TraceAttributes(metadata=metadata),
            link_trace_id="ab" * 16,
        )
        return message

    ids = {"parent_trace_id": '"' + "cd" * 16 + '"', "parent_observation_id": '"' + "ef" * 8 + '"'}
    assert extract(linked_message(**ids)).linked_from == ("cd" * 16, "ef" * 8, True, False)
    for bad in ({"parent_observation_id": '"' + "0" * 16 + '"'}, {"parent_trace_id": "cd" * 16},
                {"parent_trace_id": '"CD"'}, {"parent_observation_id": "["}):
        assert extract(linked_message(**{**ids, **bad})).linked_from is None, bad
    # The same metadata on a message that starts no linked trace links nothing.
    plain: dict[str, Any] = {}
    inject(plain, parent=None, attributes=TraceAttributes(metadata=ids))
    assert extract(plain).linked_from is None


def run_in_worker(installation: Any, task: Any, message: dict[str, Any]) -> Any:
    """One run of ``task`` through the worker handlers, with the request a worker
    builds from ``message``; the span current while it runs."""
    worker = installation.worker
    task_id = message["id"]
    task.push_request(headers=dict(message), hostname="worker@host", **message)
    try:
        worker.on_task_prerun(sender=task, task_id=task_id, task=task, args=(), kwargs={})
        current = otel_trace.get_current_span()
        worker.on_task_postrun(
            sender=task, task_id=task_id, task=task, retval=None, state="SUCCESS"
        )
    finally:
        task.pop_request()
    return current


def test_a_pattern_naming_no_registered_task_is_an_error_at_install() -> None:
    app = Celery("fanout-validation")

    @app.task(name="proj.fan.leaf", shared=False)
    def leaf() -> None:
        return None

    app.finalize()
    with pytest.raises(
        ConfigurationError,
        # The tasks named: this app's (and the shared ones other modules of this test
        # session defined, which every app gets).
        match=r"linked_trace_tasks=.*'proj\.nope\.\*' match\(es\) none of the tasks "
        r"registered in app 'fanout-validation' \(its tasks: [^)]*proj\.fan\.leaf[,)]",
    ):
        install(app, linked_trace_tasks=["proj.fan.*", "proj.nope.*"])
    install(app, linked_trace_tasks=["proj.fan.*"])
    uninstall(app)


def test_a_pattern_naming_no_task_warns_once_when_the_app_finalizes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A producer (a web app, say) decides linking at publish but runs no worker: its
    patterns are checked when its app finalizes, whatever process it is."""
    app = Celery("web-producer")

    @app.task(name="proj.web.send_email", shared=False)
    def send_email() -> None:
        return None

    install(app, linked_trace_tasks=["proj.web.*", "proj.mail.*"])  # not finalized yet
    try:
        with caplog.at_level(logging.WARNING, logger="celery_langfuse.install"):
            app.finalize()
            app.finalize()  # once only
            assert send_email.name == "proj.web.send_email"
    finally:
        uninstall(app)
    (warning,) = [r.getMessage() for r in caplog.records if "linked_trace_tasks" in r.getMessage()]
    assert "'proj.mail.*' match(es) none of the tasks registered in app 'web-producer'" in warning
    assert re.search(r"\(its tasks: [^)]*proj\.web\.send_email[,)]", warning), warning
    assert "'proj.web.*'" not in warning


def test_patterns_that_all_match_or_an_uninstalled_app_warn_nothing_at_finalize(
    caplog: pytest.LogCaptureFixture,
) -> None:
    matching, uninstalled = Celery("all-match"), Celery("uninstalled")

    def leaf() -> None:
        return None

    for app in (matching, uninstalled):
        app.task(name="proj.ok.leaf", shared=False)(leaf)
    install(matching, linked_trace_tasks=["proj.ok.*"])
    install(uninstalled, linked_trace_tasks=["proj.typo.*"])
    uninstall(uninstalled)
    try:
        with caplog.at_level(logging.WARNING, logger="celery_langfuse.install"):
            matching.finalize()
            uninstalled.finalize()
    finally:
        uninstall(matching)
    assert "proj.ok.leaf" in matching.tasks and "proj.ok.leaf" in uninstalled.tasks
    assert [r for r in caplog.records if "linked_trace_tasks" in r.getMessage()] == []


def test_a_linked_message_is_signed_and_only_a_trusted_one_is_followed() -> None:
    key = b"producer-secret-0123456789"
    message: dict[str, Any] = {}
    inject(
        message, parent=None, attributes=TraceAttributes(user_id="u"), signing_key=key,
        link_trace_id="ab" * 16,
    )
    assert signed_by(message, key)
    assert extract(message).link_trace_id == "ab" * 16
    assert extract(message, trusted=False).link_trace_id is None
    tampered = {**message, LINK_TRACE_ID: "cd" * 16}
    assert not signed_by(tampered, key)
    # A message without a link signs as it always did (rolling deploys keep trust).
    plain: dict[str, Any] = {}
    inject(plain, parent=None, attributes=TraceAttributes(user_id="u"), signing_key=key)
    assert LINK_TRACE_ID not in plain and signed_by(plain, key)

