"""Canvas at scale on a real prefork worker: a group of 1,000 tasks and a chord of
1,000 header tasks make one trace each, with no orphans and the chord callback under
the header run that completed the chord; with the guard (``max_trace_observations``)
a big group and a big chord published from a task are cut into linked traces.

Real Redis (broker and result backend), ``celery worker -P prefork -c 2``, the capture
server. Slow by nature (a few thousand messages and observations): about a minute.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import chord, group
from langfuse import get_client

from celery_langfuse.testing import CaptureServer, SpanLink
from tests.conftest import flush_in_process, worker_process
from tests.support.installed import support_app

pytestmark = pytest.mark.timeout(600)

N = 1000
PREFIX = "tests.support.fanout_app."
LEAF, TOTAL, FAN_OUT_GROUP, FAN_OUT_CHORD = (
    PREFIX + n for n in ("leaf", "total", "fan_out_group", "fan_out_chord")
)


@pytest.fixture
def fanout(capture: CaptureServer) -> Iterator[Any]:
    with support_app("fanout_app") as module:
        yield module


def count(server: CaptureServer, name: str) -> int:
    return len([o for o in server.observations if o.name == name])


def start(capture: CaptureServer, tmp_path: Path, env: dict[str, str] | None = None) -> Any:
    return worker_process(
        capture.env, "-P", "prefork", "-c", "2", env=env, tmp_path=tmp_path,
        module="tests.support.fanout_app", ready_timeout=60,
    )


def test_a_group_of_1000_is_one_trace_without_orphans(
    fanout: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    with start(capture, tmp_path) as worker:
        with get_client().start_as_current_observation(name="request") as request:
            group(fanout.leaf.s(i).set(queue=worker.queue) for i in range(N)).apply_async()
        flush_in_process()
        capture.wait_for(lambda s: count(s, LEAF) >= N, timeout=300)
    flush_in_process()

    trace = capture.trace(request.trace_id)
    assert len(trace.find_all(f"publish {LEAF}")) == N
    assert len(trace.find_all(LEAF)) == N
    assert len(trace.observations) == 1 + 2 * N
    assert trace.orphans() == []
    assert len(capture.traces()) == 1
    print(f"\ngroup of {N}: 1 trace, {len(trace.observations)} observations, 0 orphans")


def test_a_chord_of_1000_is_one_trace_with_the_callback_under_the_last_header(
    fanout: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    with start(capture, tmp_path) as worker:
        with get_client().start_as_current_observation(name="request") as request:
            result = chord(fanout.leaf.s(i).set(queue=worker.queue) for i in range(N))(
                fanout.total.s().set(queue=worker.queue)
            )
        assert result.get(timeout=300) == sum(range(N))
        capture.wait_for(lambda s: count(s, TOTAL) >= 1 and count(s, LEAF) >= N, timeout=60)
    flush_in_process()

    trace = capture.trace(request.trace_id)
    assert len(trace.find_all(LEAF)) == N
    callback = trace.find(TOTAL)
    by_id = {o.id: o for o in trace.observations}
    callback_publish = by_id[callback.parent_id or ""]
    assert callback_publish.name == f"publish {TOTAL}"
    completing_header = by_id[callback_publish.parent_id or ""]
    assert completing_header.name == LEAF  # the header run that completed the chord
    assert callback.output == sum(range(N))
    assert trace.orphans() == []
    assert len(trace.observations) == 1 + 2 * N + 2
    print(
        f"\nchord of {N}: 1 trace, {len(trace.observations)} observations, 0 orphans, "
        "callback under the completing header run"
    )


def test_past_the_guard_a_group_published_by_a_task_is_cut_into_linked_traces(
    fanout: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    limit = 100
    env = {"CELERY_LANGFUSE_MAX_TRACE_OBSERVATIONS": str(limit)}
    with start(capture, tmp_path, env) as worker:
        with get_client().start_as_current_observation(name="request") as request:
            fanout.fan_out_group.apply_async((N,), queue=worker.queue)
        capture.wait_for(lambda s: count(s, LEAF) >= N, timeout=300)
    flush_in_process()

    parent = capture.trace(request.trace_id)
    # In the process that ran fan_out_group: its run and limit - 1 publishes fit.
    kept_in_parent = len(parent.find_all(LEAF))
    linked = [p for p in parent.find_all(f"publish {LEAF}") if "linked_trace_id" in p.metadata]
    assert (kept_in_parent, len(linked)) == (limit - 1, N - limit + 1)
    children = [capture.trace(p.metadata["linked_trace_id"]) for p in linked]
    assert all([o.name for o in child.observations] == [LEAF] for child in children)
    assert all(child.orphans() == [] for child in children) and parent.orphans() == []
    assert len(capture.traces()) == 1 + len(linked)
    print(
        f"\ngroup of {N} past the guard ({limit}): parent trace "
        f"{len(parent.observations)} observations, {len(linked)} linked traces of 1"
    )


def test_past_the_guard_a_chord_published_by_a_task_is_cut_into_linked_traces(
    fanout: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    """The chord's header tasks past the guard start linked traces; the callback is
    published by the header run that completed the chord, so it lands in that run's
    trace: with the headers run in the order sent, one of the last, linked ones."""
    limit = 100
    env = {"CELERY_LANGFUSE_MAX_TRACE_OBSERVATIONS": str(limit)}
    with start(capture, tmp_path, env) as worker:
        with get_client().start_as_current_observation(name="request") as request:
            sent = fanout.fan_out_chord.apply_async((N,), queue=worker.queue)
        chord_id = sent.get(timeout=60)
        assert fanout.app.AsyncResult(chord_id).get(timeout=300) == sum(range(N))
        capture.wait_for(
            lambda s: count(s, TOTAL) >= 1 and count(s, LEAF) >= N
            and count(s, f"publish {LEAF}") >= N,
            timeout=60,
        )
    flush_in_process()

    parent = capture.trace(request.trace_id)
    publishes = parent.find_all(f"publish {LEAF}")
    linked = [p for p in publishes if "linked_trace_id" in p.metadata]
    # In the process that ran fan_out_chord: its run and limit - 1 publishes fit.
    assert (len(publishes), len(parent.find_all(LEAF)), len(linked)) == (
        N, limit - 1, N - limit + 1
    )
    assert len(parent.observations) == 3 + N + limit - 1  # request, publish, run: 3
    assert parent.orphans() == [] and all(o.links == [] for o in parent.observations)

    children = {p.metadata["linked_trace_id"]: (p, capture.trace(p.metadata["linked_trace_id"]))
                for p in linked}
    for publish, child in children.values():
        (root,) = child.root_observations()
        assert (root.name, root.links) == (LEAF, [SpanLink(parent.id, publish.id)])
        assert child.orphans() == [], child.tree()

    callback = next(o for o in capture.observations if o.name == TOTAL)
    assert callback.output == sum(range(N))
    assert callback.trace_id in children, "the completing header was not a linked one"
    callback_trace = children[callback.trace_id][1]
    by_id = {o.id: o for o in callback_trace.observations}
    callback_publish = by_id[callback.parent_id or ""]
    completing_header = by_id[callback_publish.parent_id or ""]
    assert (callback_publish.name, completing_header.name) == (f"publish {TOTAL}", LEAF)
    assert completing_header.parent_id is None  # the linked trace's root
    assert callback.links == [] and callback_publish.links == []

    sizes = sorted(len(child.observations) for _, child in children.values())
    assert sizes == [1] * (len(children) - 1) + [3]
    assert len(capture.traces()) == 1 + len(linked)
    print(
        f"\nchord of {N} past the guard ({limit}): parent trace "
        f"{len(parent.observations)} observations ({len(publishes)} publishes, "
        f"{len(parent.find_all(LEAF))} header runs), {len(linked)} linked traces: "
        f"{sizes.count(1)} of 1 observation, 1 of 3 (the completing header run, "
        "publish of the callback, the callback); 0 orphans"
    )
