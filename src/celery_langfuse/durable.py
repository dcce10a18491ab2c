"""The durable span queue: finished spans wait in Redis until Langfuse has them.

In durable mode (``install(app, export="durable", durable_url="redis://...")``) the
Langfuse SDK still collects finished spans on its exporter thread, but hands each batch
to :class:`DurableSpanExporter`, which encodes it as the request Langfuse's OTLP
endpoint accepts (protobuf, gzip) and appends it to a Redis stream. Forwarders
(``celery-langfuse forward``, :mod:`celery_langfuse.forwarder`) send the entries to
Langfuse and delete each one only after Langfuse answered 2xx. A Langfuse outage then
costs nothing but queue space; tasks never wait on it, nor on Redis.

Redis layout for the queue named ``celery-langfuse`` (the braces are a Redis Cluster
hash tag: every key of one queue lives on one node):

``{celery-langfuse}:batches``
    A stream, one entry per batch: ``data`` (a gzip-compressed OTLP
    ``ExportTraceServiceRequest``, ready to POST) and ``spans`` (how many it holds).
``{celery-langfuse}:stats``
    A hash of counters: ``bytes`` (payload bytes in the stream, what the bound
    counts), ``enqueued_*``, ``forwarded_*``, ``dropped_*`` (removed to respect the
    bound) and ``rejected_*`` (refused by Langfuse for good), each ``_batches`` and
    ``_spans``, and ``enqueued_bytes``.

Claim and acknowledge: the forwarders are the stream's consumer group ``forwarders``.
``XREADGROUP`` hands each entry to exactly one forwarder, where it stays pending until
that forwarder settles it (``XACK`` and ``XDEL`` in one script). An entry pending
longer than the claim timeout belongs to a forwarder that died; another one takes it
over with ``XAUTOCLAIM``. A forwarder retrying through an outage renews its claim
while it waits, so its entry never looks abandoned.

Bound: appending a batch first deletes the oldest entries until the payload bytes
held, the new batch included, fit in ``max_bytes``, and counts them as dropped. The
queue never outgrows its bound, and after a long outage the newest data is kept.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from redis import Redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ResponseError
from redis.retry import Retry

from .logs import warn_rate_limited

log = logging.getLogger(__name__)

DEFAULT_QUEUE = "celery-langfuse"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
GROUP = "forwarders"

# A moderate level: most of gzip's gain at a fraction of level 9's cost, on the
# exporter thread of every worker process.
_GZIP_LEVEL = 6

_FIELDS = """
local function sizes(fields)
  local bytes, spans = 0, 0
  for i = 1, #fields, 2 do
    if fields[i] == 'data' then bytes = string.len(fields[i + 1])
    elseif fields[i] == 'spans' then spans = tonumber(fields[i + 1]) or 0 end
  end
  return bytes, spans
end
"""

# KEYS: stream, stats. ARGV: payload, span count, max bytes.
# Returns {dropped batches, dropped spans}.
_APPEND = (
    _FIELDS
    + """
local size, spans, max = string.len(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if size > max then
  redis.call('HINCRBY', KEYS[2], 'dropped_batches', 1)
  redis.call('HINCRBY', KEYS[2], 'dropped_spans', spans)
  return {1, spans}
end
local held = math.max(tonumber(redis.call('HGET', KEYS[2], 'bytes') or '0'), 0)
local dropped_batches, dropped_spans = 0, 0
while held + size > max do
  local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if #oldest == 0 then held = 0 break end
  local bytes, n = sizes(oldest[1][2])
  redis.call('XDEL', KEYS[1], oldest[1][1])
  held = held - bytes
  dropped_batches = dropped_batches + 1
  dropped_spans = dropped_spans + n
end
redis.call('XADD', KEYS[1], '*', 'data', ARGV[1], 'spans', spans)
redis.call('HSET', KEYS[2], 'bytes', held + size)
redis.call('HINCRBY', KEYS[2], 'enqueued_batches', 1)
redis.call('HINCRBY', KEYS[2], 'enqueued_spans', spans)
redis.call('HINCRBY', KEYS[2], 'enqueued_bytes', size)
if dropped_batches > 0 then
  redis.call('HINCRBY', KEYS[2], 'dropped_batches', dropped_batches)
  redis.call('HINCRBY', KEYS[2], 'dropped_spans', dropped_spans)
end
return {dropped_batches, dropped_spans}
"""
)

# KEYS: stream, stats. ARGV: group, entry id, outcome ("forwarded" or "rejected").
# Returns 1 when this call removed the entry, 0 when it was gone already (dropped by
# the bound, or settled by a forwarder that had taken it over).
_SETTLE = (
    _FIELDS
    + """
local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if #entry == 0 then return 0 end
local bytes, spans = sizes(entry[1][2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], 'bytes', -bytes)
redis.call('HINCRBY', KEYS[2], ARGV[3] .. '_batches', 1)
redis.call('HINCRBY', KEYS[2], ARGV[3] .. '_spans', spans)
return 1
"""
)

# KEYS: stream. ARGV: group, entry id, consumer.
# Resets the entry's idle time if ``consumer`` still holds it and it still exists;
# returns 1 then, else 0 (and forgets an entry the bound deleted).
_RENEW = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[3])
if #pending == 0 then return 0 end
if #redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2]) == 0 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return 0
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
"""


@dataclass(frozen=True)
class Batch:
    """One queue entry: an OTLP export request, gzip-compressed, ready to POST."""

    id: str
    data: bytes
    spans: int


@dataclass(frozen=True)
class Dropped:
    """What appending a batch removed to stay within the bound."""

    batches: int = 0
    spans: int = 0


@dataclass(frozen=True)
class QueueStats:
    """A snapshot of one queue, for logs, monitoring and tests."""

    batches: int
    bytes: int
    pending: int
    counters: dict[str, int]

    def count(self, name: str) -> int:
        """A counter of the stats hash, e.g. ``"dropped_spans"``; 0 when never set."""
        return self.counters.get(name, 0)


class SpanQueue:
    """The Redis side of durable mode: every command that touches the queue's keys."""

    def __init__(self, redis: Redis, name: str = DEFAULT_QUEUE) -> None:
        self.redis = redis
        self.name = name
        self.stream = f"{{{name}}}:batches"
        self.stats_key = f"{{{name}}}:stats"
        self._append = redis.register_script(_APPEND)
        self._settle = redis.register_script(_SETTLE)
        self._renew = redis.register_script(_RENEW)
        self._claim_cursor = "0-0"

    @classmethod
    def from_url(cls, url: str, name: str = DEFAULT_QUEUE) -> SpanQueue:
        """A queue on the Redis at ``url``, with timeouts so that no caller hangs on an
        unreachable Redis, and a short retry for a dropped connection."""
        redis = Redis.from_url(
            url,
            socket_timeout=5,
            socket_connect_timeout=2,
            health_check_interval=30,
            retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.1), 2),
        )
        return cls(redis, name)

    def close(self) -> None:
        self.redis.close()

    # -- producer side --------------------------------------------------------------

    def append(self, data: bytes, spans: int, max_bytes: int) -> Dropped:
        """Add a batch, first dropping the oldest ones as the bound requires."""
        batches, dropped_spans = self._append(
            keys=[self.stream, self.stats_key], args=[data, spans, max_bytes]
        )
        return Dropped(int(batches), int(dropped_spans))

    # -- forwarder side -------------------------------------------------------------

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) unless they exist."""
        try:
            self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def read_new(self, consumer: str, count: int, block_seconds: float) -> list[Batch]:
        """Entries no forwarder has seen, now pending for ``consumer``."""
        reply = self.redis.xreadgroup(
            GROUP, consumer, {self.stream: ">"}, count=count, block=int(block_seconds * 1000)
        )
        return self._batches(_entries(reply))

    def read_own_pending(self, consumer: str, count: int) -> list[Batch]:
        """Entries already pending for ``consumer``: what a forwarder restarted under
        the same name had not settled."""
        reply = self.redis.xreadgroup(GROUP, consumer, {self.stream: "0"}, count=count)
        return self._batches(_entries(reply))

    def claim_abandoned(self, consumer: str, idle_seconds: float, count: int) -> list[Batch]:
        """Take over entries pending for longer than ``idle_seconds``: their forwarder
        died or hangs. Entries the bound deleted meanwhile leave the pending list."""
        # A cursor, so that entries behind a long run of live ones are reached too.
        reply = self.redis.xautoclaim(
            self.stream,
            GROUP,
            consumer,
            int(idle_seconds * 1000),
            start_id=self._claim_cursor,
            count=count,
        )
        self._claim_cursor = _text(reply[0])
        return self._batches(reply[1])

    def renew(self, consumer: str, batch: Batch) -> bool:
        """Renew ``consumer``'s claim on ``batch``; False when the batch is no longer
        its to send (the bound dropped it, or another forwarder took it over)."""
        return bool(self._renew(keys=[self.stream], args=[GROUP, batch.id, consumer]))

    def settle(self, batch: Batch, outcome: str) -> bool:
        """Remove a batch Langfuse accepted (``"forwarded"``) or will never accept
        (``"rejected"``). False when it was gone already."""
        return bool(
            self._settle(keys=[self.stream, self.stats_key], args=[GROUP, batch.id, outcome])
        )

    def forget_idle_consumers(self, idle_seconds: float, keep: str) -> list[str]:
        """Remove consumers with nothing pending, idle for ``idle_seconds``: the names
        of forwarders that exited. Returns the names removed."""
        removed = []
        for info in self.redis.xinfo_consumers(self.stream, GROUP):
            name = _text(info["name"])
            if name != keep and info["pending"] == 0 and info["idle"] >= idle_seconds * 1000:
                self.redis.xgroup_delconsumer(self.stream, GROUP, name)
                removed.append(name)
        return removed

    def stats(self) -> QueueStats:
        counters = {_text(k): int(v) for k, v in self.redis.hgetall(self.stats_key).items()}
        try:
            groups = self.redis.xinfo_groups(self.stream)
        except ResponseError:  # no stream yet
            groups = []
        pending = sum(int(g["pending"]) for g in groups if _text(g["name"]) == GROUP)
        return QueueStats(self.redis.xlen(self.stream), counters.get("bytes", 0), pending, counters)

    def _batches(self, entries: Sequence[Any]) -> list[Batch]:
        batches = []
        for entry_id, fields in entries:
            batch_id = _text(entry_id)
            if not fields or b"data" not in fields:
                # Deleted (dropped by the bound) while pending, or not ours to read:
                # nothing to send, so it leaves the pending list.
                self.redis.xack(self.stream, GROUP, batch_id)
                continue
            batches.append(Batch(batch_id, fields[b"data"], int(fields.get(b"spans", 0))))
        return batches


class DurableSpanExporter(SpanExporter):
    """An OpenTelemetry exporter that appends each batch of spans to a :class:`SpanQueue`.

    Runs on the SDK's exporter thread, never in a task. A Redis fault loses that batch
    and logs a rate-limited warning; it never raises.
    """

    def __init__(self, queue: SpanQueue, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.queue = queue
        self.max_bytes = max_bytes

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        try:
            request = encode_spans(spans).SerializePartialToString()
            dropped = self.queue.append(
                gzip.compress(request, compresslevel=_GZIP_LEVEL), len(spans), self.max_bytes
            )
        except Exception:
            warn_rate_limited(
                log,
                "durable-append",
                "celery-langfuse: could not write %d span(s) to the durable queue %r; "
                "they are lost",
                len(spans),
                self.queue.name,
            )
            return SpanExportResult.FAILURE
        if dropped.batches:
            warn_rate_limited(
                log,
                "durable-full",
                "celery-langfuse: durable queue %r is full (%d bytes): dropped its oldest "
                "%d batch(es), %d span(s); are the forwarders running and Langfuse up?",
                self.queue.name,
                self.max_bytes,
                dropped.batches,
                dropped.spans,
            )
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.queue.close()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True  # nothing is buffered here: export() writes through


def _entries(reply: Any) -> Sequence[Any]:
    """The entries of a one-stream XREADGROUP reply (a list in RESP2, a dict in RESP3)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return next(iter(reply.values()))  # type: ignore[no-any-return]
    return reply[0][1]  # type: ignore[no-any-return]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
