"""Faults of durable mode, each a test that counts what arrives.

Langfuse down past the queue's bound, 429 with ``Retry-After``, 413, corrupt queue
entries and forwarders racing for the same batch; every span the design promises to
keep arrives exactly once, and every other one is counted. (A forwarder SIGKILLed
mid-batch: tests/test_durable.py.)
"""

from __future__ import annotations

import gzip
import os
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from redis import Redis

from celery_langfuse.durable import SpanQueue
from celery_langfuse.forwarder import Forwarder, split_batch
from celery_langfuse.testing import CaptureServer
from tests.conftest import REDIS_URL
from tests.durable_support import LimitingProxy, delivered_once
from tests.test_durable import fill, forwarder_for, make_spans, running

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def queue_name() -> Iterator[str]:
    name = f"durable-faults-{uuid.uuid4().hex[:10]}"
    yield name
    Redis.from_url(REDIS_URL).delete(f"{{{name}}}:batches", f"{{{name}}}:stats", f"{{{name}}}:dead")


@pytest.fixture
def queue(queue_name: str) -> Iterator[SpanQueue]:
    queue = SpanQueue.from_url(REDIS_URL, queue_name)
    yield queue
    queue.close()


def stored_ids(queue: SpanQueue) -> set[str]:
    """The span ids of the batches the stream holds."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    ids = set()
    for _, fields in queue.redis.xrange(queue.stream):
        request = ExportTraceServiceRequest.FromString(gzip.decompress(fields[b"data"]))
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                ids |= {span.span_id.hex() for span in scope.spans}
    return ids


def test_langfuse_down_past_the_bound_drops_the_oldest_counts_them_and_delivers_the_rest(
    queue: SpanQueue, queue_name: str, capture: CaptureServer
) -> None:
    capture.set_response(503)
    bound = 32 * 1024  # small, for the test: the setting's minimum is 1 MiB
    batches, ids_per_batch = [], []
    with running(forwarder_for(queue_name, capture)) as forwarder:
        # 60 batches of 40 spans, about 3 KiB each: well past the bound.
        from celery_langfuse.durable import DurableSpanExporter

        exporter = DurableSpanExporter(queue, max_bytes=bound)
        for b in range(60):
            spans = make_spans(40, prefix=f"{b}-{os.urandom(300).hex()}")
            exporter.export(spans)
            batches.append(b)
            ids_per_batch.append({format(s.context.span_id, "016x") for s in spans})
        capture.wait_for(lambda s: s.requests >= 3)
        stats = queue.stats()
        assert stats.bytes <= bound
        dropped = stats.count("dropped_spans")
        assert dropped > 0 and dropped % 40 == 0
        assert exporter.stats().dropped_spans == dropped  # the worker's own count too
        kept = stored_ids(queue)
        capture.set_response()
        capture.wait_for(lambda s: queue.stats().batches == 0, timeout=60)
    # Counted once the batch left the queue: read once the forwarder's thread is done.
    assert forwarder.totals.forwarded_spans == len(kept)

    all_ids = set().union(*ids_per_batch)
    delivered_once(capture, kept)
    assert set(capture.deliveries) == kept
    assert len(kept) + dropped == len(all_ids) == 2400
    # The oldest went: every delivered batch is newer than every dropped one.
    first_kept = min(b for b, ids in enumerate(ids_per_batch) if ids <= kept)
    assert all(ids <= kept for ids in ids_per_batch[first_kept:])
    assert not any(ids & kept for ids in ids_per_batch[:first_kept])


def test_a_429_retry_after_is_waited_for_then_the_batch_arrives_once(
    queue: SpanQueue, queue_name: str, capture: CaptureServer
) -> None:
    ids = fill(queue, batches=1, spans_per_batch=5)
    capture.set_response(429, retry_after=1.5)
    times: list[float] = []
    with running(forwarder_for(queue_name, capture, max_backoff=0.1)):
        capture.wait_for(lambda s: s.requests >= 1)
        times.append(time.monotonic())
        capture.wait_for(lambda s: s.requests >= 2, timeout=10)
        times.append(time.monotonic())
        capture.set_response()
        capture.wait_for(lambda s: queue.stats().batches == 0, timeout=10)
    # Without Retry-After the forwarder would have retried within 0.1 s.
    assert times[1] - times[0] >= 1.3
    delivered_once(capture, ids)


def test_a_413_splits_the_batch_until_each_part_is_accepted_never_looping(
    queue: SpanQueue, queue_name: str, capture: CaptureServer
) -> None:
    ids = fill(queue, batches=2, spans_per_batch=10)
    proxy = LimitingProxy(capture.base_url, limit=3)
    forwarder = proxy.forwarder(SpanQueue.from_url(REDIS_URL, queue_name))
    try:
        with running(forwarder):
            capture.wait_for(lambda s: len(s.deliveries) == 20, timeout=30)
            capture.wait_for(lambda s: queue.stats().batches == 0)
    finally:
        proxy.close()
    delivered_once(capture, ids)
    # 10 -> 5 + 5 -> (2 + 3) + (2 + 3): 3 splits per batch, 7 requests per batch.
    stats = queue.stats()
    assert stats.count("split_batches") == 6
    assert stats.count("forwarded_spans") == 20 and stats.count("rejected_spans") == 0
    assert len(proxy.sizes) == 14
    assert sorted(proxy.sizes) == sorted([10, 5, 5, 2, 3, 2, 3] * 2)


def test_a_413_for_a_single_span_moves_it_to_the_dead_letters(
    queue: SpanQueue, queue_name: str, capture: CaptureServer
) -> None:
    fill(queue, batches=1, spans_per_batch=1)
    ids = fill(queue, batches=1, spans_per_batch=1)  # a second, deliverable one
    proxy = LimitingProxy(capture.base_url, limit=0)  # even one span is too large
    forwarder = proxy.forwarder(SpanQueue.from_url(REDIS_URL, queue_name))
    try:
        with running(forwarder):
            capture.wait_for(lambda s: queue.stats().batches == 0, timeout=30)
    finally:
        proxy.close()
    stats = queue.stats()
    assert (stats.count("rejected_batches"), stats.count("rejected_spans")) == (2, 2)
    assert stats.count("dead_letter_batches") == 2
    assert proxy.sizes == [1, 1]  # one attempt each: cannot shrink, never looped
    dead = queue.redis.xrange(queue.dead_key)
    assert all(b"413" in fields[b"reason"] for _, fields in dead)
    assert ids  # kept for the reader: the dead letters hold the bodies to inspect


def test_corrupt_entries_go_to_the_dead_letters_counted_and_never_block_the_rest(
    queue: SpanQueue, queue_name: str, capture: CaptureServer
) -> None:
    first = fill(queue, batches=2, spans_per_batch=3)
    queue.redis.xadd(queue.stream, {"data": b"not gzip at all", "spans": 3})
    queue.redis.xadd(queue.stream, {"data": gzip.compress(b"\xff\xfe garbage"), "spans": 2})
    queue.redis.xadd(queue.stream, {"spans": "x"})  # no body, a bad span count
    queue.redis.xadd(queue.stream, {"data": gzip.compress(b""), "spans": 0})  # no spans
    second = fill(queue, batches=2, spans_per_batch=3)
    with running(forwarder_for(queue_name, capture)) as forwarder:
        capture.wait_for(lambda s: queue.stats().batches == 0, timeout=20)
    delivered_once(capture, first | second)
    stats = queue.stats()
    assert stats.count("corrupt_batches") == 4 == forwarder.totals.corrupt_batches
    assert stats.count("dead_letter_batches") == 4
    assert stats.count("forwarded_spans") == 12
    assert capture.requests == 4  # nothing corrupt was sent
    reasons = [fields[b"reason"] for _, fields in queue.redis.xrange(queue.dead_key)]
    assert all(r.startswith((b"not a gzip OTLP request", b"an OTLP request")) for r in reasons)


def test_two_forwarders_racing_for_the_same_abandoned_batches_send_each_once(
    queue: SpanQueue, queue_name: str, capture: CaptureServer
) -> None:
    ids = fill(queue, batches=30, spans_per_batch=2)
    dead = forwarder_for(queue_name, capture, consumer="dead")
    dead.queue.ensure_group()
    assert len(dead.queue.read_new("dead", 100, 0.1)) == 30  # taken, then "dies"
    time.sleep(0.3)
    racers = [
        forwarder_for(queue_name, capture, consumer=f"racer{i}", claim_timeout=0.2, batch_size=2)
        for i in range(2)
    ]
    start = threading.Barrier(2)

    def race(forwarder: Forwarder) -> None:
        start.wait()
        deadline = time.monotonic() + 30
        while forwarder.queue.stats().batches and time.monotonic() < deadline:
            forwarder.step()

    threads = [threading.Thread(target=race, args=(f,)) for f in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    capture.wait_for(lambda s: queue.stats().batches == 0, timeout=20)
    delivered_once(capture, ids)
    assert capture.requests == 30  # not one batch was sent by both
    assert sum(f.totals.forwarded_spans for f in racers) == 60
    assert all(f.totals.forwarded_spans for f in racers)  # both took part


def test_split_halves_hold_every_span_once_with_their_resource_and_scope() -> None:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    whole = encode_spans(make_spans(7))
    (first, n1), (second, n2) = split_batch(gzip.compress(whole.SerializeToString()))
    assert (n1, n2) == (3, 4)
    parts = [ExportTraceServiceRequest.FromString(gzip.decompress(p)) for p in (first, second)]
    span_ids = [
        span.span_id
        for request in parts
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    original = [s.span_id for r in whole.resource_spans for sc in r.scope_spans for s in sc.spans]
    assert span_ids == original
    for request in parts:
        assert request.resource_spans[0].resource == whole.resource_spans[0].resource
        scope = request.resource_spans[0].scope_spans[0].scope
        assert scope == whole.resource_spans[0].scope_spans[0].scope
