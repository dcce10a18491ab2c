"""The lean observation path (celery_langfuse.spans, .otlp, .export) against what the
SDK would send: the same OTLP message, the same propagated attributes and app-root
marks, SDK calls on the current span still landing, media still handed to the SDK."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any

import pytest
from langfuse import get_client, propagate_attributes
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from celery_langfuse import client, otlp
from celery_langfuse.headers import TraceParent
from celery_langfuse.spans import LeanSpan
from celery_langfuse.testing import CaptureServer, SpanLink


@pytest.fixture
def capture(langfuse_capture_clean: CaptureServer) -> Iterator[CaptureServer]:
    yield langfuse_capture_clean


def exported(capture: CaptureServer, count: int) -> None:
    client.flush(10)
    capture.wait_for(lambda s: len(s.observations) >= count)


def test_the_session_client_records_lean_observations(capture: CaptureServer) -> None:
    observation = client.start_observation("contract")
    observation.end()
    assert isinstance(observation.span, LeanSpan), (
        "spans.recorder_for no longer recognises the SDK's default export setup "
        "(LangfuseResourceManager fields, or the tracer provider's processor list)"
    )


def test_an_encoded_span_is_the_message_the_otel_encoder_writes() -> None:
    context = SpanContext(0xABC << 64 | 7, 0x1234, False, TraceFlags(1))
    parent = SpanContext(0xABC << 64 | 7, 0x99, True, TraceFlags(1))
    linked = SpanContext(0xDEF << 64 | 9, 0x77, True, TraceFlags(1))  # another trace's span
    attributes = {
        "langfuse.observation.input": '{"args":[1,"é"],"kwargs":{}}',
        "count": -3,
        "ratio": 0.25,
        "flag": True,
        "tags": ("a", "b"),
    }
    events = [("exception", 5, {"exception.type": "ValueError"})]
    resource = Resource({"service.name": "worker", "langfuse.release": "r1"})
    scope = InstrumentationScope("langfuse-sdk", "5.0.4", None, {"public_key": "pk"})
    ours = otlp.encode_request(
        otlp.encode_scope(
            resource_attributes=dict(resource.attributes),
            scope_name=scope.name,
            scope_version=scope.version,
            scope_attributes=dict(scope.attributes),
        ),
        [
            otlp.encode_span(
                otlp.FinishedSpan(
                    trace_id=context.trace_id,
                    span_id=context.span_id,
                    parent_id=parent.span_id,
                    parent_is_remote=True,
                    name="run tasks.add",
                    start_ns=1_000,
                    end_ns=2_000,
                    attributes=attributes,
                    events=events,
                    status_code=otlp.STATUS_ERROR,
                    status_message="boom",
                    links=[(linked.trace_id, linked.span_id)],
                )
            )
        ],
    )
    sdk_span = ReadableSpan(
        name="run tasks.add",
        context=context,
        parent=parent,
        resource=resource,
        attributes=attributes,
        events=[Event(name, attrs, ts) for name, ts, attrs in events],
        kind=SpanKind.INTERNAL,
        instrumentation_scope=scope,
        status=Status(StatusCode.ERROR, "boom"),
        start_time=1_000,
        end_time=2_000,
        links=[Link(linked)],
    )
    decoded = ExportTraceServiceRequest.FromString(ours)
    assert decoded == encode_spans([sdk_span])
    (link,) = decoded.resource_spans[0].scope_spans[0].spans[0].links
    assert (link.trace_id.hex(), link.span_id.hex()) == (f"{linked.trace_id:032x}", "77".zfill(16))


def test_propagated_attributes_and_sdk_updates_land_on_a_lean_observation(
    capture: CaptureServer,
) -> None:
    with propagate_attributes(user_id="u-1", session_id="s-1", tags=["t"]):
        with client.root_observation("7e" * 16, name="run") as run:
            get_client().update_current_span(output={"answer": 42}, metadata={"step": "two"})
            with get_client().start_as_current_observation(name="child"):
                pass
    assert isinstance(run.span, LeanSpan)
    exported(capture, 2)
    trace = capture.trace("7e" * 16)
    root = trace.find("run")
    assert (root.user_id, root.session_id) == ("u-1", "s-1")
    assert root.output == {"answer": 42}
    assert root.metadata.get("step") == "two"
    assert trace.find("child").parent_id == root.id
    assert trace.orphans() == []


def test_the_run_is_the_app_root_unless_the_trace_is_claimed(capture: CaptureServer) -> None:
    with client.root_observation("6d" * 16, name="root"):
        with get_client().start_as_current_observation(name="inner"):
            pass
    exported(capture, 2)
    attributes = {o.name: o.attributes for o in capture.observations}
    assert attributes["root"].get("langfuse.internal.is_app_root") is True
    assert "langfuse.internal.is_app_root" not in attributes["inner"]


def test_observations_started_in_one_context_each_get_its_facts(capture: CaptureServer) -> None:
    # What a context holds (propagated attributes, the app-root claim, whether its span
    # is exported) is looked up once for several observations started in it, as a
    # producer publishing a batch of tasks from one request does; the answers must still
    # be the SDK's for each, including after the parent span has ended.
    from opentelemetry import baggage
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel_trace

    with propagate_attributes(user_id="u-2"):
        with get_client().start_as_current_observation(name="request") as request:
            ctx = otel_context.get_current()
            # the same span, without the app-root claim the SDK put in the baggage
            unclaimed = otel_trace.set_span_in_context(request._otel_span, ctx)
            unclaimed = baggage.remove_baggage("langfuse_trace_id", unclaimed)
            for name in ("first", "second"):
                client.start_observation(name, context=ctx).end()
                client.start_observation(f"{name}, unclaimed", context=unclaimed).end()
        for label, context in (("", ctx), (", unclaimed", unclaimed)):
            client.start_observation(f"ours, parent ended{label}", context=context).end()
            token = otel_context.attach(context)
            try:
                get_client().start_observation(name=f"SDK's, parent ended{label}").end()
            finally:
                otel_context.detach(token)
    exported(capture, 9)
    trace = capture.trace(request.trace_id)
    roots = {
        o.name for o in trace.observations if o.attributes.get("langfuse.internal.is_app_root")
    }
    for observation in trace.observations:
        assert observation.user_id == "u-2"
        if observation.name != "request":
            assert observation.parent_id == request.id
    assert "request" in roots
    assert not {"first", "second", "first, unclaimed", "second, unclaimed"} & roots
    for label in ("", ", unclaimed"):
        ours, sdks = f"ours, parent ended{label}", f"SDK's, parent ended{label}"
        assert (ours in roots) == (sdks in roots), label
    assert "ours, parent ended, unclaimed" in roots  # the case the SDK's rule turns on


def test_an_observation_carrying_media_is_handed_to_the_sdk(capture: CaptureServer) -> None:
    image = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(64)).decode()
    observation = client.start_observation("with media", input={"image": image})
    observation.end()
    exported(capture, 1)
    (received,) = capture.observations
    assert "base64," not in str(received.input)
    assert "@@@langfuseMedia" in str(received.input)


def test_a_linked_root_handed_to_the_sdk_for_its_media_keeps_its_link(
    capture: CaptureServer,
) -> None:
    image = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(64)).decode()
    caller = TraceParent("ca" * 16, "fe" * 8)
    observation = client.start_observation(
        "linked root", input={"image": image}, root_of="5e" * 16, link=caller
    )
    observation.end()
    assert isinstance(observation.span, LeanSpan)
    exported(capture, 1)
    (received,) = capture.observations
    assert "@@@langfuseMedia" in str(received.input)  # the SDK's processor sent it
    assert (received.trace_id, received.parent_id) == ("5e" * 16, None)
    assert received.links == [SpanLink("ca" * 16, "fe" * 8)]


def test_the_sdk_span_path_still_makes_parentless_roots(
    capture: CaptureServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the lean path is not used (a custom exporter, filter, sampler...), a root
    in a chosen trace is an SDK span whose invented parent is dropped."""
    monkeypatch.setattr(client, "_recorders", (get_client(), None))
    started = time.time_ns() - 2_000_000_000
    with client.root_observation("5f" * 16, name="root", start_time_ns=started) as root:
        pass
    assert not isinstance(root.span, LeanSpan)
    exported(capture, 1)
    received = capture.trace("5f" * 16).find("root")
    assert received.parent_id is None, (
        "the OTel SDK span no longer keeps its parent in `_parent`: client._make_root "
        "cannot drop the parent the Langfuse SDK invents for trace_context="
    )
    assert received.duration >= 1.9


def test_the_sdk_span_path_writes_no_metadata_key_for_none(
    capture: CaptureServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the SDK (and the lean path) do: a None value is no key, where an attribute
    without a value would reach Langfuse as ``{}``."""
    monkeypatch.setattr(client, "_recorders", (client.get_langfuse(), None))
    observation = client.start_observation("run", metadata={"queue": None, "task_id": "t-1"})
    observation.end()
    assert not isinstance(observation.span, LeanSpan)
    exported(capture, 1)
    (received,) = capture.observations
    assert received.metadata == {"task_id": "t-1"}
    assert "langfuse.observation.metadata.queue" not in received.attributes


def test_names_copied_from_the_sdk_still_match_it() -> None:
    """spans.py keeps a few SDK names so that a worker need not import the SDK."""
    from langfuse._client import constants, propagation
    from langfuse._utils.environment import common_release_envs

    from celery_langfuse import spans

    assert spans._BAGGAGE_PREFIX == propagation.LANGFUSE_BAGGAGE_PREFIX
    assert spans._APP_ROOT_CLAIM == propagation.LANGFUSE_TRACE_ID_BAGGAGE_KEY
    assert tuple(common_release_envs) == spans._COMMON_RELEASE_VARIABLES
    assert spans._LANGFUSE_TRACER_NAME == constants.LANGFUSE_TRACER_NAME


def run_script(script: str, env: dict[str, str], *args: str) -> str:
    """Run ``script`` in a fresh interpreter with this checkout's src on the path and
    ``env`` as its environment; its stdout, once it exited 0."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parent.parent / "src"
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        env={**env, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


_STANDALONE_THEN_SDK = """
import sys
from celery import Celery
from celery_langfuse import client, install

install(Celery("standalone", broker="memory://"))
lean = client.start_observation("lean", metadata={"k": "v"})
lean.end()
print(type(lean.span).__name__, "langfuse" in sys.modules)
assert client.flush(10)
import langfuse

sdk = langfuse.get_client()
sdk.start_observation(name="sdk").end()
sdk.flush()
"""


def test_without_a_client_lean_spans_go_where_and_as_the_sdk_would_send_them(
    capture: CaptureServer,
) -> None:
    """A process with no Langfuse client sends lean spans configured from LANGFUSE_*
    (no SDK import); Langfuse sees them as it sees the SDK's own spans."""
    import os

    env = {
        **os.environ,
        **capture.env,
        "LANGFUSE_TRACING_ENVIRONMENT": "staging",
        "LANGFUSE_RELEASE": "r-7",
    }
    assert run_script(_STANDALONE_THEN_SDK, env).split() == ["LeanSpan", "False"]
    capture.wait_for(lambda s: {"lean", "sdk"} <= {o.name for o in s.observations})
    lean, sdk = (next(o for o in capture.observations if o.name == n) for n in ("lean", "sdk"))
    assert lean.scope == sdk.scope == "langfuse-sdk"
    assert lean.resource == sdk.resource
    assert (lean.environment, sdk.environment) == ("staging", "staging")
    assert lean.attributes["langfuse.release"] == sdk.attributes["langfuse.release"] == "r-7"
    assert lean.metadata == {"k": "v"}


@pytest.mark.parametrize("producer", ["langfuse", "w3c", "w3c-unsampled"])
def test_a_run_under_a_remote_parent_is_marked_as_the_sdk_would_mark_it(
    capture: CaptureServer, producer: str
) -> None:
    # A run continuing a message is started under the remote parent directly, without
    # making its context: the parent, trace, app-root mark and sampling must be what
    # starting it in that context gives. A Langfuse-aware producer claimed the trace's
    # app root; a plain W3C producer did not, so the run is the first span Langfuse
    # sees of it, its app root.
    from celery import Celery

    from celery_langfuse import uninstall
    from tests.test_hot_path_budget import Harness

    harness = Harness(Celery("remote-parent"))
    try:
        trace_id, parent_id = "5c" * 16, "6d" * 8
        if producer == "langfuse":
            with get_client().start_as_current_observation(name="request") as request:
                message = harness.publish()
            trace_id = request.trace_id
            parent_id = message["x-langfuse-parent-id"]
        else:
            flags = "00" if producer == "w3c-unsampled" else "01"
            message = {"traceparent": f"00-{trace_id}-{parent_id}-{flags}"}
        harness.run(message)()
        client.flush(10)
        if producer == "w3c-unsampled":
            time.sleep(0.5)
            assert [o for o in capture.observations if o.name == "budget.noop"] == []
            return
        capture.wait_for(lambda s: any(o.name == "budget.noop" for o in s.observations))
        (run,) = [o for o in capture.observations if o.name == "budget.noop"]
        assert (run.trace_id, run.parent_id) == (trace_id, parent_id)
        marked = run.attributes.get("langfuse.internal.is_app_root") is True
        assert marked == (producer == "w3c")
    finally:
        uninstall(harness.app)


@pytest.mark.parametrize("sampled", [True, False])
def test_a_span_under_a_remote_parent_has_the_contexts_an_sdk_span_would(
    capture: CaptureServer, sampled: bool
) -> None:
    # A lean span makes its own span context and its parent's only when asked for:
    # they must be what the SDK's span started in the parent's context reports.
    from celery_langfuse.headers import TraceParent

    remote = TraceParent("7e" * 16, "8f" * 8, sampled=sampled, from_langfuse=True)
    lean = client.start_observation("lean", parent=remote)
    sdk = get_client()._otel_tracer.start_span("sdk", context=remote.context())
    try:
        lean_context, sdk_context = lean.span.get_span_context(), sdk.get_span_context()
        assert lean_context.trace_id == sdk_context.trace_id == int("7e" * 16, 16)
        assert (lean_context.is_remote, lean_context.trace_flags) == (
            sdk_context.is_remote,
            sdk_context.trace_flags,
        )
        assert lean.span.is_recording() == sdk.is_recording() == sampled
        if sampled:
            assert isinstance(lean.span, LeanSpan)
            assert lean.span.parent == sdk.parent == remote.span_context()
            assert lean.span.get_span_context() is lean_context  # made once
    finally:
        lean.end()
        sdk.end()


def test_recurring_short_attributes_encode_the_same_from_the_cache() -> None:
    # Short strings and booleans are encoded once and reused: a value of another type
    # that compares equal (1 == True) must still be encoded as itself.
    from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans

    def decoded(value: object) -> object:
        span = otlp.FinishedSpan(1, 2, None, False, "s", 1, 2, {"key": value})
        (message,) = ScopeSpans.FromString(otlp.encode_span(span)).spans
        any_value = message.attributes[0].value
        return getattr(any_value, any_value.WhichOneof("value"))

    for value in (True, 1, "True", True, 1, "x" * 41, "x" * 40, False, 0, "True"):
        assert decoded(value) == value
        assert type(decoded(value)) is type(value)


_SAME_OBSERVATION_BOTH_WAYS = """
import json, langfuse
from celery_langfuse import client

META = {"task_id": "t-1", "count": 3, "ratio": 0.5, "ok": True, "text": "é", "nested": {"a": [1]}}
lean = client.start_observation("obs", input={"args": [1, "é"]}, metadata=META)
lean.update(output={"answer": 42}, metadata=META, level="WARNING", status_message="slow")
lean.end()
assert client.flush(10)
sdk = langfuse.get_client()
print(type(client.start_observation("probe").span).__name__)
with_sdk = sdk.start_observation(name="obs", input={"args": [1, "é"]}, metadata=META)
with_sdk.update(output={"answer": 42}, metadata=META, level="WARNING", status_message="slow")
with_sdk.end()
sdk.flush()
"""


def test_a_lean_observation_is_sent_as_the_installed_sdk_sends_its_own() -> None:
    """The same observation, recorded by this library's lean path and by the installed
    SDK (its own exporter): the same request headers and compression (SDK 5 gzips and
    sends ``x-langfuse-ingestion-version: 4``, SDK 4 neither), and attributes that
    are the SDK's: metadata one attribute a key, each value encoded exactly as the SDK's
    encoder writes it (the lean span keeps it as a dict until the export thread writes
    it), input and output the same JSON."""
    import json
    import os
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from celery_langfuse import _sdk
    from celery_langfuse.testing import PUBLIC_KEY, SECRET_KEY

    received: list[tuple[dict[str, str], bytes]] = []

    class Recorder(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LANGFUSE_", "OTEL_"))},
        "LANGFUSE_PUBLIC_KEY": PUBLIC_KEY,
        "LANGFUSE_SECRET_KEY": SECRET_KEY,
        "LANGFUSE_BASE_URL": f"http://127.0.0.1:{server.server_port}",
        "LANGFUSE_TRACING_ENVIRONMENT": "staging",
        "LANGFUSE_RELEASE": "r-9",
        "LANGFUSE_MEDIA_UPLOAD_ENABLED": "false",
    }
    try:
        printed = run_script(_SAME_OBSERVATION_BOTH_WAYS, env)
    finally:
        server.shutdown()
    assert printed.split() == ["LeanSpan"]

    traces = [(h, b) for h, b in received if h.get("content-type") == "application/x-protobuf"]
    # Both are named "obs": the lean one was sent (flushed) first.
    lean_headers, lean = _span_named(traces, "obs", 0)
    sdk_headers, sdk = _span_named(traces, "obs", 1)

    sdk_facts = _sdk.installed()
    for name in (
        "x-langfuse-ingestion-version",
        "content-encoding",
        "x-langfuse-sdk-version",
        "x-langfuse-sdk-name",
        "x-langfuse-public-key",
        "authorization",
    ):
        assert lean_headers.get(name) == sdk_headers.get(name), name
    assert sdk_headers.get("x-langfuse-ingestion-version") == sdk_facts.ingestion_version
    assert (sdk_headers.get("content-encoding") == "gzip") == sdk_facts.gzip_by_default

    ours, theirs = _attributes(lean), _attributes(sdk)
    for key in ("langfuse.observation.input", "langfuse.observation.output"):
        assert json.loads(ours.pop(key)) == json.loads(theirs.pop(key)), key
    # Metadata (given at the start and in the update) one attribute a key, each value
    # exactly as the installed SDK encodes it: everything else is the same too.
    assert "langfuse.observation.metadata" not in ours
    assert ours == theirs


def _span_named(traces: list[tuple[dict[str, str], bytes]], name: str, index: int) -> Any:
    import gzip

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    found = []
    for request_headers, body in traces:
        if request_headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        for resource in ExportTraceServiceRequest.FromString(body).resource_spans:
            for scope in resource.scope_spans:
                found += [(request_headers, s) for s in scope.spans if s.name == name]
    return found[index]


def _attributes(span: Any) -> dict[str, Any]:
    def value(any_value: Any) -> Any:
        kind = any_value.WhichOneof("value")
        return getattr(any_value, kind) if kind else None

    return {kv.key: value(kv.value) for kv in span.attributes}


_CUSTOM_FILTER_AND_EXPORTER = """
import sys
import langfuse
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from celery_langfuse import client

kind = sys.argv[1]
if kind == "filter":
    langfuse.Langfuse(should_export_span=lambda span: span.name != "hidden")
else:
    exporter = InMemorySpanExporter()
    langfuse.Langfuse(span_exporter=exporter)
observations = [client.start_observation(name) for name in ("hidden", "shown")]
for observation in observations:
    observation.end()
print(*sorted({type(o.span).__name__ for o in observations}))
assert client.flush(10)
if kind == "exporter":
    print(*sorted(span.name for span in exporter.get_finished_spans()))
"""


@pytest.mark.parametrize("kind", ["filter", "exporter"])
def test_a_custom_span_filter_or_exporter_keeps_the_sdk_span_path(
    capture: CaptureServer, kind: str
) -> None:
    """With the user's own span filter or exporter on the client (any supported SDK
    version), this library's observations are the SDK's spans and go through them."""
    import os

    printed = run_script(_CUSTOM_FILTER_AND_EXPORTER, {**os.environ, **capture.env}, kind)
    lines = printed.splitlines()
    assert lines[0] == "_Span"  # the OTel SDK's span class, not LeanSpan
    if kind == "exporter":
        assert lines[1] == "hidden shown"
        time.sleep(0.5)
        assert capture.observations == []  # the user's exporter took them instead
    else:
        capture.wait_for(lambda s: any(o.name == "shown" for o in s.observations))
        time.sleep(0.3)
        assert [o.name for o in capture.observations] == ["shown"]
