"""The durable span queue: finished spans wait in Redis or RabbitMQ until Langfuse has them.

In durable mode (``install(app, export="durable", durable_url=...)``) the Langfuse SDK
still collects finished spans on its exporter thread, but hands each batch to
:class:`DurableSpanExporter`, which encodes it as the request Langfuse's OTLP endpoint
accepts (protobuf, gzip) and appends it to the queue. Forwarders (``celery-langfuse
forward``, :mod:`celery_langfuse.forwarder`) send the entries to Langfuse and remove
each one only once Langfuse answered it (docs/reliability.md says which answers).

This module owns the exporter, the queue interface the forwarder uses
(:class:`DurableQueue`), its Redis implementation (:class:`SpanQueue`) and
:func:`open_queue`, which picks the engine from the URL: ``redis://``, ``rediss://``,
``unix://`` (Redis), ``redis+cluster://``, ``rediss+cluster://`` (Redis Cluster),
``amqp://``, ``amqps://`` (RabbitMQ, :mod:`celery_langfuse.durable_amqp`).

When the queue does not answer, the exporter keeps what it could not write in a
bounded :class:`~celery_langfuse.durable_backlog.Backlog` (memory, then an optional
directory) and a thread of its own writes it once the queue answers again. Tasks never
wait on any of it, and whatever the bounds drop is counted and logged with the
running total.

Redis layout for the queue named ``celery-langfuse`` (the braces are a Redis Cluster
hash tag: every key of one queue lives on one node):

``{celery-langfuse}:batches``
    A stream, one entry per batch: ``data`` (a gzip-compressed OTLP
    ``ExportTraceServiceRequest``, ready to POST) and ``spans`` (how many it holds).
``{celery-langfuse}:dead``
    A stream of the entries moved aside: Langfuse refused them for good (400, 422, or
    413 for a single span) or they are not a valid body. Each keeps ``data``,
    ``spans``, ``reason`` and the original ``id``; capped at the newest
    ``DEAD_LETTER_MAX`` entries.
``{celery-langfuse}:stats``
    A hash of counters: ``bytes`` (payload bytes in the stream, what the bound
    counts), ``enqueued_*``, ``forwarded_*``, ``dropped_*`` (removed to respect a
    bound: the queue's, or a worker's backlog while the queue was down, reported
    once it answers again), ``rejected_*`` (refused by Langfuse for good),
    ``corrupt_*`` (not a valid body) and ``split_*`` (413: replaced by two halves),
    each ``_batches`` and ``_spans``, and ``enqueued_bytes``.

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

import atexit
import contextlib
import gzip
import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol
from urllib.parse import urlsplit, urlunsplit

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from .durable_backlog import Backlog, Counts, SpillDir
from .logs import warn_rate_limited

log = logging.getLogger(__name__)

DEFAULT_QUEUE = "celery-langfuse"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_BUFFER_BYTES = 16 * 1024 * 1024
DEFAULT_SPILL_MAX_BYTES = 1024 * 1024 * 1024
GROUP = "forwarders"
#: Seconds after which a consumer with nothing pending is forgotten (Redis).
FORGET_CONSUMERS_AFTER = 3600.0
#: Entries the dead-letter stream keeps at most (the newest).
DEAD_LETTER_MAX = 10_000

REDIS_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
AMQP_SCHEMES = ("amqp", "amqps")
SCHEMES = REDIS_SCHEMES + CLUSTER_SCHEMES + AMQP_SCHEMES

# A moderate level: most of gzip's gain at a fraction of level 9's cost, on the
# exporter thread of every worker process.
_GZIP_LEVEL = 6
#: Seconds between attempts to write the backlog while the queue does not answer.
RETRY_SECONDS = (0.2, 5.0)
#: How long a process about to exit may spend writing its backlog to the queue.
_EXIT_DRAIN_SECONDS = 2.0


class QueueUnavailable(Exception):
    """The durable queue cannot be used: unreachable, or its client library missing."""


@dataclass(frozen=True)
class Batch:
    """One queue entry: an OTLP export request, gzip-compressed, ready to POST.
    ``tag`` is the engine's handle on it (a RabbitMQ delivery tag)."""

    id: str
    data: bytes
    spans: int
    tag: Any = None


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
        """A counter, e.g. ``"dropped_spans"``; 0 when never set."""
        return self.counters.get(name, 0)


class DurableQueue(Protocol):
    """What the exporter and the forwarder need of a queue engine.

    ``settle`` outcomes: ``"forwarded"`` (Langfuse took it), ``"rejected"`` (refused
    for good) and ``"corrupt"`` (not a valid body); the last two keep a copy in the
    dead-letter stream or queue. ``housekeeping`` is a forwarder's periodic chores; it
    returns the drops it took off the queue's drop record, for the forwarder to count
    (nothing where the queue counts its drops itself).
    """

    name: str
    #: Whether a batch taken by a forwarder that died must be claimed explicitly
    #: (Redis), or returns to the queue by itself (RabbitMQ).
    needs_claims: bool
    #: Whether what the queue dropped is counted by the forwarders, each its own share
    #: since it started (RabbitMQ: see ``housekeeping``), or by the queue itself, one
    #: count that outlives every process (Redis: ``dropped_*`` in its stats).
    forwarders_count_drops: bool

    def describe(self) -> str: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...
    def append(self, data: bytes, spans: int, max_bytes: int) -> Dropped: ...
    def add_dropped(self, batches: int, spans: int) -> None: ...
    def ensure_group(self) -> None: ...
    def read_new(self, consumer: str, count: int, block_seconds: float) -> list[Batch]: ...
    def read_own_pending(self, consumer: str, count: int) -> list[Batch]: ...
    def claim_abandoned(self, consumer: str, idle_seconds: float, count: int) -> list[Batch]: ...
    def renew(self, consumer: str, batch: Batch) -> bool: ...
    def settle(self, batch: Batch, outcome: str, reason: str = "") -> bool: ...
    def split(self, batch: Batch, parts: Sequence[tuple[bytes, int]]) -> bool: ...
    def housekeeping(self, consumer: str) -> Dropped: ...
    def stats(self) -> QueueStats: ...


def open_queue(
    url: str, name: str = DEFAULT_QUEUE, max_bytes: Optional[int] = None
) -> DurableQueue:
    """The queue at ``url``, on the engine its scheme names. Connects lazily.
    ``max_bytes``: a producer's bound, which RabbitMQ declares with the queue (Redis
    applies it on every append instead); None for a forwarder.

    Raises :class:`QueueUnavailable` when the engine's client library is missing,
    ValueError for a scheme no engine serves.
    """
    scheme = urlsplit(url).scheme.lower()
    try:  # what the exporter encodes with, whatever the engine
        from opentelemetry.exporter.otlp.proto.common import trace_encoder  # noqa: F401
    except ImportError as error:
        raise QueueUnavailable(_missing_extra(error)) from error
    if scheme in AMQP_SCHEMES:
        try:
            from .durable_amqp import AmqpSpanQueue
        except ImportError as error:
            raise QueueUnavailable(_missing_extra(error)) from error
        return AmqpSpanQueue.from_url(url, name, max_bytes)
    if scheme in REDIS_SCHEMES or scheme in CLUSTER_SCHEMES:
        try:
            import redis  # noqa: F401
        except ImportError as error:
            raise QueueUnavailable(_missing_extra(error)) from error
        return SpanQueue.from_url(url, name)
    raise ValueError(f"no durable queue engine serves {scheme!r} URLs")


def check_url(url: str, name: str = DEFAULT_QUEUE, max_bytes: Optional[int] = None) -> None:
    """Connect to the queue at ``url`` once, as ``install()`` does; raise
    :class:`QueueUnavailable` saying what to do when that fails."""
    try:
        queue = open_queue(url, name, max_bytes)
    except ValueError as error:
        raise QueueUnavailable(str(error)) from error
    try:
        queue.ping()
    except QueueUnavailable:
        raise
    except Exception as error:
        raise QueueUnavailable(
            f"could not reach the durable queue at {redact(url)} "
            f"({type(error).__name__}: {error}); start it, or fix the URL"
        ) from error
    finally:
        queue.close()


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))


def _missing_extra(error: ImportError) -> str:
    return (
        f"the durable queue needs {error.name or 'a client library'}, which is not "
        "installed: pip install 'celery-langfuse[durable]'"
    )


# -- Redis ---------------------------------------------------------------------------

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

# Settling or splitting one entry (KEYS[1] the stream, ARGV[1] the group, ARGV[2] the
# entry id) starts alike: read it, acknowledge it, 0 if it is gone, its sizes.
_TAKE = (
    _FIELDS
    + """
local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if #entry == 0 then return 0 end
local bytes, spans = sizes(entry[1][2])
"""
)

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

# KEYS: stream, stats, dead-letter stream. ARGV: group, entry id, outcome, reason,
# dead-letter cap. Outcomes other than "forwarded" keep a copy in the dead-letter
# stream. Returns 1 when this call removed the entry, 0 when it was gone already
# (dropped by the bound, or settled by a forwarder that had taken it over).
_SETTLE = (
    _TAKE
    + """
if ARGV[3] ~= 'forwarded' then
  local copy = {'MAXLEN', '~', ARGV[5], '*', 'id', ARGV[2], 'reason', ARGV[4]}
  for i = 1, #entry[1][2] do copy[#copy + 1] = entry[1][2][i] end
  redis.call('XADD', KEYS[3], unpack(copy))
end
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], 'bytes', 0 - bytes)  -- not -bytes: -0 is no integer
redis.call('HINCRBY', KEYS[2], ARGV[3] .. '_batches', 1)
redis.call('HINCRBY', KEYS[2], ARGV[3] .. '_spans', spans)
return 1
"""
)

# KEYS: stream, stats. ARGV: group, entry id, then payload and span count of each part.
# Replaces an entry by its parts, atomically; 0 when the entry was gone already.
_SPLIT = (
    _TAKE
    + """
local added = 0
for i = 3, #ARGV, 2 do
  redis.call('XADD', KEYS[1], '*', 'data', ARGV[i], 'spans', ARGV[i + 1])
  added = added + string.len(ARGV[i])
end
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], 'bytes', added - bytes)
redis.call('HINCRBY', KEYS[2], 'split_batches', 1)
redis.call('HINCRBY', KEYS[2], 'split_spans', spans)
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


class SpanQueue:
    """The Redis (or Redis Cluster) engine: every command that touches the queue's keys."""

    needs_claims = True
    forwarders_count_drops = False

    def __init__(self, redis: Any, name: str = DEFAULT_QUEUE, url: str = "") -> None:
        self.redis = redis
        self.name = name
        self.url = url
        self.stream = f"{{{name}}}:batches"
        self.stats_key = f"{{{name}}}:stats"
        self.dead_key = f"{{{name}}}:dead"
        self._append = redis.register_script(_APPEND)
        self._settle = redis.register_script(_SETTLE)
        self._split = redis.register_script(_SPLIT)
        self._renew = redis.register_script(_RENEW)
        self._claim_cursor = "0-0"

    @classmethod
    def from_url(cls, url: str, name: str = DEFAULT_QUEUE) -> SpanQueue:
        """A queue on the Redis (``redis+cluster://``: the Redis Cluster) at ``url``,
        with timeouts so that no caller hangs on an unreachable Redis, and a short
        retry for a dropped connection."""
        from redis import Redis
        from redis.backoff import ExponentialWithJitterBackoff
        from redis.retry import Retry

        options: dict[str, Any] = dict(socket_timeout=5, socket_connect_timeout=2)
        scheme, _, rest = url.partition("://")
        if scheme.lower() in CLUSTER_SCHEMES:
            from redis.cluster import RedisCluster

            client: Any = RedisCluster.from_url(
                scheme.lower().replace("+cluster", "") + "://" + rest,
                retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.1), 2),
                **options,
            )
        else:
            client = Redis.from_url(
                url,
                health_check_interval=30,
                retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.1), 2),
                **options,
            )
        return cls(client, name, url)

    def describe(self) -> str:
        return f"{self.name!r} at {redact(self.url)}" if self.url else repr(self.name)

    def ping(self) -> None:
        """Raise unless Redis answers; :class:`QueueUnavailable` for a cluster node
        addressed as a single Redis."""
        self.redis.ping()
        if self.needs_cluster_client():
            raise QueueUnavailable(
                f"{redact(self.url)} is a Redis Cluster node: use a redis+cluster:// "
                "(or rediss+cluster://) URL, so that the queue is found on whichever "
                "node holds it"
            )

    def needs_cluster_client(self) -> bool:
        from redis.cluster import RedisCluster

        if isinstance(self.redis, RedisCluster):
            return False
        info = self.redis.info("cluster")
        return bool(info.get("cluster_enabled"))

    def close(self) -> None:
        self.redis.close()

    # -- producer side --------------------------------------------------------------

    def append(self, data: bytes, spans: int, max_bytes: int) -> Dropped:
        """Add a batch, first dropping the oldest ones as the bound requires."""
        batches, dropped_spans = self._append(
            keys=[self.stream, self.stats_key], args=[data, spans, max_bytes]
        )
        return Dropped(int(batches), int(dropped_spans))

    def add_dropped(self, batches: int, spans: int) -> None:
        """Count batches a producer dropped while it could not reach the queue."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(self.stats_key, "dropped_batches", batches)
        pipe.hincrby(self.stats_key, "dropped_spans", spans)
        pipe.execute()

    # -- forwarder side -------------------------------------------------------------

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) unless they exist."""
        from redis.exceptions import ResponseError

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

    def settle(self, batch: Batch, outcome: str, reason: str = "") -> bool:
        """Remove a batch: Langfuse accepted it (``"forwarded"``), or it goes to the
        dead-letter stream (``"rejected"``, ``"corrupt"``). False when it was gone."""
        return bool(
            self._settle(
                keys=[self.stream, self.stats_key, self.dead_key],
                args=[GROUP, batch.id, outcome, reason[:500], DEAD_LETTER_MAX],
            )
        )

    def split(self, batch: Batch, parts: Sequence[tuple[bytes, int]]) -> bool:
        """Replace ``batch`` by ``parts`` (payload, span count), atomically."""
        args: list[Any] = [GROUP, batch.id]
        for data, spans in parts:
            args += [data, spans]
        return bool(self._split(keys=[self.stream, self.stats_key], args=args))

    def housekeeping(self, consumer: str) -> Dropped:
        """A forwarder's periodic chores: forget the consumers of forwarders that
        exited. Drops are counted in the stats hash as they happen: none to return."""
        self.forget_idle_consumers(FORGET_CONSUMERS_AFTER, keep=consumer)
        return Dropped()

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
        from redis.exceptions import ResponseError

        counters = {_text(k): int(v) for k, v in self.redis.hgetall(self.stats_key).items()}
        try:
            groups = self.redis.xinfo_groups(self.stream)
        except ResponseError:  # no stream yet
            groups = []
        pending = sum(int(g["pending"]) for g in groups if _text(g["name"]) == GROUP)
        counters["dead_letter_batches"] = int(self.redis.xlen(self.dead_key))
        return QueueStats(self.redis.xlen(self.stream), counters.get("bytes", 0), pending, counters)

    def _batches(self, entries: Sequence[Any]) -> list[Batch]:
        batches = []
        for entry_id, fields in entries:
            batch_id = _text(entry_id)
            if not fields:
                # Deleted (dropped by the bound) while pending: nothing to send, so
                # it leaves the pending list.
                self.redis.xack(self.stream, GROUP, batch_id)
                continue
            try:
                spans = int(fields.get(b"spans", 0))
            except ValueError:
                spans = 0  # the forwarder finds the body corrupt and moves it aside
            batches.append(Batch(batch_id, fields.get(b"data", b""), spans))
        return batches


# -- the exporter ----------------------------------------------------------------------


@dataclass(frozen=True)
class ExporterStats:
    """One process's durable exporter, for logs, monitoring and tests."""

    #: Batches and spans written to the queue.
    written_batches: int
    written_spans: int
    #: Held now because the queue did not answer: in memory, and in the spill directory
    #: (every process of the host).
    held_spans: int
    held_bytes: int
    spilled_on_disk_spans: int
    #: Removed to respect a bound, since the process started: the backlog's bounds,
    #: and the queue's bound when this process's write made room.
    dropped_spans: int
    #: Written after being held: recovered from an outage.
    recovered_spans: int
    #: Seconds the queue has not answered; 0 while it does.
    outage_seconds: float


class DurableSpanExporter(SpanExporter):
    """An OpenTelemetry exporter that appends each batch of spans to a durable queue.

    Runs on the SDK's exporter thread, never in a task. While the queue does not
    answer, batches wait in a bounded backlog and a thread of this exporter writes
    them once it answers; ``export`` then never touches the network. Never raises.
    """

    def __init__(
        self,
        queue: DurableQueue,
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        spill_dir: Optional[str] = None,
        spill_max_bytes: int = DEFAULT_SPILL_MAX_BYTES,
    ) -> None:
        self.queue = queue
        self.max_bytes = max_bytes
        spill = SpillDir(spill_dir, spill_max_bytes) if spill_dir else None
        self.backlog = Backlog(buffer_bytes, spill)
        self._reset()
        _exporters.add(self)
        _register_exit_hooks()
        os.register_at_fork(after_in_child=self._after_fork)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._drainer: Optional[threading.Thread] = None
        self._down_since: Optional[float] = None
        self._closed = False
        self.written = Counts()
        self.recovered = Counts()
        self.queue_dropped = Counts()
        #: Drops not yet added to the queue's own counters.
        self._unreported = Counts()

    def _after_fork(self) -> None:
        # The parent still holds (and will write) what its memory holds; a child
        # starts empty. The spill directory is shared: files are taken atomically.
        self._reset()
        self.backlog.reset()
        self.backlog.dropped = Counts()
        self.backlog.spilled = Counts()

    # -- the SDK's exporter thread ------------------------------------------------------

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        try:
            from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

            request = encode_spans(spans).SerializePartialToString()
            data = gzip.compress(request, compresslevel=_GZIP_LEVEL)
        except Exception:
            warn_rate_limited(
                log,
                "durable-encode",
                "celery-langfuse: could not encode %d span(s) for the durable queue; they are lost",
                len(spans),
            )
            self.backlog.dropped.add(1, len(spans))
            return SpanExportResult.FAILURE
        self.write(data, len(spans))
        return SpanExportResult.SUCCESS

    def write(self, data: bytes, spans: int) -> None:
        """Append one encoded batch, or hold it while the queue does not answer."""
        with self._lock:
            holding = self._drainer is not None
        if not holding:
            try:
                self._append(data, spans)
                return
            except Exception as error:
                self._outage_started(error)
        self._hold(data, spans)
        if self._closed:  # exiting: no thread will write it; keep it on disk or count it
            self._spill_lost()

    def _append(self, data: bytes, spans: int) -> None:
        dropped = self.queue.append(data, spans, self.max_bytes)
        self.written.add(1, spans)
        if dropped.batches:
            self.queue_dropped.add(dropped.batches, dropped.spans)
            warn_rate_limited(
                log,
                "durable-full",
                "celery-langfuse: durable queue %s is full (%d bytes): dropped its oldest "
                "%d batch(es), %d span(s); %d dropped by this process so far. Are the "
                "forwarders running and Langfuse up?",
                self.queue.describe(),
                self.max_bytes,
                dropped.batches,
                dropped.spans,
                self.queue_dropped.spans,
            )

    def _hold(self, data: bytes, spans: int) -> None:
        before = self.backlog.dropped.spans
        self.backlog.add(data, spans)
        if self.backlog.dropped.spans > before:
            self._warn_dropping()
        self._start_drainer()

    def _start_drainer(self) -> None:
        with self._lock:
            if self._drainer is None and not self._closed:
                self._drainer = threading.Thread(
                    target=self._drain_until_empty, name="celery-langfuse-durable", daemon=True
                )
                self._drainer.start()

    def _outage_started(self, error: BaseException) -> None:
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
        spill = self.backlog.spill
        log.warning(
            "celery-langfuse: cannot write to the durable queue %s (%s: %s). Holding spans "
            "in this process (up to %d bytes in memory%s) and retrying; tasks are not "
            "affected. Past that bound the oldest are dropped and counted. Check that "
            "the queue's server is running and reachable from this host.",
            self.queue.describe(),
            type(error).__name__,
            error,
            self.backlog.max_bytes,
            f", then up to {spill.max_bytes} bytes in {spill.path}" if spill else "",
        )

    def _warn_dropping(self) -> None:
        held = self.backlog.in_memory()
        warn_rate_limited(
            log,
            "durable-backlog-full",
            "celery-langfuse: the durable queue %s has not answered for %.0f s; holding "
            "%d span(s) in memory and %d on disk; dropped the oldest: %d span(s) so far "
            "in this process. Raise durable_buffer_bytes or set durable_spill_dir to "
            "hold more.",
            self.queue.describe(),
            self.outage_seconds(),
            held.spans,
            self.backlog.on_disk().spans,
            self.backlog.dropped.spans,
        )

    # -- the drainer thread -------------------------------------------------------------

    def _drain_until_empty(self) -> None:
        """Write the backlog, oldest first, waiting between attempts while the queue
        does not answer; ends when the backlog is empty (or at close)."""
        if self.backlog.spill is not None:
            with contextlib.suppress(OSError):
                self.backlog.spill.recover_orphans()
        delay = RETRY_SECONDS[0]
        while True:
            if self._drain_once():
                delay = RETRY_SECONDS[0]
                with self._lock:
                    # export() holds while a drainer exists, so nothing can be added
                    # between this check and the drainer's exit.
                    if self.backlog.in_memory().batches == 0 or self._closed:
                        self._drainer = None
                        down_since, self._down_since = self._down_since, None
                        break
                continue
            if self._wake.wait(delay):
                return
            delay = min(delay * 2, RETRY_SECONDS[1])
        self._recovered(down_since)

    def _drain_once(self) -> bool:
        """Write held batches until none is left (True) or the queue fails (False)."""
        while not self._wake.is_set():
            held = self.backlog.take_oldest()
            if held is None:
                return True
            try:
                self._append(held.data, held.spans)
            except Exception as error:
                self.backlog.put_back(held)
                self._outage_started(error)
                log.debug("celery-langfuse: durable queue still unreachable", exc_info=True)
                return False
            self.backlog.done(held)
            self.recovered.add(1, held.spans)
        return False

    def _recovered(self, down_since: Optional[float]) -> None:
        dropped = self.backlog.dropped
        new_drops = Counts(
            dropped.batches - self._unreported.batches, dropped.spans - self._unreported.spans
        )
        if new_drops.batches:
            try:
                self.queue.add_dropped(new_drops.batches, new_drops.spans)
                self._unreported = Counts(dropped.batches, dropped.spans)
            except Exception:
                pass  # counted locally; the next recovery reports them
        if down_since is not None:
            log.warning(
                "celery-langfuse: the durable queue %s answers again after %.1f s: wrote "
                "%d held span(s) in total; dropped %d span(s) in this process so far",
                self.queue.describe(),
                time.monotonic() - down_since,
                self.recovered.spans,
                dropped.spans,
            )

    # -- exit ----------------------------------------------------------------------------

    def settle_at_exit(self, timeout: float = _EXIT_DRAIN_SECONDS) -> Counts:
        """Before the process exits: write what is held if the queue answers within
        ``timeout``, else move it to the spill directory; what neither could keep is
        counted, logged and returned."""
        deadline = time.monotonic() + timeout
        with self._lock:
            drainer = self._drainer
        if drainer is not None:
            # The drainer retries with backoff; give it a last direct attempt instead.
            self._wake.set()
            drainer.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._closed = True
        if self.backlog.in_memory().batches and time.monotonic() < deadline:
            self._wake.clear()
            self._drain_once()
        return self._spill_lost()

    def _spill_lost(self) -> Counts:
        lost = self.backlog.spill_all()
        if lost.spans:
            log.warning(
                "celery-langfuse: exiting while the durable queue %s does not answer: "
                "lost %d span(s) held in memory (%d dropped by this process in all). Set "
                "durable_spill_dir to keep them on disk for the next process.",
                self.queue.describe(),
                lost.spans,
                self.backlog.dropped.spans,
            )
        return lost

    def stats(self) -> ExporterStats:
        memory = self.backlog.in_memory()
        return ExporterStats(
            written_batches=self.written.batches,
            written_spans=self.written.spans,
            held_spans=memory.spans,
            held_bytes=self.backlog.memory_bytes(),
            spilled_on_disk_spans=self.backlog.on_disk().spans,
            dropped_spans=self.backlog.dropped.spans + self.queue_dropped.spans,
            recovered_spans=self.recovered.spans,
            outage_seconds=self.outage_seconds(),
        )

    def outage_seconds(self) -> float:
        down_since = self._down_since
        return 0.0 if down_since is None else time.monotonic() - down_since

    def shutdown(self) -> None:
        if not self._closed:
            self.settle_at_exit()
        self.queue.close()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """True when nothing is held back (everything reached the queue)."""
        return self.backlog.is_empty()


#: Every exporter of this process, settled before it exits.
_exporters: weakref.WeakSet[DurableSpanExporter] = weakref.WeakSet()
_hooks_registered = False


def exporter_stats() -> list[ExporterStats]:
    """The stats of this process's durable exporters (normally one)."""
    return [exporter.stats() for exporter in list(_exporters)]


def _settle_all(**_: Any) -> None:
    for exporter in list(_exporters):
        if not exporter._closed:
            try:
                exporter.settle_at_exit()
            except Exception:
                log.warning("celery-langfuse: settling the durable backlog failed", exc_info=True)


def _register_exit_hooks() -> None:
    """At interpreter exit, and when a Celery pool process or worker shuts down (a
    prefork child leaves without running exit hooks): connected after install()'s own
    flush, so the SDK's last batch is already here."""
    global _hooks_registered
    if _hooks_registered:
        return
    _hooks_registered = True
    atexit.register(_settle_all)
    from celery import signals

    signals.worker_process_shutdown.connect(_settle_all, weak=False)
    signals.worker_shutdown.connect(_settle_all, weak=False)


def _entries(reply: Any) -> Sequence[Any]:
    """The entries of a one-stream XREADGROUP reply (a list in RESP2, a dict in RESP3)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return next(iter(reply.values()))  # type: ignore[no-any-return]
    return reply[0][1]  # type: ignore[no-any-return]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
