"""The Langfuse SDK details celery-langfuse relies on, for the installed SDK version
(any of ``langfuse>=4.7,<6``; .ci/run runs this file on 4.7, 4.12, 4.18, 5.0 and 5.2).
If an SDK release changes one, this fails first, with a message that says which."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
from typing import Any

import langfuse
import pytest
from langfuse import get_client, propagate_attributes

from celery_langfuse import _sdk, client, headers
from celery_langfuse.headers import TraceAttributes
from celery_langfuse.testing import CaptureServer

SDK = _sdk.installed()


def test_the_installed_sdk_is_the_one_the_facts_describe() -> None:
    assert SDK.version == langfuse.__version__
    assert SDK.supported, f"langfuse {SDK.version} is outside {_sdk.SUPPORTED_RANGE}"


def test_every_attribute_the_sdk_propagates_crosses_the_broker() -> None:
    """celery-langfuse carries each ``propagate_attributes`` keyword of the installed
    SDK (not ``as_baggage``, which is how, not what); a new one fails here."""
    taken = set(inspect.signature(propagate_attributes).parameters) - {"as_baggage"}
    assert taken == set(SDK.propagated_arguments), (
        f"propagate_attributes takes {sorted(taken)}; celery-langfuse carries "
        f"{sorted(SDK.propagated_arguments)} (_sdk._PROPAGATED_SINCE)"
    )


def _every_propagated_argument() -> dict[str, Any]:
    """A value for each argument the installed SDK's ``propagate_attributes`` takes."""
    values: dict[str, Any] = {
        "user_id": "u",
        "session_id": "s",
        "tags": ["t"],
        "trace_name": "n",
        "version": "v7",
        "metadata": {"k": "v", "n": "12"},
        "environment": "staging",
        "prompt": {"name": "summarise", "version": 3},
        "skills_available": [{"name": "search", "version": 2}, {"name": "sql"}],
        "attach_skills": True,
    }
    return {name: value for name, value in values.items() if name in SDK.propagated_arguments}


def test_propagated_attributes_are_readable_from_the_context(
    langfuse_capture: CaptureServer,
) -> None:
    arguments = _every_propagated_argument()
    with get_client().start_as_current_observation(name="contract"):
        with propagate_attributes(**arguments):
            read = client.current_trace_attributes()
    # SDK 5 keeps metadata values JSON-encoded; SDK 4 as the strings they were set as.
    metadata = {"k": '"v"', "n": '"12"'} if SDK.metadata_values_are_json else {"k": "v", "n": "12"}
    expected = TraceAttributes(
        user_id="u",
        session_id="s",
        tags=("t",),
        trace_name="n",
        version="v7",
        metadata=metadata,
        environment=arguments.get("environment"),
        prompt_name="summarise" if "prompt" in arguments else None,
        prompt_version=3 if "prompt" in arguments else None,
        skills_available=(
            '[{"name":"search","version":2},{"name":"sql"}]'
            if "skills_available" in arguments
            else None
        ),
        attach_skills=True if "attach_skills" in arguments else None,
    )
    assert read == expected, (
        "langfuse.propagate_attributes no longer stores its values under "
        "'langfuse.propagated.<key>' as client.current_trace_attributes reads them"
    )


def test_reapplied_attributes_are_what_the_producer_propagated(
    langfuse_capture: CaptureServer,
) -> None:
    """Read in the producer, written to message headers, read back and re-applied in
    the worker: the SDK's span processor then copies the same attributes onto spans."""
    from langfuse._client.propagation import _get_propagated_attributes_from_context
    from opentelemetry import context as otel_context

    with propagate_attributes(**_every_propagated_argument()):
        producer = otel_context.get_current()
        message: dict[str, Any] = {}
        headers.inject(message, parent=None, attributes=client.current_trace_attributes())
    with client.propagated(headers.extract(message).attributes):
        worker = otel_context.get_current()
        assert client.current_trace_attributes() == client.current_trace_attributes(producer)
    sent = _get_propagated_attributes_from_context(producer)
    assert _get_propagated_attributes_from_context(worker) == sent
    assert len(sent) >= 7  # user, session, tags, trace name, version, 2 metadata keys


PLAIN_CASES = [
    {"trace_name": "tasks.report"},
    {"user_id": "u-1", "session_id": "s-1"},
    {"user_id": "u-1", "tags": ["a", "b", "a"], "version": "v7", "trace_name": "t"},
]


@pytest.mark.parametrize("arguments", PLAIN_CASES)
def test_plain_attributes_are_set_and_read_as_the_sdk_does_without_it(
    arguments: dict[str, Any],
) -> None:
    """The common attributes (a task's trace name, a request's user and session) are
    re-applied and read without importing the SDK (client._plain_context,
    spans.PLAIN_PROPAGATED): the context, and the span attributes read from it, are
    what the SDK's own functions make, with tags merged onto those already set."""
    from langfuse._client.propagation import _get_propagated_attributes_from_context
    from opentelemetry import context as otel_context

    from celery_langfuse import spans

    attributes = TraceAttributes(
        **{k: tuple(v) if k == "tags" else v for k, v in arguments.items()}
    )
    for outer in ({}, {"tags": ["outer"], "user_id": "outer-user"}):
        with propagate_attributes(**outer):
            with propagate_attributes(**arguments):
                by_sdk = otel_context.get_current()
            mine = client._plain_context(attributes)
        assert mine is not None, "plain attributes fell back to the SDK"
        keys = {key for key in {*by_sdk, *mine} if key.startswith("langfuse.propagated.")}
        assert {key: mine.get(key) for key in keys} == {key: by_sdk.get(key) for key in keys}
        assert spans._propagated_attributes(mine) == _get_propagated_attributes_from_context(
            by_sdk
        )


def test_other_attributes_are_left_to_the_sdk() -> None:
    """Metadata, environment, prompt, skills and too-long values are set by the SDK's
    own propagate_attributes (it validates and encodes them); the reader then calls the
    SDK's reader for any context holding them."""
    from langfuse._client.propagation import _get_propagated_attributes_from_context
    from opentelemetry import context as otel_context

    from celery_langfuse import spans

    for attributes in (
        TraceAttributes(trace_name="t", metadata={"k": "v"}),
        TraceAttributes(trace_name="t", environment="staging"),
        TraceAttributes(user_id="u" * 201),
        TraceAttributes(tags=("t" * 201,)),
    ):
        assert client._plain_context(attributes) is None, attributes
    with propagate_attributes(trace_name="t", metadata={"k": "v"}):
        ctx = otel_context.get_current()
        assert spans._propagated_attributes(ctx) == _get_propagated_attributes_from_context(ctx)
        assert "langfuse.trace.metadata.k" in spans._propagated_attributes(ctx)


def test_a_worker_starting_traces_never_imports_the_sdk(tmp_path: Any) -> None:
    """A worker whose tasks never use the SDK runs traced tasks that start their own
    trace (named after the task) without importing it: the SDK adds about 16 MB to a
    process (issue 21). In a fresh interpreter: a run of a task published with no trace,
    exported to a capture server, and `langfuse` still not in sys.modules."""
    from tests.conftest import REDIS_URL

    script = tmp_path / "worker_side.py"
    script.write_text(
        f"""
import os, sys, uuid
from celery_langfuse.testing import CaptureServer

with CaptureServer() as capture:
    os.environ.update(capture.env)
    from celery import Celery
    from celery_langfuse import client, install
    from celery.contrib.testing.worker import start_worker

    app = Celery("no_sdk", broker={REDIS_URL!r}, set_as_current=False)
    app.conf.task_default_queue = "no-sdk-" + uuid.uuid4().hex[:8]
    install(app)

    @app.task(name="no_sdk.work", shared=False)
    def work():
        return 1

    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING"):
        work.delay()
        capture.wait_for_observations(1, timeout=30, name="no_sdk.work")
    print("trace name:", capture.traces()[0].name)
    print("langfuse imported:", "langfuse" in sys.modules)
"""
    )
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, result.stderr
    assert "trace name: no_sdk.work" in result.stdout, result.stdout
    assert "langfuse imported: False" in result.stdout, result.stdout


def test_reapplied_metadata_is_not_encoded_twice(langfuse_capture: CaptureServer) -> None:
    langfuse_capture.clear()
    with get_client().start_as_current_observation(name="producer"):
        with propagate_attributes(metadata={"tenant": "acme"}):
            carried = client.current_trace_attributes()
    with client.propagated(carried):
        with get_client().start_as_current_observation(name="consumer") as consumer:
            pass
    client.flush(5)
    langfuse_capture.wait_for(lambda s: any(o.id == consumer.id for o in s.observations))
    observation = next(o for o in langfuse_capture.observations if o.id == consumer.id)
    expected = '"acme"' if SDK.metadata_values_are_json else "acme"
    assert observation.attributes["langfuse.trace.metadata.tenant"] == expected


def test_a_root_in_a_chosen_trace_has_no_parent_and_can_be_backdated(
    langfuse_capture_clean: CaptureServer,
) -> None:
    trace_id = "5f" * 16
    started = time.time_ns() - 2_000_000_000
    with client.root_observation(trace_id, name="root", start_time_ns=started) as root:
        with get_client().start_as_current_observation(name="child"):
            pass
    client.flush(5)
    langfuse_capture_clean.wait_for(lambda s: len(s.observations) == 2)
    trace = langfuse_capture_clean.trace(trace_id)
    exported = trace.find("root")
    assert exported.id == root.id
    assert exported.parent_id is None, (
        "the OTel SDK span no longer keeps its parent in `_parent`: client._make_root "
        "cannot drop the parent the Langfuse SDK invents for trace_context="
    )
    assert exported.duration >= 1.9, "the OTel SDK span no longer keeps `_start_time`"
    assert exported.attributes.get("langfuse.internal.as_root") is True
    assert trace.find("child").parent_id == root.id
    assert trace.orphans() == []


def test_whether_a_client_exists_is_known_without_creating_one(
    langfuse_capture: CaptureServer,
) -> None:
    get_client()
    assert client.sdk_client_exists(), (
        "LangfuseResourceManager._instances no longer lists the clients of the process"
    )


def test_every_client_of_the_process_is_listed_for_the_flush(
    langfuse_capture: CaptureServer,
) -> None:
    # In a fresh interpreter: a second client would make get_client() of this process
    # ambiguous (the SDK then returns a disabled client) for every later test.
    script = """
from langfuse import Langfuse, get_client
from celery_langfuse import client
default = get_client()
second = Langfuse(public_key="pk-lf-contract-second", secret_key="sk", base_url=BASE_URL)
managers = client.sdk_resource_managers()
assert {id(default._resources), id(second._resources)} <= {id(m) for m in managers}
assert all(callable(m.flush) and callable(m.shutdown) for m in managers)
"""
    finished = subprocess.run(
        [sys.executable, "-c", f"BASE_URL = {langfuse_capture.base_url!r}\n{script}"],
        env={**os.environ, **langfuse_capture.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 0, (
        "LangfuseResourceManager._instances no longer lists every client of the process:\n"
        + finished.stderr
    )


def test_spans_waiting_in_the_sdk_batch_processor_are_counted(
    langfuse_capture_clean: CaptureServer,
) -> None:
    langfuse_capture_clean.set_response(200, delay=2)  # the first batch holds the exporter
    with get_client().start_as_current_observation(name="sent first"):
        pass
    time.sleep(0.5)  # the SDK's export thread sent it and waits on the slow answer
    for n in range(3):
        with get_client().start_as_current_observation(name=f"waiting {n}"):
            pass
    waiting = client._queued_spans(get_client()._resources.tracer_provider)
    assert waiting is not None and waiting >= 3, (
        "the OTel SDK's TracerProvider._active_span_processor._span_processors or "
        "BatchSpanProcessor._batch_processor._queue moved: the flush warning cannot "
        "say how many observations it gave up on"
    )


def test_the_client_fields_celery_langfuse_reads_are_there(
    langfuse_capture: CaptureServer,
) -> None:
    """client._static_attributes and start_observation read these private fields of
    the client; spans.recorder_for reads the resource manager's."""
    sdk_client = get_client()
    for name in ("_environment", "_release", "_mask", "_otel_tracer", "_tracing_enabled"):
        assert hasattr(sdk_client, name), f"Langfuse() no longer has {name}"
    resources = sdk_client._resources
    fields = [
        "public_key",
        "secret_key",
        "base_url",
        "timeout",
        "flush_at",
        "flush_interval",
        "additional_headers",
        "span_exporter",
        "should_export_span",
        "sample_rate",
        "tracer_provider",
    ]
    if SDK.release >= (4, 12, 0):
        fields += ["id_generator", "mask_otel_spans"]
    if SDK.has_compression_setting:
        fields.append("otel_compression")
    if SDK.release >= (5, 2, 0):
        fields.append("skills")
    missing = [name for name in fields if not hasattr(resources, name)]
    assert missing == [], f"LangfuseResourceManager no longer has {missing}"


def test_the_sdk_marks_roots_with_the_attributes_celery_langfuse_writes() -> None:
    from langfuse._client.attributes import LangfuseOtelSpanAttributes as Attributes

    assert Attributes.AS_ROOT == client._AS_ROOT == "langfuse.internal.as_root"
    assert Attributes.IS_APP_ROOT == "langfuse.internal.is_app_root"
    assert Attributes.OBSERVATION_METADATA == client._METADATA
    assert Attributes.ENVIRONMENT == client._ENVIRONMENT


@pytest.mark.parametrize(
    ("version", "supported"),
    [("4.6.1", False), ("4.7.0", True), ("4.18.0", True), ("5.2.0", True), ("6.0.0", False)],
)
def test_the_supported_range_is_langfuse_4_7_up_to_6(version: str, supported: bool) -> None:
    assert _sdk.InstalledSdk(version, _sdk.parse_release(version)).supported is supported


def test_an_unsupported_sdk_is_refused_at_install_and_tasks_run_untraced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the installed SDK is supported, an unsupported one is faked (its version
    number only: install() decides from it alone); .ci/run also runs this test in a
    venv with a real langfuse 4.6.1."""
    from celery import Celery, signals

    from celery_langfuse import install
    from celery_langfuse._install import installation_for
    from celery_langfuse.config import ConfigurationError

    monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", "pk-lf-unsupported")
    monkeypatch.setenv("LANGFUSE_SECRET_KEY", "sk-lf-unsupported")
    found = _sdk.installed()
    if found.supported:
        found = _sdk.InstalledSdk("4.6.1", (4, 6, 1))
        monkeypatch.setattr(_sdk, "installed", lambda: found)
    app = Celery("unsupported-sdk", broker="memory://")
    app.conf.task_always_eager = True

    @app.task(name="unsupported.add")
    def add(x: int, y: int) -> int:
        return x + y

    receivers = len(signals.task_prerun.receivers)
    with pytest.raises(ConfigurationError) as refused:
        install(app)
    assert f"found langfuse {found.version}" in str(refused.value)
    assert "langfuse>=4.7,<6" in str(refused.value)
    assert installation_for(app) is None
    assert len(signals.task_prerun.receivers) == receivers  # nothing connected
    assert add.delay(2, 3).get(timeout=10) == 5


def test_doctor_names_the_sdk_version_and_the_server_it_needs(
    langfuse_capture: CaptureServer,
) -> None:
    from tests.test_cli import doctor

    output = doctor(langfuse_capture.env).stdout
    assert f"langfuse {SDK.version}: supported (langfuse>=4.7,<6)" in output
    assert f"needs server: {SDK.minimum_server}" in output
    assert ("v4.59.0" in output) == (SDK.major == 5)


def test_create_score_takes_environment_where_the_facts_say() -> None:
    from langfuse import Langfuse

    takes = "environment" in inspect.signature(Langfuse.create_score).parameters
    assert takes == SDK.score_takes_environment


def test_sdk_4_score_consumers_can_be_woken_to_send_now(
    langfuse_capture: CaptureServer,
) -> None:
    """SDK 5's flush wakes its score consumers; SDK 4's only waits for them, up to its
    flush interval. _sdk.wake_score_consumers hands each SDK 4 consumer the sentinel it
    takes as "send now", and the consumer goes on running."""
    sdk_client = get_client()
    resources = sdk_client._resources
    if SDK.major >= 5:
        assert all(hasattr(c, "wake") for c in resources._score_consumers)
        return
    consumers = resources._ingestion_consumers
    assert consumers and all(c.is_alive() for c in consumers)
    # As a worker with LANGFUSE_FLUSH_INTERVAL=30 would: the next batch waits 30 s.
    intervals = [c._flush_interval for c in consumers]
    for consumer in consumers:
        consumer._flush_interval = 30
    try:
        time.sleep(0.3)  # the batches started with the short interval have gone
        sdk_client.create_score(name="woken", value=1.0, trace_id="7a" * 16)
        _sdk.wake_score_consumers(resources)
        queue = resources._score_ingestion_queue
        deadline = time.monotonic() + 2
        while queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        assert queue.unfinished_tasks == 0, "the score waited for the flush interval"
        assert all(c.is_alive() for c in consumers)
    finally:
        for consumer, interval in zip(consumers, intervals):
            consumer._flush_interval = interval
        _sdk.wake_score_consumers(resources)
