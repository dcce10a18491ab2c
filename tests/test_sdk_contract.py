"""The few Langfuse SDK details celery-langfuse relies on. If the SDK changes one,
this fails first, with a message that says which."""

from __future__ import annotations

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
