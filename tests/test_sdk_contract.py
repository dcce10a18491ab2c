"""The few Langfuse SDK details celery-langfuse relies on. If the SDK changes one,
this fails first, with a message that says which."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from langfuse import get_client, propagate_attributes

from celery_langfuse import client
from celery_langfuse.headers import TraceAttributes
from celery_langfuse.testing import CaptureServer


def test_propagated_attributes_are_readable_from_the_context(
    langfuse_capture: CaptureServer,
) -> None:
    with get_client().start_as_current_observation(name="contract"), propagate_attributes(
        user_id="u",
        session_id="s",
        tags=["t"],
        trace_name="n",
        environment="staging",
        metadata={"k": "v"},
    ):
        read = client.current_trace_attributes()
    assert read == TraceAttributes(
        user_id="u",
        session_id="s",
        tags=("t",),
        trace_name="n",
        environment="staging",
        metadata={"k": '"v"'},
    ), "langfuse.propagate_attributes no longer stores its values under 'langfuse.propagated.<key>'"


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
    assert observation.attributes["langfuse.trace.metadata.tenant"] == '"acme"'


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
