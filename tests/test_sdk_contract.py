"""The few Langfuse SDK details celery-langfuse relies on. If the SDK changes one,
this fails first, with a message that says which."""

from __future__ import annotations

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
