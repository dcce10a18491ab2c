"""The durable span queue on RabbitMQ: chosen by an ``amqp://`` or ``amqps://`` URL.

The same promises as the Redis queue (:mod:`celery_langfuse.durable`), with
RabbitMQ's own mechanisms, through py-amqp (a dependency of Celery's kombu):

``<name>`` (e.g. ``celery-langfuse``)
    A classic durable queue, one persistent message per batch: the gzip OTLP body,
    with the span count in the ``spans`` header. Bounded by ``x-max-length-bytes``
    (``durable_max_bytes``) with ``x-overflow: drop-head``: past the bound RabbitMQ
    drops the oldest, dead-lettering them to ``<name>.dropped``.
``<name>.dropped``
    What the bound dropped, and a record of what workers dropped while they could not
    reach RabbitMQ (an empty message whose headers carry the counts). Forwarders
    consume it and discard it; each adds what it took to its own totals and logs it
    (RabbitMQ keeps no count: see docs/reliability.md for what an operator reads).
``<name>.dead``
    The dead letters: batches Langfuse refused for good or that are not a valid body,
    with ``reason`` and ``spans`` headers; capped at the newest ``DEAD_LETTER_MAX``.

Producers publish with publisher confirms: a batch counts as written only once the
broker confirmed it, else the exporter holds it and tries again. Forwarders consume
with manual acknowledgements and a prefetch of ``--batch-size``: a batch is acked
only after Langfuse answered it, so a forwarder that dies (its connection closes)
hands its unacknowledged batches back to the queue by itself, and they go to another
forwarder. Several forwarders share the queue as competing consumers.

A classic queue rather than a quorum queue: RabbitMQ 4 gives quorum queues a default
delivery limit (20), past which a batch redelivered through a long Langfuse outage
would be dropped; a classic durable queue never drops a batch for that. On a
cluster, put the queue on a node you keep (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Any, Optional
from urllib.parse import unquote, urlsplit

import amqp

from .durable import DEAD_LETTER_MAX, Batch, Dropped, QueueStats, QueueUnavailable, redact
from .durable_backlog import Counts

_CONFIRM_TIMEOUT = 10.0
#: Dropped-record messages a forwarder reads per stats call at most.
_DROPPED_PER_CALL = 10_000


class AmqpSpanQueue:
    """Every AMQP operation on one queue's three RabbitMQ queues.

    One connection per object, opened on first use and again after it failed; a
    forked child opens its own. Thread-safe (the exporter's two threads share it).
    """

    needs_claims = False
    forwarders_count_drops = True

    def __init__(self, url: str, name: str, max_bytes: Optional[int] = None) -> None:
        self.url = url
        self.name = name
        self.dropped_queue = f"{name}.dropped"
        self.dead_queue = f"{name}.dead"
        self.max_bytes = max_bytes
        self._lock = threading.RLock()
        self._connection: Optional[amqp.Connection] = None
        self._channel: Any = None
        self._pid = 0
        self._deliveries: deque[Any] = deque()
        self._consuming = False

    @classmethod
    def from_url(cls, url: str, name: str, max_bytes: Optional[int] = None) -> AmqpSpanQueue:
        """``max_bytes``: the bound a producer declares the queue with; None for a
        forwarder, which uses the queue as declared."""
        return cls(url, name, max_bytes)

    def describe(self) -> str:
        return f"{self.name!r} at {redact(self.url)}"

    # -- connection ----------------------------------------------------------------

    def _open(self) -> Any:
        """The channel, connected (and the queues declared) if it was not."""
        if self._connection is not None and self._pid != os.getpid():
            # Inherited over fork: the socket is the parent's. Forget it unclosed.
            self._connection, self._channel, self._consuming = None, None, False
            self._deliveries.clear()
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self._drop_connection()
        parts = urlsplit(self.url)
        connection = amqp.Connection(
            host=f"{parts.hostname or 'localhost'}:{parts.port or 5672}",
            userid=unquote(parts.username or "guest"),
            password=unquote(parts.password or "guest"),
            virtual_host=unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
            ssl=parts.scheme == "amqps",
            connect_timeout=2,
            read_timeout=10,
            write_timeout=10,
            # No heartbeats: a producer may stay idle for long; a dead peer shows up
            # as a failed publish or read, which the callers handle.
            heartbeat=0,
        )
        connection.connect()
        channel = connection.channel()
        channel.confirm_select()
        self._declare(channel)
        self._connection, self._channel, self._pid = connection, channel, os.getpid()
        return channel

    def _declare(self, channel: Any) -> None:
        channel.queue_declare(self.dropped_queue, durable=True, auto_delete=False,
                              arguments={"x-max-length": 1_000_000})  # fmt: skip
        channel.queue_declare(self.dead_queue, durable=True, auto_delete=False,
                              arguments={"x-max-length": DEAD_LETTER_MAX})  # fmt: skip
        if self.max_bytes is None:
            # A forwarder does not know the bound: the first producer (install())
            # declares the queue with its durable_max_bytes.
            channel.queue_declare(self.name, passive=True)
            return
        channel.queue_declare(
            self.name,
            durable=True,
            auto_delete=False,
            arguments={
                "x-queue-type": "classic",
                "x-max-length-bytes": self.max_bytes,
                "x-overflow": "drop-head",
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.dropped_queue,
            },
        )

    def _drop_connection(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._consuming = False
        self._deliveries.clear()
        if connection is not None:
            with contextlib.suppress(Exception):  # closing a broken one is best effort
                connection.close()

    def ping(self) -> None:
        """Connect and declare; :class:`QueueUnavailable` for a queue declared with
        another bound, or not declared yet (a forwarder's view)."""
        with self._lock:
            try:
                self._open()
            except amqp.exceptions.PreconditionFailed as error:
                self._drop_connection()
                raise QueueUnavailable(
                    f"the RabbitMQ queue {self.name!r} exists with other arguments ({error}): "
                    "give durable_max_bytes the value it was declared with, or delete the "
                    "queue (it holds the spans not yet forwarded)"
                ) from error
            except amqp.exceptions.NotFound as error:
                self._drop_connection()
                raise QueueUnavailable(
                    f"the RabbitMQ queue {self.name!r} does not exist yet: a worker declares "
                    "it when it starts"
                ) from error

    def close(self) -> None:
        with self._lock:
            self._drop_connection()

    # -- producer side ---------------------------------------------------------------

    def append(self, data: bytes, spans: int, max_bytes: int) -> Dropped:
        """Publish a batch and wait for the broker's confirm. RabbitMQ applies the
        bound (declared with the queue) and records what it drops in ``.dropped``."""
        with self._lock:
            try:
                self._publish(self.name, data, {"spans": spans})
            except Exception:
                self._drop_connection()
                raise
        return Dropped()

    def add_dropped(self, batches: int, spans: int) -> None:
        """Record batches a producer dropped while it could not reach RabbitMQ."""
        with self._lock:
            try:
                self._publish(self.dropped_queue, b"", {"spans": spans, "batches": batches})
            except Exception:
                self._drop_connection()
                raise

    def _publish(self, queue: str, data: bytes, headers: dict[str, Any]) -> None:
        channel = self._open()
        message = amqp.Message(
            data,
            delivery_mode=2,  # persistent
            content_type="application/x-protobuf",
            content_encoding="gzip",
            message_id=uuid.uuid4().hex,
            application_headers=headers,
        )
        channel.basic_publish(
            message, exchange="", routing_key=queue, confirm_timeout=_CONFIRM_TIMEOUT
        )

    # -- forwarder side ----------------------------------------------------------------

    def ensure_group(self) -> None:
        """Connect and start consuming (the prefetch is set by the first read)."""
        with self._lock:
            self._open()

    def read_new(self, consumer: str, count: int, block_seconds: float) -> list[Batch]:
        with self._lock:
            try:
                channel = self._open()
                if not self._consuming:
                    channel.basic_qos(prefetch_size=0, prefetch_count=count, a_global=False)
                    channel.basic_consume(
                        self.name,
                        consumer_tag=f"{consumer}-{uuid.uuid4().hex[:6]}",
                        no_ack=False,
                        callback=self._deliveries.append,
                    )
                    self._consuming = True
                timeout = block_seconds
                while len(self._deliveries) < count:
                    try:
                        channel.connection.drain_events(timeout=timeout)
                    except socket.timeout:
                        break
                    timeout = 0.001  # then only what already arrived
                batches: list[Batch] = []
                while self._deliveries and len(batches) < count:
                    batches.append(self._batch(self._deliveries.popleft()))
                return batches
            except Exception:
                self._drop_connection()
                raise

    def read_own_pending(self, consumer: str, count: int) -> list[Batch]:
        return []  # a dead consumer's deliveries return to the queue by themselves

    def claim_abandoned(self, consumer: str, idle_seconds: float, count: int) -> list[Batch]:
        return []

    def renew(self, consumer: str, batch: Batch) -> bool:
        """Whether ``batch`` is still this forwarder's: it came on the current channel
        and the broker still answers on it (one round trip). If the broker went away
        meanwhile, it puts the batch back in the queue when it returns, and sending it
        now would only send it twice."""
        with self._lock:
            channel = self._channel
            if batch.tag is None or batch.tag[0] is not channel or not channel.is_open:
                return False
            try:
                channel.queue_declare(self.name, passive=True)
            except Exception:
                self._drop_connection()
                return False
            return True

    def _holds(self, batch: Batch) -> bool:
        channel = self._channel
        return batch.tag is not None and batch.tag[0] is channel and bool(channel.is_open)

    def settle(self, batch: Batch, outcome: str, reason: str = "") -> bool:
        with self._lock:
            if not self._holds(batch):
                return False
            try:
                if outcome != "forwarded":
                    headers = {"reason": reason[:500], "spans": batch.spans, "outcome": outcome,
                               "original-id": batch.id}  # fmt: skip
                    self._publish(self.dead_queue, batch.data, headers)
                self._channel.basic_ack(batch.tag[1])
            except Exception:
                self._drop_connection()
                raise
            return True

    def split(self, batch: Batch, parts: Sequence[tuple[bytes, int]]) -> bool:
        """Publish ``parts`` (confirmed), then ack ``batch``. A forwarder dying between
        the two leaves both: the spans are sent twice, and Langfuse keeps one
        observation per span id."""
        with self._lock:
            if not self._holds(batch):
                return False
            try:
                for data, spans in parts:
                    self._publish(self.name, data, {"spans": spans})
                self._channel.basic_ack(batch.tag[1])
            except Exception:
                self._drop_connection()
                raise
            return True

    def housekeeping(self, consumer: str) -> Dropped:
        """Take (and discard) what ``.dropped`` holds: the drops, for the forwarder to
        count; RabbitMQ keeps no count of its own. (It forgets a consumer when its
        channel closes, so nothing else to do.)"""
        taken = Counts()
        with self._lock:
            try:
                self._take_dropped(self._open(), taken)
            except Exception:
                self._drop_connection()
                if not taken.batches:
                    raise
                # Taken off the broker already: count them; the next call meets the error.
        return Dropped(taken.batches, taken.spans)

    def stats(self) -> QueueStats:
        """Ready batches of the queue, dead letters, and the drop records not yet
        taken by a forwarder (``uncounted_drops``)."""
        with self._lock:
            try:
                channel = self._open()
                _, uncounted, _ = channel.queue_declare(self.dropped_queue, passive=True)
                _, ready, consumers = channel.queue_declare(self.name, passive=True)
                _, dead, _ = channel.queue_declare(self.dead_queue, passive=True)
            except Exception:
                self._drop_connection()
                raise
        counters = dict(dead_letter_batches=dead, consumers=consumers, uncounted_drops=uncounted)
        return QueueStats(batches=ready, bytes=0, pending=0, counters=counters)

    def _take_dropped(self, channel: Any, taken: Counts) -> None:
        for _ in range(_DROPPED_PER_CALL):
            message = channel.basic_get(self.dropped_queue, no_ack=True)
            if message is None:
                return
            headers = message.properties.get("application_headers") or {}
            taken.add(int(headers.get("batches", 1)), int(headers.get("spans", 0)))

    def _batch(self, message: Any) -> Batch:
        headers = message.properties.get("application_headers") or {}
        try:
            spans = int(headers.get("spans", 0))
        except (TypeError, ValueError):
            spans = 0
        body = message.body if isinstance(message.body, bytes) else bytes(message.body or b"")
        tag = (self._channel, message.delivery_info["delivery_tag"])
        batch_id = message.properties.get("message_id") or str(tag[1])
        return Batch(str(batch_id), body, spans, tag)
