"""Durable export: spans wait in a bounded Redis queue until Langfuse has accepted them.

In-process tests drive :class:`SpanQueue`, :class:`DurableSpanExporter` and
:class:`Forwarder` directly (the test process's own Langfuse client exports elsewhere,
so spans come from a private tracer provider); the end-to-end tests run real prefork
workers in durable mode and ``celery-langfuse forward`` subprocesses.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis import Redis

from celery_langfuse import install, logs
from celery_langfuse.config import ConfigurationError
from celery_langfuse.durable import DurableSpanExporter, SpanQueue
from celery_langfuse.forwarder import Forwarder, LangfuseEndpoint
from celery_langfuse.testing import PUBLIC_KEY, SECRET_KEY, CaptureServer
from tests.conftest import REDIS_URL, require_redis, worker_process
from tests.durable_support import delivered_once, forwarder_process

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def queue_name() -> Iterator[str]:
    """A queue of this test's own, deleted afterwards."""
    require_redis()
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    redis = Redis.from_url(REDIS_URL)
    redis.delete(f"{{{name}}}:batches", f"{{{name}}}:stats")


@pytest.fixture
def queue(queue_name: str) -> Iterator[SpanQueue]:
    queue = SpanQueue.from_url(REDIS_URL, queue_name)
    yield queue
    queue.close()


@pytest.fixture
def fresh_warnings() -> Iterator[None]:
    logs._last_logged.clear()
    yield
    logs._last_logged.clear()


def make_spans(n: int, prefix: str = "span") -> list[ReadableSpan]:
    """``n`` finished spans from a private tracer provider (not the session's client)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("celery-langfuse-tests")
    for i in range(n):
        with tracer.start_as_current_span(f"{prefix}-{i}"):
            pass
    return list(memory.get_finished_spans())


def fill(queue: SpanQueue, batches: int, spans_per_batch: int) -> set[str]:
    """Export ``batches`` batches into ``queue``; the span ids, as Langfuse shows them."""
    exporter = DurableSpanExporter(queue)
    ids: set[str] = set()
    for b in range(batches):
        spans = make_spans(spans_per_batch, prefix=f"batch{b}")
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        ids |= {format(span.context.span_id, "016x") for span in spans}
    return ids


def forwarder_for(queue_name: str, capture: CaptureServer, **options: Any) -> Forwarder:
    options.setdefault("max_backoff", 0.2)
    options.setdefault("block", 0.1)
    return Forwarder(
        SpanQueue.from_url(REDIS_URL, queue_name),
        LangfuseEndpoint(capture.base_url, PUBLIC_KEY, SECRET_KEY, timeout=5),
        **options,
    )


@contextmanager
def running(forwarder: Forwarder) -> Iterator[Forwarder]:
    thread = threading.Thread(target=forwarder.run, daemon=True)
    thread.start()
    try:
        yield forwarder
    finally:
        forwarder.stop()
        thread.join(10)
        assert not thread.is_alive()


# -- the queue and the exporter -------------------------------------------------------


def test_exported_spans_wait_in_the_queue_until_a_forwarder_delivers_them(
    queue: SpanQueue, queue_name: str, capture: CaptureServer
) -> None:
    ids = fill(queue, batches=3, spans_per_batch=5)
    stats = queue.stats()
    assert (stats.batches, stats.count("enqueued_spans")) == (3, 15)
    assert capture.observations == []

    forwarder = forwarder_for(queue_name, capture)
    forwarder.queue.ensure_group()
    while forwarder.step():
        pass

    delivered_once(capture, ids)
    stats = queue.stats()
    assert (stats.batches, stats.bytes, stats.pending) == (0, 0, 0)
    assert stats.count("forwarded_spans") == 15


def test_a_full_queue_drops_its_oldest_batches_counts_them_and_stays_within_its_bound(
    queue: SpanQueue,
) -> None:
    limit = 1024 * 1024
    payload = os.urandom(100_000)  # incompressible: what the bound counts is what is stored
    for i in range(30):
        queue.append(payload + i.to_bytes(4, "big"), spans=7, max_bytes=limit)

    stats = queue.stats()
    assert stats.bytes <= limit
    assert stats.batches == limit // 100_004
    assert stats.count("dropped_batches") == 30 - stats.batches
    assert stats.count("dropped_spans") == 7 * (30 - stats.batches)
    newest = queue.redis.xrevrange(queue.stream, count=1)[0][1][b"data"]
    assert newest.endswith((29).to_bytes(4, "big"))


def test_a_full_queue_warns_once_per_interval(
    queue: SpanQueue, fresh_warnings: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_langfuse")
    queue.append(os.urandom(1024 * 1024 - 10), spans=1, max_bytes=1024 * 1024)
    exporter = DurableSpanExporter(queue, max_bytes=1024 * 1024)
    for _ in range(3):
        assert exporter.export(make_spans(2)) is SpanExportResult.SUCCESS

    full = [r for r in caplog.records if "is full" in r.getMessage()]
    assert len(full) == 1
    assert queue.stats().count("dropped_batches") >= 1


def test_unreachable_redis_holds_the_batches_warns_once_and_never_raises(
    fresh_warnings: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_langfuse")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exporter = DurableSpanExporter(SpanQueue.from_url(f"redis://127.0.0.1:{port}/0", "down"))

    started = time.monotonic()
    results = [exporter.export(make_spans(3)) for _ in range(3)]
    assert results == [SpanExportResult.SUCCESS] * 3  # held, not lost
    assert time.monotonic() - started < 10
    assert exporter.stats().held_spans == 9
    down = [r for r in caplog.records if "cannot write to the durable queue" in r.getMessage()]
    assert len(down) == 1
    # Exiting with Redis still down and no spill directory: counted and said.
    assert exporter.settle_at_exit(timeout=0.5).spans == 9
    assert exporter.stats().dropped_spans == 9
    assert any("lost 9 span(s)" in r.getMessage() for r in caplog.records)
    exporter.queue.close()


# -- the forwarder ----------------------------------------------------------------------


def test_batches_stay_queued_while_langfuse_fails_and_arrive_once_when_it_recovers(
    queue: SpanQueue, queue_name: str, capture: CaptureServer
) -> None:
    ids = fill(queue, batches=4, spans_per_batch=3)
    capture.set_response(503)
    with running(forwarder_for(queue_name, capture)):
        capture.wait_for(lambda s: s.requests >= 5)  # several attempts, all refused
        stats = queue.stats()
        assert stats.batches == 4
        assert stats.pending >= 1
        assert capture.observations == []
        capture.set_response()
        capture.wait_for(lambda s: len(s.observations) == 12)
        capture.wait_for(lambda s: queue.stats().batches == 0)
    delivered_once(capture, ids)
    assert queue.stats().count("forwarded_batches") == 4


def test_a_batch_langfuse_will_never_accept_is_removed_and_counted(
    queue: SpanQueue, queue_name: str, capture: CaptureServer
) -> None:
    fill(queue, batches=2, spans_per_batch=3)
    capture.set_response(400)
    with running(forwarder_for(queue_name, capture)):
        capture.wait_for(lambda s: queue.stats().batches == 0)
    stats = queue.stats()
    assert (stats.count("rejected_batches"), stats.count("rejected_spans")) == (2, 6)
    assert capture.requests == 2  # one attempt each: retrying cannot help


def test_retry_after_of_a_429_sets_the_wait(capture: CaptureServer) -> None:
    capture.set_response(429, retry_after=7)
    endpoint = LangfuseEndpoint(capture.base_url, PUBLIC_KEY, SECRET_KEY)
    answer = endpoint.send(b"")
    assert (answer.accepted, answer.retry, answer.retry_after) == (False, True, 7.0)
    forwarder = Forwarder(SpanQueue.from_url(REDIS_URL, "unused"), endpoint, max_backoff=2)
    assert forwarder._backoff(0, answer.retry_after) == 7.0
    assert all(1.0 <= forwarder._backoff(5, None) <= 2.0 for _ in range(20))


def test_a_batch_abandoned_by_a_dead_forwarder_is_taken_over(
    queue: SpanQueue, queue_name: str, capture: CaptureServer
) -> None:
    ids = fill(queue, batches=3, spans_per_batch=2)
    dead = forwarder_for(queue_name, capture, consumer="dead")
    dead.queue.ensure_group()
    taken = dead.queue.read_new("dead", 10, 0.1)  # claimed, then the forwarder "dies"
    assert len(taken) == 3 and queue.stats().pending == 3

    alive = forwarder_for(queue_name, capture, consumer="alive", claim_timeout=0.5)
    assert alive.step() == 0  # not idle long enough yet: no one else's batch is stolen
    time.sleep(0.6)
    while alive.step():
        pass
    delivered_once(capture, ids)
    assert queue.stats().pending == 0


def test_a_forwarder_renews_its_claim_while_it_retries(
    queue: SpanQueue, queue_name: str, capture: CaptureServer
) -> None:
    ids = fill(queue, batches=1, spans_per_batch=2)
    capture.set_response(503)
    with running(forwarder_for(queue_name, capture, consumer="patient", claim_timeout=0.6)):
        capture.wait_for(lambda s: s.requests >= 1)
        time.sleep(1.5)  # well past the claim timeout, retrying all along
        other = forwarder_for(queue_name, capture, consumer="other", claim_timeout=0.6)
        assert other.queue.claim_abandoned("other", 0.6, 10) == []
        capture.set_response()
        capture.wait_for(lambda s: queue.stats().batches == 0)
    delivered_once(capture, ids)


def test_several_forwarders_share_the_queue_without_sending_a_batch_twice(
    queue: SpanQueue, queue_name: str, capture: CaptureServer
) -> None:
    ids = fill(queue, batches=150, spans_per_batch=4)
    forwarders = [forwarder_for(queue_name, capture, consumer=f"f{i}") for i in range(3)]
    with running(forwarders[0]), running(forwarders[1]), running(forwarders[2]):
        capture.wait_for(lambda s: len(s.observations) == 600, timeout=30)
    delivered_once(capture, ids)
    assert sum(1 for f in forwarders if f.forwarded_spans) >= 2  # the work was shared
    assert sum(f.forwarded_spans for f in forwarders) == 600


# -- forwarder processes ---------------------------------------------------------------


def test_a_forwarder_killed_mid_batch_loses_nothing_and_sends_nothing_twice(
    queue: SpanQueue, queue_name: str, capture: CaptureServer, tmp_path: Path
) -> None:
    ids = fill(queue, batches=40, spans_per_batch=10)
    # Each attempt hangs for a second, then fails: the killed forwarder is mid-POST
    # with batches claimed, and Langfuse stores nothing of that attempt.
    capture.set_response(503, delay=1.0)
    with forwarder_process(capture, queue_name, "doomed", tmp_path) as doomed:
        capture.wait_for(lambda s: s.requests >= 1, timeout=20)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(5)
    held = queue.stats().pending
    assert held >= 1, "the killed forwarder held no batch"

    capture.set_response()
    with forwarder_process(capture, queue_name, "heir", tmp_path) as heir:
        capture.wait_for(lambda s: len(s.observations) == len(ids), timeout=30)
        capture.wait_for(lambda s: queue.stats().batches == 0)
        assert heir.poll() is None
    assert "took over" in heir.log  # type: ignore[attr-defined]
    delivered_once(capture, ids)
    stats = queue.stats()
    assert (stats.pending, stats.count("forwarded_spans")) == (0, len(ids))


def test_forward_without_a_redis_url_says_what_is_missing() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CELERY_LANGFUSE_DURABLE_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "celery_langfuse.cli", "forward"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "--redis-url" in done.stderr


# -- durable mode end to end ------------------------------------------------------------


def test_durable_mode_settings_are_validated_with_clear_errors() -> None:
    from celery import Celery

    app = Celery("durable-settings")
    with pytest.raises(ConfigurationError, match="durable_url=None"):
        install(app, export="durable")
    with pytest.raises(ConfigurationError, match="durable_url='http://x'"):
        install(app, export="durable", durable_url="http://x")
    with pytest.raises(ConfigurationError, match="export='queue'"):
        install(app, export="queue")
    with pytest.raises(ConfigurationError, match="durable_max_bytes=10"):
        install(app, export="durable", durable_url=REDIS_URL, durable_max_bytes=10)
    with pytest.raises(ConfigurationError, match="durable_url"):
        install(app, durable_url=REDIS_URL)  # direct export would silently ignore it


def test_user_code_calling_get_client_after_install_exports_through_the_queue(
    queue: SpanQueue, queue_name: str, capture: CaptureServer
) -> None:
    # A process of its own: this one's client already exports to the capture server.
    script = textwrap.dedent(
        f"""
        from celery import Celery
        from langfuse import get_client
        from celery_langfuse import install

        install(Celery("app"), export="durable", durable_url={REDIS_URL!r},
                durable_queue={queue_name!r})
        langfuse = get_client()
        with langfuse.start_as_current_observation(name="user-code"):
            pass
        langfuse.flush()
        """
    )
    env = {**os.environ, **capture.env}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "not in effect" not in done.stderr
    assert queue.stats().count("enqueued_spans") == 1
    assert capture.requests == 0  # nothing went to Langfuse directly


def test_a_client_made_before_install_is_reported_not_silently_used(
    queue_name: str, capture: CaptureServer
) -> None:
    script = textwrap.dedent(
        f"""
        from celery import Celery
        from langfuse import get_client
        from celery_langfuse import install

        get_client()  # user code that runs before install()
        install(Celery("app"), export="durable", durable_url={REDIS_URL!r},
                durable_queue={queue_name!r})
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **capture.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "export='durable'" in done.stderr
    assert "does not apply" in done.stderr or "not in effect" in done.stderr


def test_2000_tasks_through_a_langfuse_outage_arrive_exactly_once(
    tasks_app: Any, queue: SpanQueue, queue_name: str, capture: CaptureServer, tmp_path: Path
) -> None:
    n = 2000
    capture.set_response(503)
    durable_env = {
        **capture.env,
        "CELERY_LANGFUSE_TEST_DURABLE_URL": REDIS_URL,
        "CELERY_LANGFUSE_TEST_DURABLE_QUEUE": queue_name,
    }
    with (
        worker_process(durable_env, "-P", "prefork", "-c", "2", tmp_path=tmp_path) as worker,
        forwarder_process(capture, queue_name, "one", tmp_path),
        forwarder_process(capture, queue_name, "two", tmp_path),
    ):
        results = [tasks_app.add.apply_async((i, i), queue=worker.queue) for i in range(n)]
        ids = {r.id for r in results}
        # Langfuse is down for the whole run: everything waits in the queue.
        capture.wait_for(lambda s: queue.stats().count("enqueued_spans") >= n, timeout=60)
        assert capture.requests > 0
        assert capture.observations == []

        capture.set_response()
        capture.wait_for(lambda s: len(s.observations) >= n, timeout=60)
        capture.wait_for(lambda s: queue.stats().batches == 0, timeout=30)

    runs = {o.metadata["task_id"]: o for o in capture.observations}
    assert set(runs) == ids
    assert all(runs[r.id].output == 2 * i for i, r in enumerate(results))
    assert all(run.level == "DEFAULT" for run in runs.values())
    delivered_once(capture, {o.id for o in capture.observations})
    assert len(capture.deliveries) == n
    stats = queue.stats()
    assert (stats.count("enqueued_spans"), stats.count("forwarded_spans")) == (n, n)
    assert stats.count("dropped_spans") == 0


def test_a_forwarder_started_before_redis_answers_waits_for_it(capture: CaptureServer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    forwarder = Forwarder(
        SpanQueue.from_url(f"redis://127.0.0.1:{port}/0", "nowhere"),
        LangfuseEndpoint(capture.base_url, PUBLIC_KEY, SECRET_KEY),
        max_backoff=0.2,
    )
    thread = threading.Thread(target=forwarder.run, daemon=True)
    thread.start()
    time.sleep(1.0)  # several failed attempts to join the group, none fatal
    assert thread.is_alive()
    forwarder.stop()
    thread.join(10)
    assert not thread.is_alive()
