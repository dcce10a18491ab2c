"""Limits on what any sender's trace headers can make a trace carry, and untrusted
headers read tolerantly: the wire format (``celery_langfuse.headers``) on its own,
then through a real FastAPI app under uvicorn."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
from hypothesis import given, settings

from celery_langfuse import headers
from celery_langfuse.headers import TraceAttributes
from celery_langfuse.testing import CaptureServer
from tests.test_bad_input import any_headers
from tests.test_trust_web import identify, request_observation, serve


def test_more_tags_and_metadata_keys_than_the_limit_are_cut_and_reported() -> None:
    received = headers.extract(
        {
            headers.TAGS: json.dumps([f"t{i}" for i in range(500)]),
            headers.METADATA: json.dumps({f"k{i}": "v" for i in range(500)}),
        }
    )

    assert received.attributes.tags == tuple(f"t{i}" for i in range(headers.MAX_TAGS))
    assert list(received.attributes.metadata) == [f"k{i}" for i in range(headers.MAX_METADATA_KEYS)]
    assert set(received.malformed) == {headers.TAGS, headers.METADATA}


def test_what_is_written_is_cut_to_the_limits_too() -> None:
    out: dict[str, Any] = {}
    many = TraceAttributes(
        tags=tuple(f"t{i}" for i in range(80)), metadata={f"k{i}": "v" for i in range(80)}
    )
    headers.inject(out, parent=None, attributes=many)

    assert len(json.loads(out[headers.TAGS])) == headers.MAX_TAGS
    assert len(json.loads(out[headers.METADATA])) == headers.MAX_METADATA_KEYS
    assert headers.extract(out).malformed == ()


@given(any_headers)
@settings(max_examples=300, deadline=None)
def test_untrusted_extract_never_raises_and_keeps_no_identity(
    message_headers: dict[str, Any],
) -> None:
    extracted = headers.extract(message_headers, trusted=False)

    assert extracted.attributes == TraceAttributes()
    if extracted.parent is not None:  # only ever a W3C parent
        assert message_headers.get(headers.TRACE_ID) is None
        assert message_headers.get(headers.PARENT_ID) is None
        assert not extracted.parent.from_langfuse
    if extracted.distrusted is not None:
        claimed = (extracted.distrusted.claimed_trace_id, extracted.distrusted.claimed_parent_id)
        assert all(c is None or c.isalnum() for c in claimed)
        assert set(extracted.distrusted.ignored) <= set(message_headers)


def test_identify_cannot_exceed_the_limits_either(capture: CaptureServer) -> None:
    def many_tags(request: Any) -> TraceAttributes:
        return TraceAttributes(
            user_id="u-1",
            tags=tuple(f"t{i}" for i in range(300)),
            metadata={f"k{i}": "v" for i in range(300)},
        )

    item = uuid.uuid4().hex[:12]
    with serve("asgi", identify=many_tags) as url:
        httpx.get(f"{url}/items/{item}", timeout=10)

    request, trace = request_observation(capture, item)
    assert len(request.tags) == headers.MAX_TAGS
    # identify's trace metadata, as the request carries it (the trace's metadata also
    # holds the root observation's own keys, as Langfuse merges them)
    assert len(request.trace_metadata) == headers.MAX_METADATA_KEYS
    assert set(request.trace_metadata) <= set(trace.metadata)


def test_malformed_claimed_ids_are_ignored_and_the_request_served(capture: CaptureServer) -> None:
    item = uuid.uuid4().hex[:12]
    with serve("asgi", identify=identify) as url:
        response = httpx.get(
            f"{url}/items/{item}",
            headers={
                "x-langfuse-trace-id": "z" * 5000,
                "x-langfuse-parent-id": "not-an-id",
                "x-langfuse-tags": "[" * 5000,
                "x-langfuse-metadata": '{"a": {"b": {"c": 1}}}',
            },
            timeout=10,
        )
    assert response.status_code == 200

    request, _ = request_observation(capture, item)
    assert request.parent_id is None
    assert "claimed_trace_id" not in request.metadata
    assert "claimed_parent_id" not in request.metadata
    assert request.metadata["ignored_trace_headers"] == [
        "x-langfuse-trace-id",
        "x-langfuse-parent-id",
        "x-langfuse-tags",
        "x-langfuse-metadata",
    ]
