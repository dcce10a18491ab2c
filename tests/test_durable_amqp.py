"""Durable mode on RabbitMQ (an ``amqp://`` durable URL), against the machine's real
broker: every queue a test makes is named ``<CELERY_LANGFUSE_TEST_QUEUE>-amqp-...`` and
deleted after.

The same counting as on Redis: sent N, N arrived once; what the bound dropped and
what was moved aside is counted.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import amqp
import pytest

from celery_langfuse.durable import DurableSpanExporter, open_queue
from celery_langfuse.durable_amqp import AmqpSpanQueue
from celery_langfuse.forwarder import Forwarder, LangfuseEndpoint
from celery_langfuse.testing import PUBLIC_KEY, SECRET_KEY, CaptureServer
from tests.conftest import worker_process
from tests.durable_support import LimitingProxy, delivered_once, forwarder_process, free_port
from tests.test_durable import make_spans, running

pytestmark = pytest.mark.timeout(180)

AMQP_URL = os.environ.get("CELERY_LANGFUSE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
#: This run's queue names on the shared broker start with it (the run's task queue).
QUEUE_PREFIX = os.environ.get("CELERY_LANGFUSE_TEST_QUEUE", "celery-langfuse-tests") + "-amqp"


def require_rabbitmq() -> None:
    try:
        connection = amqp.Connection("127.0.0.1:5672", connect_timeout=2)
        connection.connect()
        connection.close()
    except Exception as exc:  # a missing service fails the test, it never skips it
        pytest.fail(f"RabbitMQ is not reachable at {AMQP_URL}: {exc}")


@pytest.fixture
def queue_name() -> Iterator[str]:
    require_rabbitmq()
    name = f"{QUEUE_PREFIX}-{uuid.uuid4().hex[:8]}"
    yield name
    connection = amqp.Connection("127.0.0.1:5672")
    connection.connect()
    channel = connection.channel()
    for queue in (name, f"{name}.dropped", f"{name}.dead"):
        channel.queue_delete(queue)
    connection.close()


@pytest.fixture
def queue(queue_name: str) -> Iterator[AmqpSpanQueue]:
    queue = AmqpSpanQueue.from_url(AMQP_URL, queue_name, max_bytes=64 * 1024 * 1024)
    yield queue
    queue.close()


def fill(queue: AmqpSpanQueue, batches: int, spans_per_batch: int) -> set[str]:
    exporter = DurableSpanExporter(queue)
    ids: set[str] = set()
    for b in range(batches):
        spans = make_spans(spans_per_batch, prefix=f"batch{b}")
        exporter.export(spans)
        ids |= {format(span.context.span_id, "016x") for span in spans}
    assert exporter.stats().written_spans == batches * spans_per_batch  # all confirmed
    return ids


def forwarder_for(queue_name: str, capture: CaptureServer, **options: Any) -> Forwarder:
    options.setdefault("max_backoff", 0.2)
    options.setdefault("block", 0.1)
    return Forwarder(
        open_queue(AMQP_URL, queue_name),
        LangfuseEndpoint(capture.base_url, PUBLIC_KEY, SECRET_KEY, timeout=5),
        **options,
    )


def test_batches_wait_in_rabbitmq_and_arrive_once_after_a_langfuse_outage(
    queue: AmqpSpanQueue, queue_name: str, capture: CaptureServer
) -> None:
    ids = fill(queue, batches=20, spans_per_batch=5)
    # Confirmed; the broker's message count follows within moments.
    capture.wait_for(lambda s: queue.stats().batches == 20)
    capture.set_response(503)
    with running(forwarder_for(queue_name, capture)) as forwarder:
        capture.wait_for(lambda s: s.requests >= 4)
        assert capture.observations == []
        capture.set_response()
        capture.wait_for(lambda s: len(s.deliveries) == 100, timeout=30)
        capture.wait_for(lambda s: queue.stats().batches == 0)
        time.sleep(0.5)  # a second delivery, if any, would arrive now
    delivered_once(capture, ids)
    assert forwarder.totals.forwarded_spans == 100


def test_several_forwarders_share_the_rabbitmq_queue_without_sending_a_batch_twice(
    queue: AmqpSpanQueue, queue_name: str, capture: CaptureServer
) -> None:
    ids = fill(queue, batches=120, spans_per_batch=4)
    forwarders = [forwarder_for(queue_name, capture, consumer=f"f{i}") for i in range(3)]
    with running(forwarders[0]), running(forwarders[1]), running(forwarders[2]):
        capture.wait_for(lambda s: len(s.deliveries) == 480, timeout=60)
        time.sleep(0.5)
    delivered_once(capture, ids)
    assert capture.requests == 120
    assert sum(1 for f in forwarders if f.totals.forwarded_spans) >= 2  # shared
    assert sum(f.totals.forwarded_spans for f in forwarders) == 480


def overfill(queue_name: str, bound: int, batches: int) -> list[set[str]]:
    """``batches`` batches of 20 spans (about 8 KiB each) into a queue declared with
    ``bound``: RabbitMQ drops the oldest into ``.dropped``. The span ids per batch."""
    queue = AmqpSpanQueue.from_url(AMQP_URL, queue_name, max_bytes=bound)
    exporter = DurableSpanExporter(queue, max_bytes=bound)
    ids = []
    for b in range(batches):
        spans = make_spans(20, prefix=f"{b}-{os.urandom(400).hex()}")
        exporter.export(spans)
        ids.append({format(s.context.span_id, "016x") for s in spans})
    assert exporter.stats().written_spans == 20 * batches  # all confirmed
    queue.close()
    return ids


def drop_warnings(caplog: pytest.LogCaptureFixture) -> list[tuple[int, int]]:
    """(spans, batches) of each "were dropped from the durable queue" warning."""
    found = []
    for record in caplog.records:
        match = re.search(r"(\d+) span\(s\) in (\d+) batch\(es\) were dropped", record.getMessage())
        if match and record.levelno == logging.WARNING:
            found.append((int(match[1]), int(match[2])))
    return found


def test_past_the_bound_rabbitmq_drops_the_oldest_and_the_forwarder_counts_them(
    queue_name: str, capture: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="celery_langfuse.forwarder")
    batches = overfill(queue_name, bound=16 * 1024, batches=40)  # the minimum is 1 MiB
    queue = AmqpSpanQueue.from_url(AMQP_URL, queue_name)
    with running(forwarder_for(queue_name, capture, stats_every=0.2)) as forwarder:
        # The forwarder counts the drops (every stats_every) and delivers the rest.
        capture.wait_for(lambda s: queue.stats().batches == 0, timeout=30)
        capture.wait_for(lambda s: queue.stats().count("uncounted_drops") == 0, timeout=30)
        # Ready batches are 0 once taken, not once sent; drops are counted after they
        # are taken: wait for every span to be delivered or counted.
        capture.wait_for(
            lambda s: len(s.deliveries) + forwarder.totals.dropped_spans == 800, timeout=30
        )
        time.sleep(0.5)
    delivered = set(capture.deliveries)
    dropped = forwarder.totals.dropped_spans
    assert dropped > 0
    assert len(delivered) + dropped == 800  # each span arrived or was counted
    delivered_once(capture, delivered)
    # The oldest went, the newest arrived.
    assert batches[-1] <= delivered and not batches[0] & delivered
    # No worker sees RabbitMQ drop: the forwarder's warnings say it, each drop once.
    warned = drop_warnings(caplog)
    assert sum(spans for spans, _ in warned) == dropped
    assert sum(n for _, n in warned) == forwarder.totals.dropped_batches == dropped // 20
    queue.close()


def test_the_forwarders_drop_count_is_logged_while_rabbitmq_is_down_and_when_it_stops(
    queue_name: str, capture: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    """RabbitMQ keeps no drop count: the forwarder that took the drop records holds it,
    and its totals line says it with the broker gone, and once more as it stops."""
    caplog.set_level(logging.INFO, logger="celery_langfuse.forwarder")
    batches = overfill(queue_name, bound=16 * 1024, batches=10)
    forwarder = forwarder_for(queue_name, capture, stats_every=0.2)
    with running(forwarder):
        # Each delivered batch also counted (acked after Langfuse's answer) before
        # the broker goes away.
        capture.wait_for(
            lambda s: len(s.deliveries) + forwarder.totals.dropped_spans == 200
            and forwarder.totals.forwarded_spans + forwarder.totals.dropped_spans == 200
        )
        # The broker goes away (the shared one is never stopped: this forwarder's
        # connection now leads to a closed port, the same path as a broker restart).
        forwarder.queue.url = f"amqp://guest:guest@127.0.0.1:{free_port()}//"  # type: ignore[attr-defined]
        forwarder.queue.close()
        capture.wait_for(lambda s: totals_lines(caplog, "not answering"), timeout=20)
    totals = forwarder.totals
    assert 0 < totals.dropped_spans < 200
    assert totals.forwarded_spans + totals.dropped_spans == 200
    delivered_once(capture, set().union(*batches) - set().union(*batches[: totals.dropped_batches]))
    counted = f"counted {totals.dropped_spans} dropped spans ({totals.dropped_batches} batches)"
    down = totals_lines(caplog, "not answering")[0]
    assert f"delivered {totals.forwarded_spans} spans" in down and counted in down
    stops = [r.getMessage() for r in caplog.records if " stops; since it started" in r.getMessage()]
    assert len(stops) == 1 and counted in stops[0]


def totals_lines(caplog: pytest.LogCaptureFixture, marker: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if "since it started" in r.getMessage() and marker in r.getMessage()
    ]


def test_a_429_retry_after_is_waited_for_on_rabbitmq_then_the_batch_arrives_once(
    queue: AmqpSpanQueue, queue_name: str, capture: CaptureServer
) -> None:
    ids = fill(queue, batches=1, spans_per_batch=5)
    capture.set_response(429, retry_after=1.5)
    proxy = LimitingProxy(capture.base_url)  # no limit: it records when requests arrive
    try:
        with running(proxy.forwarder(open_queue(AMQP_URL, queue_name), max_backoff=0.1)):
            capture.wait_for(lambda s: len(proxy.requests) >= 2, timeout=10)
            capture.set_response()
            capture.wait_for(lambda s: len(s.deliveries) == 5, timeout=10)
            time.sleep(0.5)  # a second delivery, if any, would arrive now
    finally:
        proxy.close()
    delivered_once(capture, ids)
    # Without Retry-After the forwarder would have retried within 0.1 s, 15 times.
    assert [status for _, _, status in proxy.requests] == [429, 429, 200]
    arrivals = [arrived for arrived, _, _ in proxy.requests]
    assert all(later - earlier >= 1.45 for earlier, later in zip(arrivals, arrivals[1:]))


def test_a_413_on_rabbitmq_splits_the_batch_until_each_part_is_accepted_never_looping(
    queue: AmqpSpanQueue, queue_name: str, capture: CaptureServer
) -> None:
    ids = fill(queue, batches=2, spans_per_batch=10)
    proxy = LimitingProxy(capture.base_url, limit=3)
    try:
        with running(proxy.forwarder(open_queue(AMQP_URL, queue_name))) as forwarder:
            capture.wait_for(lambda s: len(s.deliveries) == 20, timeout=30)
            capture.wait_for(lambda s: queue.stats().batches == 0)
            time.sleep(0.5)  # a second delivery or another split, if any, would come now
    finally:
        proxy.close()
    delivered_once(capture, ids)
    # 10 -> 5 + 5 -> (2 + 3) + (2 + 3): 3 splits per batch, 7 requests per batch.
    assert sorted(proxy.sizes) == sorted([10, 5, 5, 2, 3, 2, 3] * 2)
    totals = forwarder.totals
    assert (totals.split_batches, totals.forwarded_spans, totals.rejected_spans) == (6, 20, 0)
    assert queue.stats().count("dead_letter_batches") == 0


def test_a_413_for_a_single_span_on_rabbitmq_moves_it_to_the_dead_letters(
    queue: AmqpSpanQueue, queue_name: str, capture: CaptureServer
) -> None:
    fill(queue, batches=2, spans_per_batch=1)
    proxy = LimitingProxy(capture.base_url, limit=0)  # even one span is too large
    try:
        with running(proxy.forwarder(open_queue(AMQP_URL, queue_name))) as forwarder:
            capture.wait_for(lambda s: queue.stats().count("dead_letter_batches") == 2, timeout=30)
            time.sleep(0.5)  # another attempt, if any, would come now
    finally:
        proxy.close()
    assert proxy.sizes == [1, 1]  # one attempt each: cannot shrink, never looped
    totals = forwarder.totals
    assert (totals.rejected_batches, totals.rejected_spans, totals.split_batches) == (2, 2, 0)
    assert queue.stats().batches == 0 and capture.requests == 0
    channel = queue._open()
    reasons = [
        channel.basic_get(f"{queue_name}.dead", no_ack=True).properties["application_headers"]
        for _ in range(2)
    ]
    assert all("413" in headers["reason"] and headers["spans"] == 1 for headers in reasons)


def test_a_corrupt_message_goes_to_the_dead_letters_and_never_blocks_the_rest(
    queue: AmqpSpanQueue, queue_name: str, capture: CaptureServer
) -> None:
    first = fill(queue, batches=2, spans_per_batch=3)
    queue.append(b"not gzip", 3, 0)
    queue.append(gzip.compress(b"\xff\xfe garbage"), 2, 0)
    second = fill(queue, batches=2, spans_per_batch=3)
    with running(forwarder_for(queue_name, capture)) as forwarder:
        capture.wait_for(lambda s: len(s.deliveries) == 12, timeout=20)
        capture.wait_for(lambda s: queue.stats().count("dead_letter_batches") == 2)
    delivered_once(capture, first | second)
    assert forwarder.totals.corrupt_batches == 2
    assert capture.requests == 4
    channel = queue._open()
    dead = channel.basic_get(f"{queue_name}.dead", no_ack=True)
    assert dead.properties["application_headers"]["reason"].startswith("not a gzip OTLP")


def test_a_forwarder_killed_mid_batch_hands_its_batches_back_losing_and_repeating_nothing(
    queue: AmqpSpanQueue, queue_name: str, capture: CaptureServer, tmp_path: Path
) -> None:
    ids = fill(queue, batches=30, spans_per_batch=10)
    # Each attempt hangs for a second, then fails: the killed forwarder is mid-POST
    # with batches delivered to it and unacknowledged.
    capture.set_response(503, delay=1.0)
    with forwarder_process(capture, queue_name, "doomed", tmp_path, url=AMQP_URL) as doomed:
        capture.wait_for(lambda s: s.requests >= 1, timeout=30)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(5)
    capture.set_response()
    with (
        forwarder_process(capture, queue_name, "heir1", tmp_path, url=AMQP_URL),
        forwarder_process(capture, queue_name, "heir2", tmp_path, url=AMQP_URL),
    ):
        capture.wait_for(lambda s: len(s.deliveries) == len(ids), timeout=60)
        capture.wait_for(lambda s: queue.stats().batches == 0)
        time.sleep(0.5)
    delivered_once(capture, ids)


def test_2000_tasks_of_a_prefork_worker_through_a_langfuse_outage_arrive_exactly_once(
    tasks_app: Any, queue_name: str, capture: CaptureServer, tmp_path: Path
) -> None:
    n = 2000
    capture.set_response(503)
    durable_env = {
        **capture.env,
        "CELERY_LANGFUSE_TEST_DURABLE_URL": AMQP_URL,
        "CELERY_LANGFUSE_TEST_DURABLE_QUEUE": queue_name,
        "LANGFUSE_FLUSH_INTERVAL": "0.5",
    }
    with (
        worker_process(durable_env, "-P", "prefork", "-c", "2", tmp_path=tmp_path) as worker,
        forwarder_process(capture, queue_name, "one", tmp_path, url=AMQP_URL),
        forwarder_process(capture, queue_name, "two", tmp_path, url=AMQP_URL),
    ):
        queue = AmqpSpanQueue.from_url(AMQP_URL, queue_name)
        results = [
            tasks_app.add.apply_async((i, i), queue=worker.queue)  # type: ignore[attr-defined]
            for i in range(n)
        ]
        assert [r.get(timeout=120) for r in results] == [2 * i for i in range(n)]
        time.sleep(2)
        assert capture.observations == []  # Langfuse is down: everything waits
        capture.set_response()
        capture.wait_for(lambda s: len(s.deliveries) >= n, timeout=90)
        capture.wait_for(lambda s: queue.stats().batches == 0, timeout=30)
        time.sleep(1)
        queue.close()
    runs = {o.metadata["task_id"]: o for o in capture.observations}
    assert set(runs) == {r.id for r in results}
    delivered_once(capture, {o.id for o in capture.observations})
    assert len(capture.deliveries) == n


def test_a_rabbitmq_queue_declared_with_another_bound_is_refused_at_install(
    queue_name: str,
) -> None:
    from celery_langfuse.durable import QueueUnavailable, check_url

    check_url(AMQP_URL, queue_name, 2 * 1024 * 1024)
    with pytest.raises(QueueUnavailable, match="exists with other arguments"):
        check_url(AMQP_URL, queue_name, 4 * 1024 * 1024)
    check_url(AMQP_URL, queue_name, 2 * 1024 * 1024)  # the broker is still usable


def test_exporter_on_a_closed_port_holds_and_then_publishes_once_rabbitmq_answers(
    queue_name: str,
) -> None:
    # The shared broker is never restarted: this points the exporter at a closed
    # port first, then at the broker, the same code path as a broker restart.
    queue = AmqpSpanQueue.from_url("amqp://guest:guest@127.0.0.1:1//", queue_name, 1024 * 1024)
    exporter = DurableSpanExporter(queue)
    for _ in range(5):
        exporter.export(make_spans(4))
    assert exporter.stats().held_spans == 20
    queue.url = AMQP_URL  # "the broker is back"
    deadline = time.monotonic() + 30
    while exporter.stats().held_spans and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exporter.stats().recovered_spans == 20
    assert queue.stats().batches == 5
    exporter.shutdown()


def test_three_waves_through_a_rabbitmq_restart_arrive_exactly_once(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    """A RabbitMQ node of the test's own holds the queue. Wave 1 arrives; wave 2 waits
    in the queue (Langfuse answers 503); the node is SIGKILLed, wave 3 runs while it is
    down (the workers hold its spans), the node starts again and recovers the durable
    queue; Langfuse comes back: all 60 runs arrive, each exactly once."""
    from tests.durable_support import RabbitNode, by_task_id

    wave, name = 20, f"durable-amqp-restart-{uuid.uuid4().hex[:6]}"
    node = RabbitNode()
    node.start()
    try:
        durable_env = {
            **capture.env,
            "CELERY_LANGFUSE_TEST_DURABLE_URL": node.url,
            "CELERY_LANGFUSE_TEST_DURABLE_QUEUE": name,
            "LANGFUSE_FLUSH_INTERVAL": "0.3",
        }
        with (
            worker_process(durable_env, "-P", "prefork", "-c", "2", tmp_path=tmp_path) as worker,
            forwarder_process(capture, name, "f1", tmp_path, url=node.url) as f1,
        ):
            queue = worker.queue  # type: ignore[attr-defined]

            def run_ids() -> set[str]:
                return set(by_task_id(capture.observations, "tests.support.tasks.add"))

            def send(first: int) -> list[str]:
                results = [
                    tasks_app.add.apply_async((i, i), queue=queue)
                    for i in range(first, first + wave)
                ]
                assert [r.get(timeout=60) for r in results] == [
                    2 * i for i in range(first, first + wave)
                ]
                return [r.id for r in results]

            first = send(0)
            capture.wait_for(lambda s: set(first) <= run_ids(), timeout=60)

            capture.set_response(503)
            second = send(wave)
            probe = AmqpSpanQueue.from_url(node.url, name)
            capture.wait_for(lambda s: probe.stats().batches + s.requests >= 2, timeout=30)
            time.sleep(1.5)  # every pool child has exported wave 2 to the queue
            probe.close()

            node.kill()
            third = send(2 * wave)
            time.sleep(1.5)  # the workers tried, and hold wave 3
            node.start()
            capture.set_response()
            everything = set(first + second + third)
            capture.wait_for(lambda s: everything <= run_ids(), timeout=120)
            time.sleep(1)  # a duplicate, if any, would arrive now

        runs = by_task_id(capture.observations, "tests.support.tasks.add")
        assert set(runs) == everything
        assert all(len(runs[i]) == 1 for i in everything)
        delivered_once(capture, {o.id for o in capture.observations})
        assert "cannot write to the durable queue" in worker.log()
        assert "Traceback" not in f1.log  # type: ignore[attr-defined]
    finally:
        node.remove()
