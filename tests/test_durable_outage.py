"""Durable mode through an outage of the queue's own Redis: nothing lost, nothing twice.

Each test runs a ``redis-server`` of its own for the queue (the broker stays on the
shared Redis) and kills it mid-run; the exporter holds what it cannot write, bounded
in memory and optionally on disk, and writes it once Redis answers again.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SpanExportResult

from celery_langfuse import logs
from celery_langfuse.durable import DurableSpanExporter, SpanQueue
from celery_langfuse.forwarder import Forwarder, LangfuseEndpoint
from celery_langfuse.testing import PUBLIC_KEY, SECRET_KEY, CaptureServer
from tests.conftest import REDIS_URL, require_redis, worker_process
from tests.durable_support import (
    RedisServer,
    by_task_id,
    delivered_once,
    forwarder_process,
    free_port,
    producer_process,
    redis_server,
    subprocess_env,
)
from tests.test_durable import fill, make_spans, running

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def fresh_warnings() -> Any:
    logs._last_logged.clear()
    yield
    logs._last_logged.clear()


def test_three_waves_through_a_queue_redis_outage_arrive_exactly_once(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    """The issue's scenario: a real prefork worker, a durable producer and two
    forwarders; the queue's Redis is killed during the second of three waves and
    started again (empty) before the third. Every task run and every publish arrives,
    each exactly once."""
    wave = 20
    queue_name = f"durable-outage-{uuid.uuid4().hex[:8]}"
    with redis_server(tmp_path / "queue-redis") as queue_redis:
        durable_env = {
            **capture.env,
            "CELERY_LANGFUSE_TEST_DURABLE_URL": queue_redis.url,
            "CELERY_LANGFUSE_TEST_DURABLE_QUEUE": queue_name,
            "LANGFUSE_FLUSH_INTERVAL": "0.3",
        }
        with (
            worker_process(durable_env, "-P", "prefork", "-c", "2", tmp_path=tmp_path) as worker,
            forwarder_process(capture, queue_name, "f1", tmp_path, url=queue_redis.url) as f1,
            forwarder_process(capture, queue_name, "f2", tmp_path, url=queue_redis.url),
            producer_process(
                subprocess_env(capture, **durable_env, CELERY_LANGFUSE_TEST_BROKER=REDIS_URL),
                tmp_path,
            ) as producer,
        ):
            queue = worker.queue  # type: ignore[attr-defined]

            def arrived(ids: list[str]) -> bool:
                runs = by_task_id(capture.observations, "tests.support.tasks.add")
                publishes = by_task_id(capture.observations, "publish ")
                return all(i in runs and i in publishes for i in ids)

            first = producer.send(queue, 0, wave)
            capture.wait_for(lambda s: arrived(first), timeout=60)

            queue_redis.kill()
            second = producer.send(queue, wave, wave)
            results = [tasks_app.app.AsyncResult(i) for i in second]
            assert [r.get(timeout=60) for r in results] == [2 * i for i in range(wave, 2 * wave)]
            time.sleep(2)  # several export intervals: every process tried and held
            assert not any(
                i in by_task_id(capture.observations, "tests.support.tasks.add") for i in second
            )

            queue_redis.start()  # empty: the outage lost what Redis held (nothing, here)
            third = producer.send(queue, 2 * wave, wave)
            capture.wait_for(lambda s: arrived(first + second + third), timeout=90)
            time.sleep(1)  # a duplicate, if any, would arrive now

        all_ids = set(first + second + third)
        runs = by_task_id(capture.observations, "tests.support.tasks.add")
        publishes = by_task_id(capture.observations, "publish ")
        assert set(runs) == all_ids and set(publishes) == all_ids
        assert all(len(runs[i]) == 1 and len(publishes[i]) == 1 for i in all_ids)
        delivered_once(capture, {o.id for o in capture.observations})

        worker_log = worker.log()
        assert "cannot write to the durable queue" in worker_log
        assert "answers again" in worker_log
        forwarder_log = f1.log  # type: ignore[attr-defined]
        assert forwarder_log.count("cannot use the durable queue") == 1
        assert "answers again" in forwarder_log
        assert "Traceback" not in forwarder_log


def test_held_batches_are_written_once_redis_answers_and_tasks_never_wait(
    tmp_path: Path, fresh_warnings: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="celery_langfuse")
    server = RedisServer(tmp_path / "redis")
    server.start()
    queue = SpanQueue.from_url(server.url, "durable-held")
    exporter = DurableSpanExporter(queue)
    try:
        assert exporter.export(make_spans(3)) is SpanExportResult.SUCCESS
        server.kill()
        started = time.monotonic()
        for _ in range(10):
            assert exporter.export(make_spans(5)) is SpanExportResult.SUCCESS
        # Only the first write waits for the refused connection; the rest are held.
        assert time.monotonic() - started < 5
        stats = exporter.stats()
        assert (stats.held_spans, stats.dropped_spans) == (50, 0)

        server.start()
        deadline = time.monotonic() + 30
        while exporter.stats().held_spans and time.monotonic() < deadline:
            time.sleep(0.05)
        assert queue.stats().count("enqueued_spans") == 50  # the fresh Redis got all
        stats = exporter.stats()
        assert (stats.recovered_spans, stats.written_spans, stats.held_spans) == (50, 53, 0)
        messages = [r.getMessage() for r in caplog.records]
        assert sum("cannot write to the durable queue" in m for m in messages) == 1
        assert any("answers again" in m and "wrote 50 held span(s)" in m for m in messages)
    finally:
        exporter.shutdown()
        server.kill()


def test_past_the_memory_bound_the_oldest_are_dropped_counted_and_reported(
    tmp_path: Path, fresh_warnings: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_langfuse")
    server = RedisServer(tmp_path / "redis")
    server.start()
    queue = SpanQueue.from_url(server.url, "durable-bounded")
    exporter = DurableSpanExporter(queue, buffer_bytes=64 * 1024)
    try:
        server.kill()
        payload = os.urandom(10_000)  # incompressible: the bound counts stored bytes
        for i in range(20):
            exporter.write(payload + bytes([i]), spans=3)
        stats = exporter.stats()
        assert stats.held_bytes <= 64 * 1024
        # Six fit; a seventh may be on its way to Redis (the retry thread's attempt).
        assert stats.held_spans <= 3 * 7
        assert stats.held_spans + stats.dropped_spans == 60
        dropping = [
            r.getMessage() for r in caplog.records if "dropped the oldest" in r.getMessage()
        ]
        assert len(dropping) == 1, dropping  # once a minute, with the running total
        assert "so far in this process" in dropping[0]

        server.start()
        deadline = time.monotonic() + 30
        while exporter.stats().held_spans and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # a write still in flight when Redis came back settles
        counters = queue.stats()
        stored = [f[b"data"][-1] for _, f in queue.redis.xrange(queue.stream)]
        # Each batch arrived once or was counted as dropped, never both, never neither;
        # the newest six (what the bound holds) arrived. The drops are added to the
        # queue's own counters once it answers, where the operator's alert looks.
        assert len(stored) == len(set(stored))
        assert set(range(14, 20)) <= set(stored)
        assert counters.count("enqueued_spans") == 3 * len(stored)
        assert counters.count("dropped_spans") == 3 * (20 - len(stored))
        assert exporter.stats().dropped_spans == 3 * (20 - len(stored))
    finally:
        exporter.shutdown()
        server.kill()


def test_past_memory_batches_spill_to_disk_and_a_later_process_writes_them(
    tmp_path: Path, fresh_warnings: None
) -> None:
    spill = tmp_path / "spill"
    port = free_port()
    down_url = f"redis://127.0.0.1:{port}/0"
    exporter = DurableSpanExporter(
        SpanQueue.from_url(down_url, "durable-spill"),
        buffer_bytes=64 * 1024,
        spill_dir=str(spill),
        spill_max_bytes=1024 * 1024,
    )
    payload = os.urandom(10_000)
    for i in range(30):
        exporter.write(payload + bytes([i]), spans=2)
    stats = exporter.stats()
    assert stats.dropped_spans == 0
    assert stats.held_spans + stats.spilled_on_disk_spans == 60
    lost = exporter.settle_at_exit(timeout=10)  # the process exits, Redis still down
    assert lost.spans == 0
    assert len(list(spill.glob("*.otlp.gz"))) == 30
    exporter.queue.close()

    # The next process on this host (a restarted worker) finds them and writes them.
    server = RedisServer(tmp_path / "redis", port)
    server.start()
    queue = SpanQueue.from_url(server.url, "durable-spill")
    heir = DurableSpanExporter(queue, spill_dir=str(spill), spill_max_bytes=1024 * 1024)
    try:
        heir.write(payload + b"new", spans=1)  # its first batch goes straight through
        assert queue.stats().count("enqueued_spans") == 1
        heir._start_drainer()  # what a held batch would start; drains the directory too
        deadline = time.monotonic() + 30
        while list(spill.glob("*.otlp.gz*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert queue.stats().count("enqueued_spans") == 61
        stored = {f[b"data"][-1] for _, f in queue.redis.xrange(queue.stream)}
        assert set(range(30)) <= stored
    finally:
        heir.shutdown()
        server.kill()


def test_past_the_spill_bound_the_oldest_files_are_dropped_and_counted(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    exporter = DurableSpanExporter(
        SpanQueue.from_url(f"redis://127.0.0.1:{free_port()}/0", "durable-spill-bound"),
        buffer_bytes=64 * 1024,
        spill_dir=str(spill),
        spill_max_bytes=1024 * 1024,
    )
    payload = os.urandom(100_000)
    for i in range(20):
        exporter.write(payload + bytes([i]), spans=4)
    exporter.settle_at_exit(timeout=10)
    files = sorted(spill.glob("*.otlp.gz"))
    on_disk = sum(f.stat().st_size for f in files)
    assert on_disk <= 1024 * 1024
    assert len(files) == 10
    assert exporter.stats().dropped_spans == 4 * (20 - len(files))
    assert files[-1].read_bytes().endswith(bytes([19]))  # the newest are kept
    exporter.queue.close()


def test_the_forwarders_totals_line_still_appears_while_the_queue_is_down(
    tmp_path: Path, capture: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The forwarder's own totals live in its memory: with the queue's Redis gone, the
    periodic line still says what it delivered and gave up on, and what the queue had
    counted as dropped when it last answered."""
    caplog.set_level(logging.INFO, logger="celery_langfuse.forwarder")
    with redis_server(tmp_path / "queue-redis") as server:
        queue = SpanQueue.from_url(server.url, "durable-totals")
        ids = fill(queue, batches=3, spans_per_batch=4)
        queue.append(b"not gzip", spans=2, max_bytes=1024 * 1024)
        queue.add_dropped(2, 9)  # what workers reported dropping in an earlier outage
        forwarder = Forwarder(
            SpanQueue.from_url(server.url, "durable-totals"),
            LangfuseEndpoint(capture.base_url, PUBLIC_KEY, SECRET_KEY, timeout=5),
            max_backoff=0.2,
            block=0.1,
            stats_every=0.2,
        )

        def totals_lines(marker: str) -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if "since it started" in r.getMessage() and marker in r.getMessage()
            ]

        with running(forwarder):
            capture.wait_for(lambda s: forwarder.totals.corrupt_batches == 1, timeout=20)
            capture.wait_for(lambda s: totals_lines("0 batches waiting"), timeout=20)
            server.kill()
            capture.wait_for(lambda s: totals_lines("not answering"), timeout=20)
        down = totals_lines("not answering")[0]

    delivered_once(capture, ids)
    assert forwarder.totals.forwarded_spans == 12
    assert "delivered 12 spans (3 batches)" in down
    assert "gave up on 0 spans Langfuse refused (0 batches) and 1 corrupt batches" in down
    assert "9 spans dropped in all when it last answered" in down
    up = totals_lines("0 batches waiting")[0]
    assert "1 dead letters, 0 pending, 0 bytes, 9 spans dropped in all (queue and workers)" in up


def test_install_refuses_a_durable_queue_it_cannot_use(capture: CaptureServer) -> None:
    import subprocess
    import sys
    import textwrap

    require_redis()
    script = textwrap.dedent(
        """
        import sys
        from celery import Celery
        from celery_langfuse import install
        from celery_langfuse.config import ConfigurationError
        try:
            install(Celery("app"), export="durable", durable_url=sys.argv[1])
        except ConfigurationError as error:
            print(error)
        else:
            print("installed")
        """
    )

    def install_with(url: str, **env: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", script, url],
            env={**subprocess_env(capture), **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    unreachable = install_with(f"redis://:secret@127.0.0.1:{free_port()}/0")
    assert "could not reach the durable queue" in unreachable
    assert "start it, or fix the URL" in unreachable
    assert "secret" not in unreachable
    assert "must be a redis://" in install_with("kafka://127.0.0.1:9092")
    assert "could not reach" in install_with(f"amqp://guest:guest@127.0.0.1:{free_port()}//")
    assert install_with(REDIS_URL) == "installed"
    # The durable extra missing: the Redis client cannot be imported.
    blocker = Path(capture_dir := os.environ.get("TMPDIR", "/tmp")) / f"no-redis-{uuid.uuid4().hex}"
    (blocker / "redis").mkdir(parents=True)
    (blocker / "redis" / "__init__.py").write_text("raise ImportError('no redis', name='redis')\n")
    missing = install_with(
        REDIS_URL, PYTHONPATH=f"{blocker}{os.pathsep}{subprocess_env(capture)['PYTHONPATH']}"
    )
    assert "pip install 'celery-langfuse[durable]'" in missing, missing
    assert capture_dir
