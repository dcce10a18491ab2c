"""The wire format: what a producer writes, a consumer reads back; bad input is dropped."""

from __future__ import annotations

import json

import pytest

from celery_langfuse import headers
from celery_langfuse.headers import TraceAttributes, TraceParent

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SPAN_ID = "b7ad6b7169203331"


def test_round_trip_carries_parent_and_every_trace_attribute() -> None:
    out: dict[str, object] = {}
    attributes = TraceAttributes(
        user_id="user-1",
        session_id="session-1",
        tags=("a", "b"),
        trace_name="checkout",
        environment="staging",
        metadata={"tenant": '"acme"'},
        version="v7",
        prompt_name="summarise",
        prompt_version=3,
        skills_available='[{"name":"search","version":2}]',
        attach_skills=False,
    )
    headers.inject(out, parent=TraceParent(TRACE_ID, SPAN_ID), attributes=attributes)

    assert out["traceparent"] == f"00-{TRACE_ID}-{SPAN_ID}-01"
    back = headers.extract(out)
    assert back.parent == TraceParent(TRACE_ID, SPAN_ID, sampled=True, from_langfuse=True)
    assert back.attributes == attributes
    assert back.published_at is not None


@pytest.mark.parametrize(
    ("bad", "dropped"),
    [
        ({headers.PROMPT_NAME: "p", headers.PROMPT_VERSION: "three"}, headers.PROMPT_VERSION),
        ({headers.PROMPT_NAME: "p"}, headers.PROMPT_NAME),
        ({headers.PROMPT_VERSION: "3"}, headers.PROMPT_VERSION),
        ({headers.SKILLS_AVAILABLE: '[{"version": 1}]'}, headers.SKILLS_AVAILABLE),
        ({headers.SKILLS_AVAILABLE: "[[["}, headers.SKILLS_AVAILABLE),
        ({headers.ATTACH_SKILLS: "yes"}, headers.ATTACH_SKILLS),
        ({headers.VERSION: "v" * 201}, headers.VERSION),
    ],
)
def test_bad_propagated_prompt_skills_and_version_headers_are_dropped(
    bad: dict[str, str], dropped: str
) -> None:
    extracted = headers.extract({headers.USER_ID: "u", **bad})
    assert extracted.attributes == TraceAttributes(user_id="u")
    assert dropped in extracted.malformed


def test_headers_set_by_others_are_kept() -> None:
    out: dict[str, object] = {"x-request-id": "abc", "priority": 3}
    headers.inject(out, parent=TraceParent(TRACE_ID, SPAN_ID), attributes=TraceAttributes())
    assert out["x-request-id"] == "abc"
    assert out["priority"] == 3


def test_plain_w3c_traceparent_is_continued() -> None:
    parent = headers.extract({"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-00"}).parent
    assert parent == TraceParent(TRACE_ID, SPAN_ID, sampled=False, from_langfuse=False)


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        "",
        f"00-{TRACE_ID}-{SPAN_ID}",
        f"00-{'0' * 32}-{SPAN_ID}-01",
        f"00-{TRACE_ID}-{'0' * 16}-01",
        f"ff-{TRACE_ID}-{SPAN_ID}-01",
        f"00-{TRACE_ID.upper()}x-{SPAN_ID}-01",
        "00-" + "a" * 10_000,
        12345,
        None,
        ["00", TRACE_ID],
    ],
)
def test_malformed_traceparent_means_no_parent(value: object) -> None:
    assert headers.extract({"traceparent": value}).parent is None


@pytest.mark.parametrize(
    ("trace_id", "parent_id"),
    [
        ("not-hex" * 5, SPAN_ID),
        (TRACE_ID, "zz" * 8),
        ("0" * 32, SPAN_ID),
        (TRACE_ID[:-1], SPAN_ID),
        (1, 2),
    ],
)
def test_malformed_langfuse_ids_fall_back_to_traceparent(
    trace_id: object, parent_id: object
) -> None:
    other_span = "1" * 16
    extracted = headers.extract(
        {
            "x-langfuse-trace-id": trace_id,
            "x-langfuse-parent-id": parent_id,
            "traceparent": f"00-{TRACE_ID}-{other_span}-01",
        }
    )
    assert extracted.parent == TraceParent(TRACE_ID, other_span)


def test_langfuse_ids_win_over_a_traceparent_rewritten_by_another_library() -> None:
    extracted = headers.extract(
        {
            "x-langfuse-trace-id": TRACE_ID,
            "x-langfuse-parent-id": SPAN_ID,
            "traceparent": f"00-{'1' * 32}-{'2' * 16}-01",
        }
    )
    assert extracted.parent == TraceParent(TRACE_ID, SPAN_ID, from_langfuse=True)


def test_oversized_and_mistyped_attributes_are_dropped() -> None:
    extracted = headers.extract(
        {
            "x-langfuse-user-id": "u" * 201,
            "x-langfuse-session-id": {"not": "a string"},
            "x-langfuse-tags": json.dumps(["ok", 5, "x" * 500]),
            "x-langfuse-trace-name": "caf\u00e9",
            "x-langfuse-environment": "Production!",
            "x-langfuse-metadata": "{not json",
            "x-langfuse-published-at": "nan",
        }
    )
    assert extracted.attributes == TraceAttributes(tags=("ok",))
    assert extracted.published_at is None


def test_deeply_nested_json_header_is_dropped() -> None:
    assert headers.extract({"x-langfuse-tags": "[" * 5_000}).attributes.tags == ()


def test_json_headers_nest_at_most_32_deep_and_brackets_in_strings_do_not_count() -> None:
    """Dropped before parsing: the parser would recurse near the interpreter's limit."""

    def tags(value: str) -> tuple[str, ...]:
        return headers.extract({"x-langfuse-tags": value}).attributes.tags

    assert tags('["ok", ' + "[" * 31 + "]" * 31 + "]") == ("ok",)  # 32 deep
    assert tags('["ok", ' + "[" * 32 + "]" * 32 + "]") == ()  # 33 deep
    text = "[" * 60 + "{" * 60 + '\\"]'  # brackets, an escaped quote, in a string
    shallow = json.dumps({"k": text, "n": [[1]] * 40})
    assert headers.extract({"x-langfuse-metadata": shallow}).attributes.metadata == {"k": text}


def test_environment_reserved_prefix_is_rejected() -> None:
    assert (
        headers.extract({"x-langfuse-environment": "langfuse-internal"}).attributes.environment
        is None
    )
    assert (
        headers.extract({"x-langfuse-environment": "prod-eu_1"}).attributes.environment
        == "prod-eu_1"
    )


def test_a_sampled_out_trace_says_so_in_both_views() -> None:
    out: dict[str, object] = {}
    headers.inject(
        out, parent=TraceParent(TRACE_ID, SPAN_ID, sampled=False), attributes=TraceAttributes()
    )
    assert out["traceparent"] == f"00-{TRACE_ID}-{SPAN_ID}-00"
    assert out["x-langfuse-sampled"] == "0"
    back = headers.extract(out)
    assert back.parent == TraceParent(TRACE_ID, SPAN_ID, sampled=False, from_langfuse=True)

    # a retry of that message, published in a sampled trace, must not stay "sampled out"
    headers.inject(
        out, parent=TraceParent(TRACE_ID, SPAN_ID, sampled=True), attributes=TraceAttributes()
    )
    assert "x-langfuse-sampled" not in out
    assert headers.extract(out).parent == TraceParent(TRACE_ID, SPAN_ID, True, True)


def test_the_sampled_flag_survives_without_a_traceparent() -> None:
    # another global propagator (B3, say) writes no traceparent: our header still tells
    out = {
        "x-langfuse-trace-id": TRACE_ID,
        "x-langfuse-parent-id": SPAN_ID,
        "x-langfuse-sampled": "0",
    }
    parent = headers.extract(out).parent
    assert parent is not None and parent.sampled is False


OTHER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize("sampled", [True, False])
@pytest.mark.parametrize("from_langfuse", [True, False])
@pytest.mark.parametrize(
    "entries",
    [
        {},
        {"langfuse_trace_id": TRACE_ID},
        {"langfuse_trace_id": OTHER_TRACE_ID},
        {"langfuse_trace_id": "Not A Hex Id, Say"},
        {"langfuse_trace_id": TRACE_ID, "tenant": "acme corp;x=1"},
        {"langfuse_user_id": "user 1"},
    ],
    ids=["none", "claim", "other-claim", "odd-claim", "claim+entry", "entry"],
)
def test_w3c_headers_are_what_the_global_propagator_writes(
    entries: dict[str, str], from_langfuse: bool, sampled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # inject() writes traceparent and baggage itself in the usual case (the default
    # propagator, no baggage but the app-root claim); the strings must be the ones
    # OTel's propagator would write, whatever the context carries.
    from opentelemetry import baggage, propagate
    from opentelemetry import context as otel_context

    ctx = otel_context.get_current()
    for key, value in entries.items():
        ctx = baggage.set_baggage(key, value, context=ctx)
    parent = TraceParent(TRACE_ID, SPAN_ID, sampled=sampled, from_langfuse=from_langfuse)
    generic: list[None] = []
    real_inject = propagate.inject
    monkeypatch.setattr(propagate, "inject", lambda *a, **k: generic.append(real_inject(*a, **k)))
    token = otel_context.attach(ctx)
    try:
        ours: dict[str, object] = {}
        headers.inject(ours, parent=parent, attributes=TraceAttributes())
        # the generic path only where the context holds more than a well-formed claim
        odd_claim = not from_langfuse and "Not A Hex" in str(entries)
        assert bool(generic) == bool(set(entries) - {"langfuse_trace_id"} or odd_claim)
        theirs: dict[str, object] = {}
        real_inject(theirs, context=parent.context())
    finally:
        otel_context.detach(token)
    assert {k: v for k, v in ours.items() if not k.startswith("x-langfuse-")} == theirs


def test_another_global_propagator_writes_its_own_headers() -> None:
    from opentelemetry import propagate
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    class Marked(TraceContextTextMapPropagator):
        def inject(self, carrier, context=None, setter=None):  # type: ignore[no-untyped-def]
            super().inject(carrier, context)
            carrier["x-marked"] = "1"

    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(Marked())
    try:
        out: dict[str, object] = {}
        headers.inject(out, parent=TraceParent(TRACE_ID, SPAN_ID), attributes=TraceAttributes())
    finally:
        propagate.set_global_textmap(previous)
    assert out["x-marked"] == "1"
    assert out["traceparent"] == f"00-{TRACE_ID}-{SPAN_ID}-01"
    assert "baggage" not in out
