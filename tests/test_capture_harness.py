"""The capture harness: what the real Langfuse SDK sends arrives, decodes, and
rebuilds into the traces Langfuse would show, as Langfuse's own conversion does."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from langfuse import get_client, propagate_attributes
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from celery_langfuse import testing
from celery_langfuse.pytest_plugin import _langfuse_clients
from celery_langfuse.testing import (
    ORACLE_ENV,
    CaptureServer,
    LangfuseOracle,
    Observation,
    build_traces,
    compare_with_langfuse,
)

OTLP_PATH = "/api/public/otel/v1/traces"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def observation(span_id: str, parent_id: str | None = None, **fields: Any) -> Observation:
    """An observation of TRACE_ID starting ``int(span_id, 16)`` ms after T0."""
    start = T0 + timedelta(milliseconds=int(span_id, 16))
    fields.setdefault("name", f"span-{span_id}")
    fields.setdefault("scope", "langfuse-sdk")
    return Observation(
        id=span_id,
        trace_id=TRACE_ID,
        parent_id=parent_id,
        start_time=start,
        end_time=start + timedelta(milliseconds=5),
        **fields,
    )


# The rollup, without HTTP


def test_trace_level_attributes_set_on_any_observation_reach_the_trace() -> None:
    root = observation("0000000000000001", name="request")
    worker = observation(
        "0000000000000002",
        "0000000000000001",
        attributes={
            "user.id": "u-1",
            "session.id": "s-1",
            "langfuse.trace.tags": ["cron", "billing"],
            "langfuse.trace.name": "nightly-billing",
            "langfuse.trace.metadata.tenant": '"acme"',
        },
    )

    (trace,) = build_traces([root, worker])

    assert (trace.user_id, trace.session_id) == ("u-1", "s-1")
    assert trace.tags == ["cron", "billing"]
    assert trace.name == "nightly-billing"
    assert trace.metadata == {"tenant": "acme"}


def test_the_latest_received_non_empty_trace_attribute_wins() -> None:
    first = observation("0000000000000001", attributes={"user.id": "early", "session.id": "s"})
    second = observation("0000000000000002", "0000000000000001", attributes={"user.id": "late"})
    third = observation("0000000000000003", "0000000000000001", attributes={"user.id": ""})

    (trace,) = build_traces([first, second, third])

    assert trace.user_id == "late"
    assert trace.session_id == "s"


def test_trace_input_and_output_come_from_the_last_received_root() -> None:
    root = observation("0000000000000001", input={"q": "hi"}, output="answer")
    child = observation("0000000000000003", "0000000000000001", input="child input")
    joined = observation(
        "0000000000000002",
        "00000000000000ff",
        input="worker input",
        output="worker output",
        attributes={"langfuse.internal.as_root": True},
    )

    (before,) = build_traces([joined, root, child])
    (after,) = build_traces([root, child, joined])

    # A span started with trace_context= writes the trace like a parentless root.
    assert (before.input, before.output) == ({"q": "hi"}, "answer")
    assert (after.input, after.output) == ("worker input", "worker output")


def test_a_root_writes_its_own_metadata_to_the_trace() -> None:
    root = observation(
        "0000000000000001",
        attributes={
            "langfuse.observation.metadata.step": '"request"',
            "langfuse.trace.metadata.tenant": '"acme"',
        },
    )
    child = observation(
        "0000000000000002",
        "0000000000000001",
        attributes={"langfuse.observation.metadata.step": '"child"'},
    )

    (trace,) = build_traces([root, child])

    assert trace.metadata == {"tenant": "acme", "step": "request"}


def test_a_trace_without_a_root_has_no_input_and_no_fallback_name() -> None:
    joined = observation("0000000000000002", "00000000000000ff", name="tasks.add", input=[1, 2])

    (trace,) = build_traces([joined])

    assert (trace.name, trace.input) == (None, None)
    assert trace.orphans() == [joined]


def test_without_a_trace_name_the_trace_is_named_after_its_root() -> None:
    (trace,) = build_traces([observation("0000000000000001", name="POST /orders")])

    assert trace.name == "POST /orders"


def test_a_span_received_twice_counts_once_with_the_later_copy() -> None:
    early = observation("0000000000000001", output="first")
    late = observation("0000000000000001", output="second")

    (trace,) = build_traces([early, late])

    assert [obs.output for obs in trace.observations] == ["second"]


def test_every_copy_of_a_span_received_twice_writes_the_trace() -> None:
    first = observation("0000000000000001", attributes={"session.id": "s-1"})
    again = observation("0000000000000001", output="second")

    (trace,) = build_traces([first, again])

    assert trace.session_id == "s-1"
    assert [obs.output for obs in trace.observations] == ["second"]


def test_observations_in_one_millisecond_keep_the_order_they_started_in() -> None:
    parent = observation("0000000000000001", name="cron", start_unix_nano=1_000_100)
    child = observation("0000000000000002", "0000000000000001", name="publish")
    child.start_time, child.start_unix_nano = parent.start_time, 1_000_900

    (trace,) = build_traces([child, parent])  # the child ends, so arrives, first

    assert [obs.name for obs in trace.observations] == ["cron", "publish"]


def test_tree_shows_nesting_and_flags_orphans() -> None:
    root = observation("0000000000000001", name="request", attributes={"user.id": "u-1"})
    child = observation("0000000000000002", "0000000000000001", name="publish", level="WARNING")
    orphan = observation(
        "0000000000000003",
        "00000000000000ff",
        name="run",
        attributes={"langfuse.internal.as_root": True},
    )

    (trace,) = build_traces([root, child, orphan])

    assert trace.orphans() == [orphan]
    lines = trace.tree().splitlines()
    assert "user='u-1'" in lines[0]
    assert lines[1].startswith("  request [span] 5.0 ms DEFAULT")
    assert lines[2].startswith("    publish [span] 5.0 ms WARNING")
    assert "orphan (started with trace_context=): parent 00000000000000ff" in lines[3]
    assert lines[4].startswith("    run ")


def test_find_insists_on_exactly_one_observation() -> None:
    root = observation("0000000000000001", name="task")
    retry = observation("0000000000000002", "0000000000000001", name="task")

    (trace,) = build_traces([root, retry])

    assert trace.find_all("task") == [root, retry]
    with pytest.raises(AssertionError, match="found 2; names present: \\['task'\\]"):
        trace.find("task")
    with pytest.raises(AssertionError, match="found 0"):
        trace.find("missing")


# The real SDK, in this process


def test_sdk_spans_rebuild_into_one_trace(langfuse_capture_clean: CaptureServer) -> None:
    langfuse = get_client()
    with langfuse.start_as_current_observation(name="request", input={"order": 7}) as root:
        trace_attributes = propagate_attributes(
            user_id="user-1", session_id="session-1", tags=["web", "test"], trace_name="checkout"
        )
        with (
            trace_attributes,
            langfuse.start_as_current_observation(name="publish", metadata={"queue": "q1"}),
        ):
            langfuse.start_observation(
                name="llm", as_type="generation", level="ERROR", status_message="boom"
            ).end()
        root.update(output={"ok": True})
    langfuse.flush()

    server = langfuse_capture_clean
    server.wait_for(lambda s: len(s.trace(root.trace_id).observations) == 3)
    trace = server.trace(root.trace_id)

    assert trace.name == "checkout"
    assert (trace.user_id, trace.session_id, trace.tags) == ("user-1", "session-1", ["web", "test"])
    assert (trace.input, trace.output) == ({"order": 7}, {"ok": True})
    assert trace.orphans() == []
    assert [obs.name for obs in trace.root_observations()] == ["request"]
    publish = trace.find("publish")
    assert publish.parent_id == root.id
    assert publish.metadata == {"queue": "q1"}
    llm = trace.find("llm")
    assert trace.children(publish) == [llm]
    assert (llm.type, llm.level, llm.status_message) == ("generation", "ERROR", "boom")
    assert trace.find("request").level == "DEFAULT"
    assert llm.scope == "langfuse-sdk"
    assert llm.duration >= 0


def test_sdk_score_arrives_and_attaches_to_its_trace(langfuse_capture_clean: CaptureServer) -> None:
    langfuse = get_client()
    with langfuse.start_as_current_observation(name="scored") as span:
        pass
    langfuse.create_score(trace_id=span.trace_id, name="accuracy", value=0.9, comment="good")
    langfuse.flush()

    server = langfuse_capture_clean
    server.wait_for(lambda s: s.trace(span.trace_id).scores)
    (score,) = server.trace(span.trace_id).scores
    assert (score.name, score.value, score.data_type, score.comment) == (
        "accuracy",
        0.9,
        "NUMERIC",
        "good",
    )
    assert server.scores == [score]


def test_sdk_auth_check_passes(langfuse_capture_clean: CaptureServer) -> None:
    assert get_client().auth_check() is True


def test_the_sdk_client_registry_is_readable(langfuse_capture_clean: CaptureServer) -> None:
    get_client()

    assert langfuse_capture_clean.base_url in [client.base_url for client in _langfuse_clients()]


# The wire, with httpx


def otlp_request(*, status_code: Any = Status.STATUS_CODE_UNSET) -> bytes:
    def attribute(key: str, value: str) -> KeyValue:
        return KeyValue(key=key, value=AnyValue(string_value=value))

    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.append(attribute("service.name", "by-hand"))
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name = "manual"
    span = scope_spans.spans.add()
    span.trace_id = bytes.fromhex(TRACE_ID)
    span.span_id = bytes.fromhex("00f067aa0ba902b7")
    span.name = "by-hand"
    span.start_time_unix_nano = 1_700_000_000_000_000_000
    span.end_time_unix_nano = 1_700_000_000_250_000_000
    span.status.code = status_code
    span.attributes.append(attribute("langfuse.observation.input", '{"a": [1, 2]}'))
    body: bytes = request.SerializeToString()
    return body


@pytest.mark.parametrize("encoding", ["gzip", "identity"])
def test_otlp_bodies_decode_with_and_without_gzip(
    langfuse_capture_clean: CaptureServer, encoding: str
) -> None:
    body = otlp_request()
    if encoding == "gzip":
        body = gzip.compress(body)
    server = langfuse_capture_clean

    response = httpx.post(
        server.base_url + OTLP_PATH,
        content=body,
        headers={"Content-Type": "application/x-protobuf", "Content-Encoding": encoding},
    )

    assert response.status_code == 200
    ExportTraceServiceResponse().ParseFromString(response.content)
    (obs,) = server.observations
    assert (obs.name, obs.trace_id, obs.parent_id, obs.scope) == (
        "by-hand",
        TRACE_ID,
        None,
        "manual",
    )
    assert obs.input == {"a": [1, 2]}
    assert obs.duration == 0.25
    assert obs.resource == {"service.name": "by-hand"}
    assert server.requests == 1


def test_an_error_status_without_a_level_reads_as_error(
    langfuse_capture_clean: CaptureServer,
) -> None:
    body = otlp_request(status_code=Status.STATUS_CODE_ERROR)

    httpx.post(langfuse_capture_clean.base_url + OTLP_PATH, content=body)

    (obs,) = langfuse_capture_clean.observations
    assert obs.level == "ERROR"


def test_set_response_makes_exports_fail_and_store_nothing(
    langfuse_capture_clean: CaptureServer,
) -> None:
    server = langfuse_capture_clean
    server.set_response(500)

    traces = httpx.post(server.base_url + OTLP_PATH, content=otlp_request())
    scores = httpx.post(server.base_url + "/api/public/scores", json=[{"name": "x", "value": 1}])

    assert (traces.status_code, scores.status_code) == (500, 500)
    assert (server.observations, server.scores, server.requests) == ([], [], 2)


def test_set_response_can_rate_limit_slowly(langfuse_capture_clean: CaptureServer) -> None:
    server = langfuse_capture_clean
    server.set_response(429, delay=0.2, retry_after=3)

    started = time.monotonic()
    response = httpx.post(server.base_url + OTLP_PATH, content=otlp_request())

    assert time.monotonic() - started >= 0.2
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "3"


def test_unknown_endpoints_answer_404_and_are_reported(
    langfuse_capture_clean: CaptureServer,
) -> None:
    server = langfuse_capture_clean

    response = httpx.post(server.base_url + "/api/public/datasets", json={"name": "d"})

    assert response.status_code == 404
    assert server.unhandled == ["POST /api/public/datasets: no such endpoint"]


def test_sdk_4_scores_sent_as_ingestion_events_are_captured(
    langfuse_capture_clean: CaptureServer,
) -> None:
    server = langfuse_capture_clean
    event = {
        "id": "e-1",
        "type": "score-create",
        "timestamp": "2026-01-01T00:00:00Z",
        "body": {"id": "s-1", "traceId": "ab" * 16, "name": "cron_success", "value": 1},
    }

    response = httpx.post(server.base_url + "/api/public/ingestion", json={"batch": [event]})

    assert response.status_code == 207
    assert response.json()["successes"] == [{"id": "e-1", "status": 201}]
    captured = [(s.name, s.value, s.trace_id) for s in server.scores]
    assert captured == [("cron_success", 1, "ab" * 16)]


def test_wait_for_timeout_shows_what_was_captured(langfuse_capture_clean: CaptureServer) -> None:
    server = langfuse_capture_clean
    httpx.post(server.base_url + OTLP_PATH, content=otlp_request())

    with pytest.raises(AssertionError) as raised:
        server.wait_for(lambda s: s.trace("f" * 32), timeout=0.1)

    message = str(raised.value)
    assert "KeyError" in message
    assert f"Trace {TRACE_ID}" in message
    assert "by-hand [span] 250.0 ms DEFAULT" in message


def test_undecodable_exports_answer_400_and_are_reported(
    langfuse_capture_clean: CaptureServer,
) -> None:
    server = langfuse_capture_clean

    spans = httpx.post(server.base_url + OTLP_PATH, content=b"\xff not protobuf")
    scores = httpx.post(server.base_url + "/api/public/scores", json=[{"value": 1}])

    assert (spans.status_code, scores.status_code) == (400, 400)
    assert [entry.split(":")[0] for entry in server.unhandled] == [
        "POST /api/public/otel/v1/traces",
        "POST /api/public/scores",
    ]


# Other processes

SUBPROCESS_SPAN = """
from langfuse import get_client
langfuse = get_client()
with langfuse.start_as_current_observation(name="from-subprocess") as span:
    print(span.trace_id)
langfuse.flush()
"""


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_spans_from_a_subprocess_are_captured(
    langfuse_capture_clean: CaptureServer, compression: str
) -> None:
    server = langfuse_capture_clean
    env = {**os.environ, **server.env, "LANGFUSE_OTEL_COMPRESSION": compression}

    done = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_SPAN],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    trace_id = done.stdout.strip()
    server.wait_for(lambda s: s.trace(trace_id).find("from-subprocess"))
    assert server.unhandled == []


# Checked against Langfuse's own conversion


def test_langfuse_reads_an_sdk_export_as_the_capture_server_does(
    langfuse_capture_clean: CaptureServer, langfuse_oracle: LangfuseOracle
) -> None:
    langfuse = get_client()
    with langfuse.start_as_current_observation(name="request", metadata={"step": 1}) as root:
        with propagate_attributes(user_id="u-1", tags=["web"], metadata={"tenant": "acme"}):
            langfuse.start_observation(
                name="llm",
                as_type="generation",
                model="gpt-4o",
                usage_details={"input": 10, "output": 5},
            ).end()
    joined = langfuse.start_observation(
        name="joined", trace_context={"trace_id": root.trace_id, "parent_span_id": root.id}
    )
    joined.update(input="late input")
    joined.end()
    langfuse.flush()
    server = langfuse_capture_clean
    server.wait_for(lambda s: len(s.trace(root.trace_id).observations) == 3)

    comparison = compare_with_langfuse(server.bodies, langfuse_oracle)

    assert comparison.ok, comparison.report()
    assert comparison.observations == 3
    trace = server.trace(root.trace_id)
    llm = trace.find("llm")
    assert llm.metadata == {"tenant": "acme"}
    assert (llm.model, llm.usage_details) == ("gpt-4o", {"input": 10, "output": 5})
    assert trace.metadata == {"tenant": "acme", "step": 1}
    assert trace.input == "late input"  # the span joined with trace_context= wrote last


def microseconds(unix_nano: int) -> datetime:
    return testing._UNIX_EPOCH + timedelta(microseconds=unix_nano // 1000)


def test_a_difference_is_reported_field_by_field(
    langfuse_capture_clean: CaptureServer,
    langfuse_oracle: LangfuseOracle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    httpx.post(langfuse_capture_clean.base_url + OTLP_PATH, content=otlp_request())
    (body,) = langfuse_capture_clean.bodies
    # the capture server's old reading of times, to microseconds
    monkeypatch.setattr(
        testing,
        "_datetime",
        lambda nanos: testing._UNIX_EPOCH + timedelta(microseconds=nanos // 1000),
    )
    odd = otlp_request().replace(
        (1_700_000_000_250_000_000).to_bytes(8, "little"),
        (1_700_000_000_250_400_000).to_bytes(8, "little"),
    )

    comparison = compare_with_langfuse([body, odd], langfuse_oracle)

    assert not comparison.ok
    assert [(d.field, d.where.split(" (")[0]) for d in comparison.differences] == [
        ("end_time", "observation 00f067aa0ba902b7 'by-hand'")
    ]
    report = comparison.report()
    assert "compared 2 OTLP bodies, 2 observations, 1 traces" in report
    assert "capture server: datetime.datetime(2023, 11, 14, 22, 13, 20, 250400" in report
    assert "Langfuse:       datetime.datetime(2023, 11, 14, 22, 13, 20, 250000" in report


def test_a_body_langfuse_would_reject_is_reported(langfuse_oracle: LangfuseOracle) -> None:
    request = ExportTraceServiceRequest()
    request.ParseFromString(otlp_request())
    request.resource_spans[0].scope_spans[0].spans[0].span_id = b""  # a log record's shape

    comparison = compare_with_langfuse([request.SerializeToString()], langfuse_oracle)

    assert not comparison.ok
    (rejected,) = comparison.rejected
    assert rejected.startswith("body 1: status 400")


def test_clear_hands_the_bodies_it_forgets_to_on_clear(
    langfuse_capture_clean: CaptureServer,
) -> None:
    server = langfuse_capture_clean
    handed: list[list[bytes]] = []
    httpx.post(server.base_url + OTLP_PATH, content=otlp_request())
    assert server.bodies == [otlp_request()]

    server.on_clear(handed.append)
    try:
        server.clear()
    finally:
        server.on_clear(None)
    server.clear()

    assert handed == [[otlp_request()]]
    assert server.bodies == []


FAILING_PROJECT_CONFTEST = """
from datetime import timedelta

from celery_langfuse import testing

# a capture server that reads times to the microsecond, as it once did
testing._datetime = lambda nanos: testing._UNIX_EPOCH + timedelta(microseconds=nanos // 1000)
"""

FAILING_PROJECT_TEST = """
import time

from langfuse import get_client


def test_one_span(langfuse_capture_clean):
    langfuse = get_client()
    while time.time_ns() % 1_000_000 < 1000:  # a start time with microseconds
        pass
    with langfuse.start_as_current_observation(name="timed"):
        time.sleep(0.0105)
    langfuse.flush()
    langfuse_capture_clean.wait_for_observations(1, name="timed")
"""


def test_a_test_whose_capture_differs_from_langfuse_fails_with_the_diff(
    tmp_path: Path, langfuse_oracle: LangfuseOracle
) -> None:
    (tmp_path / "conftest.py").write_text(FAILING_PROJECT_CONFTEST)
    (tmp_path / "test_timed.py").write_text(FAILING_PROJECT_TEST)
    env = {key: value for key, value in os.environ.items() if not key.startswith("LANGFUSE_")}

    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-p", "no:celery"],
        cwd=tmp_path,
        env={**env, ORACLE_ENV: str(langfuse_oracle.script)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 passed, 1 error" in done.stdout
    assert "ERROR at teardown of test_one_span" in done.stdout
    assert "the capture server does not show what Langfuse shows" in done.stdout
    assert "'timed' (trace " in done.stdout
    assert "capture server: datetime.datetime(" in done.stdout
    assert "differences (" in done.stdout and "start_time: 1" in done.stdout, done.stdout


@pytest.mark.parametrize(
    ("sent", "shown"),
    [
        (  # OpenAI chat completions: renamed, details taken out of the plain counts
            {
                "prompt_tokens": 10,
                "completion_tokens": 6,
                "total_tokens": 16,
                "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": None},
                "completion_tokens_details": {"reasoning_tokens": 2},
            },
            {"input": 6, "input_cached_tokens": 4, "output": 4, "output_reasoning_tokens": 2,
             "total": 16},
        ),
        (  # OpenAI responses API
            {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8},
            {"input": 3, "output": 5, "total": 8},
        ),
        (  # any other shape: its non-negative whole numbers, numeric strings parsed
            {"input": 3, "output": "5", "cache_read": -1, "note": "n/a", "ratio": 0.5},
            {"input": 3, "output": 5},
        ),
    ],
    ids=["openai-chat", "openai-responses", "other"],
)
def test_generation_usage_is_shown_as_langfuse_stores_it(
    langfuse_capture_clean: CaptureServer, sent: dict[str, Any], shown: dict[str, int]
) -> None:
    """The oracle comparison after this test checks the same against Langfuse's own
    conversion."""
    with get_client().start_as_current_observation(
        name="usage", as_type="generation", model="m"
    ) as generation:
        generation.update(usage_details=sent)
    get_client().flush()
    langfuse_capture_clean.wait_for_observations(1)
    [observation] = langfuse_capture_clean.observations
    assert observation.usage_details == shown
