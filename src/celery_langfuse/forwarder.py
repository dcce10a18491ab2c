"""Forward the durable queue to Langfuse: what ``celery-langfuse forward`` runs.

A :class:`Forwarder` takes batches from a durable queue
(:class:`~celery_langfuse.durable.DurableQueue`, on Redis or RabbitMQ: first any
abandoned by a forwarder that died, then new ones), checks that each is a valid gzip
OTLP request, POSTs it to Langfuse's OTLP endpoint exactly as the SDK would, and
removes it from the queue according to the answer:

- 2xx: delivered; removed (counted ``forwarded``).
- 413 (too large): replaced in the queue by two halves, each sent on its own; a batch
  of one span cannot shrink and goes to the dead letters (``rejected``). Halves are
  strictly smaller, so this never loops.
- 400, 422 (Langfuse will never accept this body): moved to the dead letters
  (``rejected``), so one bad batch cannot block the queue.
- not a valid gzip OTLP body: moved to the dead letters (``corrupt``) unsent.
- anything else (5xx, 429, 401/403/404, timeouts, refused connections): kept, and
  retried with capped exponential backoff and jitter, honouring ``Retry-After``, for
  as long as it takes.

Run as many forwarders as you like: the queue gives each batch to one of them.
Delivery is at least once: a forwarder killed after Langfuse accepted a batch but
before removing it leaves the batch to be sent again, and Langfuse, which keeps one
observation per span id, stores it once.
"""

from __future__ import annotations

import base64
import gzip
import logging
import math
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Optional

import httpx
from langfuse import __version__ as langfuse_version
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from . import _sdk
from .durable import Batch, Dropped, DurableQueue, QueueStats

log = logging.getLogger(__name__)

OTLP_PATH = "/api/public/otel/v1/traces"
DEFAULT_BASE_URL = "https://cloud.langfuse.com"
#: Answers meaning "this body will never be accepted": retrying cannot help.
_NEVER_ACCEPTED = frozenset({400, 413, 422})
_TOO_LARGE = 413
#: Seconds between two "the queue still does not answer" warnings.
_OUTAGE_REMINDER = 300.0
_MAX_RETRY_AFTER = 300.0
_STATS_EVERY = 60.0


@dataclass(frozen=True)
class Answer:
    """What Langfuse made of one POST."""

    accepted: bool
    retry: bool
    reason: str
    retry_after: Optional[float] = None
    status: Optional[int] = None


class LangfuseEndpoint:
    """Langfuse's OTLP traces endpoint, called with the headers the SDK sends.

    The SDK's own exporter is replaced in durable mode, so the authentication it
    would add (see ``langfuse/_client/span_processor.py``) is added here.
    """

    def __init__(
        self,
        base_url: str,
        public_key: str,
        secret_key: str,
        timeout: float = 10.0,
        http: Optional[httpx.Client] = None,
        path: Optional[str] = None,
    ) -> None:
        # As the SDK builds it (and spans.py for direct export).
        self.url = base_url.rstrip("/") + ("/" + path.lstrip("/") if path else OTLP_PATH)
        token = base64.b64encode(f"{public_key}:{secret_key}".encode()).decode("ascii")
        self._headers = {
            "Authorization": f"Basic {token}",
            "Content-Type": "application/x-protobuf",
            "Content-Encoding": "gzip",
            "x-langfuse-sdk-name": "python",
            "x-langfuse-sdk-version": langfuse_version,
            "x-langfuse-public-key": public_key,
        }
        # The spans were encoded by the installed SDK (durable mode replaces only its
        # exporter): SDK 5's metadata values are JSON and it says so; SDK 4's are not.
        ingestion_version = _sdk.installed().ingestion_version
        if ingestion_version is not None:
            self._headers["x-langfuse-ingestion-version"] = ingestion_version
        self._http = http or httpx.Client(timeout=timeout)

    @classmethod
    def from_env(cls, timeout: float = 10.0) -> LangfuseEndpoint:
        """From ``LANGFUSE_BASE_URL`` (or ``LANGFUSE_HOST``), ``LANGFUSE_PUBLIC_KEY``,
        ``LANGFUSE_SECRET_KEY`` and ``LANGFUSE_OTEL_TRACES_EXPORT_PATH``, the variables
        the SDK reads. KeyError names a missing one."""
        env = os.environ
        base_url = env.get("LANGFUSE_BASE_URL") or env.get("LANGFUSE_HOST", DEFAULT_BASE_URL)
        return cls(
            base_url,
            env["LANGFUSE_PUBLIC_KEY"],
            env["LANGFUSE_SECRET_KEY"],
            timeout=timeout,
            path=env.get("LANGFUSE_OTEL_TRACES_EXPORT_PATH"),
        )

    def send(self, payload: bytes) -> Answer:
        """POST one gzip-compressed OTLP request; never raises."""
        try:
            response = self._http.post(self.url, content=payload, headers=self._headers)
        except httpx.HTTPError as error:
            return Answer(False, True, f"{type(error).__name__}: {error}")
        status = response.status_code
        if 200 <= status < 300:
            return Answer(True, False, str(status))
        reason = f"HTTP {status}: {response.text[:200]}"
        return Answer(False, status not in _NEVER_ACCEPTED, reason, _retry_after(response), status)

    def close(self) -> None:
        self._http.close()


class CorruptBatch(ValueError):
    """A queue entry that is not a gzip-compressed OTLP export request."""


def count_spans(data: bytes) -> int:
    """The spans of a queued body; :class:`CorruptBatch` when it is not one."""
    return sum(
        len(scope.spans)
        for resource in _decode(data).resource_spans
        for scope in resource.scope_spans
    )


def split_batch(data: bytes) -> list[tuple[bytes, int]]:
    """Two requests holding the spans of ``data`` between them, each with its own
    resource and scope; (payload, spans) each."""
    request = _decode(data)
    spans = [
        (r, s, span)
        for r, resource in enumerate(request.resource_spans)
        for s, scope in enumerate(resource.scope_spans)
        for span in scope.spans
    ]
    half = len(spans) // 2
    parts = []
    for chunk in (spans[:half], spans[half:]):
        part = ExportTraceServiceRequest()
        groups: dict[tuple[int, int], object] = {}
        resources: dict[int, object] = {}
        for r, s, span in chunk:
            if (r, s) not in groups:
                if r not in resources:
                    resource = part.resource_spans.add()
                    source = request.resource_spans[r]
                    resource.resource.CopyFrom(source.resource)
                    resource.schema_url = source.schema_url
                    resources[r] = resource
                scope = resources[r].scope_spans.add()  # type: ignore[attr-defined]
                source_scope = request.resource_spans[r].scope_spans[s]
                scope.scope.CopyFrom(source_scope.scope)
                scope.schema_url = source_scope.schema_url
                groups[(r, s)] = scope
            groups[(r, s)].spans.add().CopyFrom(span)  # type: ignore[attr-defined]
        parts.append((gzip.compress(part.SerializeToString(), compresslevel=6), len(chunk)))
    return parts


def _decode(data: bytes) -> ExportTraceServiceRequest:
    try:
        request: ExportTraceServiceRequest = ExportTraceServiceRequest.FromString(
            gzip.decompress(data)
        )
    except Exception as error:  # gzip, zlib, EOF and protobuf decode errors alike
        raise CorruptBatch(f"not a gzip OTLP request: {type(error).__name__}: {error}") from error
    if not request.resource_spans:
        raise CorruptBatch("an OTLP request without spans")
    return request


@dataclass
class ForwarderStats:
    """What one forwarder did since it started (batches and spans per outcome): in
    its memory, so that it can say so while the queue does not answer."""

    #: Delivered: Langfuse answered 2xx.
    forwarded_batches: int = 0
    forwarded_spans: int = 0
    #: Given up on: Langfuse refused them for good (moved to the dead letters).
    rejected_batches: int = 0
    rejected_spans: int = 0
    #: Not a valid body (moved to the dead letters unsent).
    corrupt_batches: int = 0
    split_batches: int = 0
    retries: int = 0
    #: Dropped by the queue's bound or by workers, as this forwarder counted them off
    #: the queue's drop record (RabbitMQ; the Redis queue counts its drops itself).
    dropped_batches: int = 0
    dropped_spans: int = 0


class Forwarder:
    """Moves batches from a queue to Langfuse until told to stop.

    ``claim_timeout`` is how long a batch may stay pending with one forwarder before
    another takes it over (Redis; RabbitMQ hands back a dead forwarder's batches by
    itself): longer than ``endpoint``'s request timeout, since a claim is renewed
    between attempts, not during one.
    """

    def __init__(
        self,
        queue: DurableQueue,
        endpoint: LangfuseEndpoint,
        *,
        consumer: Optional[str] = None,
        batch_size: int = 4,
        claim_timeout: float = 60.0,
        max_backoff: float = 30.0,
        block: float = 1.0,
        stats_every: float = _STATS_EVERY,
    ) -> None:
        self.queue = queue
        self.endpoint = endpoint
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.batch_size = batch_size
        self.claim_timeout = claim_timeout
        self.max_backoff = max_backoff
        self.block = block
        self.stats_every = stats_every
        self.totals = ForwarderStats()
        self.stop_event = threading.Event()
        self._last_claim = 0.0
        self._last_housekeeping = time.monotonic()
        self._queue_down_since: Optional[float] = None
        self._last_reminder = 0.0
        self._last_stats: Optional[QueueStats] = None

    @property
    def forwarded_spans(self) -> int:
        return self.totals.forwarded_spans

    def run(self) -> None:
        """Forward until :meth:`stop`. A batch being retried then stays pending and is
        picked up by this consumer name on restart, or by another forwarder."""
        log.info(
            "celery-langfuse forwarder %s: queue %s -> %s",
            self.consumer,
            self.queue.describe(),
            self.endpoint.url,
        )
        joined = False
        while not self.stop_event.is_set():
            try:
                if not joined:
                    self._join()
                    joined = True
                self.step()
                self._queue_answers()
            except Exception as error:
                # Redis or RabbitMQ unreachable, most likely, or the queue deleted:
                # wait, join again and carry on; a forwarder never exits on its own.
                self._queue_failed(error)
                joined = False
                self.stop_event.wait(min(self.max_backoff, 5.0))
            self._housekeeping()
        # Its counts end with it: the last line keeps them for the operator.
        log.info("celery-langfuse forwarder %s stops; %s", self.consumer, self._own_totals())

    def _queue_failed(self, error: Exception) -> None:
        """One warning saying what to do when the queue stops answering, a reminder
        every few minutes; the traceback only at debug level."""
        now = time.monotonic()
        log.debug("celery-langfuse forwarder: queue error", exc_info=True)
        if self._queue_down_since is None:
            self._queue_down_since = self._last_reminder = now
            log.warning(
                "celery-langfuse forwarder %s: cannot use the durable queue %s (%s: %s); "
                "retrying every %.1f s. Nothing is lost meanwhile: workers hold their "
                "spans (durable_buffer_bytes, durable_spill_dir) until the queue answers. "
                "Check that its server is running and reachable from here.",
                self.consumer,
                self.queue.describe(),
                type(error).__name__,
                error,
                min(self.max_backoff, 5.0),
            )
        elif now - self._last_reminder >= _OUTAGE_REMINDER:
            self._last_reminder = now
            log.warning(
                "celery-langfuse forwarder %s: the durable queue %s still does not answer "
                "after %.0f s (%s: %s)",
                self.consumer,
                self.queue.describe(),
                now - self._queue_down_since,
                type(error).__name__,
                error,
            )

    def _queue_answers(self) -> None:
        if self._queue_down_since is not None:
            log.warning(
                "celery-langfuse forwarder %s: the durable queue %s answers again after %.1f s",
                self.consumer,
                self.queue.describe(),
                time.monotonic() - self._queue_down_since,
            )
            self._queue_down_since = None

    def _join(self) -> None:
        """Create the consumer group if needed, then finish what this consumer name
        left pending in an earlier life."""
        self.queue.ensure_group()
        for batch in self.queue.read_own_pending(self.consumer, 1000):
            if self.stop_event.is_set():
                return
            self.ship(batch)

    def stop(self) -> None:
        self.stop_event.set()

    def step(self) -> int:
        """Take one round of batches (abandoned ones first) and ship them; the count."""
        batches: list[Batch] = []
        now = time.monotonic()
        if self.queue.needs_claims and now - self._last_claim >= min(self.claim_timeout / 4, 5.0):
            self._last_claim = now
            batches = self.queue.claim_abandoned(self.consumer, self.claim_timeout, self.batch_size)
            if batches:
                log.info(
                    "celery-langfuse forwarder: took over %d abandoned batch(es)", len(batches)
                )
        if not batches:
            batches = self.queue.read_new(self.consumer, self.batch_size, self.block)
        for batch in batches:
            if self.stop_event.is_set():
                break
            self.ship(batch)
        return len(batches)

    def ship(self, batch: Batch) -> bool:
        """Send one batch until Langfuse takes or refuses it; True once it left the queue.

        Returns False when stopped first, or when the batch stopped being this
        forwarder's to send (the bound dropped it, another forwarder took it over).
        """
        try:
            spans = count_spans(batch.data)
        except CorruptBatch as error:
            return self._set_aside(batch, "corrupt", str(error))
        if spans != batch.spans:
            batch = Batch(batch.id, batch.data, spans, batch.tag)
        attempt = 0
        while True:
            if not self.queue.renew(self.consumer, batch):
                log.debug("celery-langfuse forwarder: batch %s is no longer ours", batch.id)
                return False
            answer = self.endpoint.send(batch.data)
            if answer.accepted:
                if self.queue.settle(batch, "forwarded"):
                    self.totals.forwarded_batches += 1
                    self.totals.forwarded_spans += batch.spans
                return True
            if answer.status == _TOO_LARGE and batch.spans > 1:
                return self._split(batch, answer.reason)
            if not answer.retry:
                return self._set_aside(batch, "rejected", answer.reason)
            delay = self._backoff(attempt, answer.retry_after)
            attempt += 1
            self.totals.retries += 1
            # A warning for the first failure of a batch, then every tenth: an outage is
            # visible without a line per attempt.
            level = logging.WARNING if attempt % 10 == 1 else logging.DEBUG
            log.log(
                level,
                "celery-langfuse forwarder: Langfuse did not accept batch %s (attempt %d): %s; "
                "retrying in %.1f s",
                batch.id,
                attempt,
                answer.reason,
                delay,
            )
            if not self._wait_holding(batch, delay):
                return False

    def _split(self, batch: Batch, reason: str) -> bool:
        parts = split_batch(batch.data)
        log.warning(
            "celery-langfuse forwarder: Langfuse found batch %s (%d spans) too large (%s); "
            "replacing it by two of %d and %d spans",
            batch.id,
            batch.spans,
            reason,
            parts[0][1],
            parts[1][1],
        )
        if self.queue.split(batch, parts):
            self.totals.split_batches += 1
        return True

    def _set_aside(self, batch: Batch, outcome: str, reason: str) -> bool:
        """Move a batch to the dead letters: Langfuse will never accept it."""
        log.error(
            "celery-langfuse forwarder: %s batch %s (%d spans) moved to the dead letters of "
            "queue %s: %s",
            "Langfuse refused" if outcome == "rejected" else "corrupt",
            batch.id,
            batch.spans,
            self.queue.describe(),
            reason,
        )
        if self.queue.settle(batch, outcome, reason):
            if outcome == "rejected":
                self.totals.rejected_batches += 1
                self.totals.rejected_spans += batch.spans
            else:
                self.totals.corrupt_batches += 1
        return True

    def _backoff(self, attempt: int, retry_after: Optional[float]) -> float:
        if retry_after is not None:
            return min(retry_after, _MAX_RETRY_AFTER)
        ceiling = min(self.max_backoff, 0.5 * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)

    def _wait_holding(self, batch: Batch, seconds: float) -> bool:
        """Sleep ``seconds``, renewing the claim on ``batch`` so that a long wait does
        not make it look abandoned. False when stopped or the batch is gone."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self.stop_event.wait(min(remaining, self.claim_timeout / 3)):
                return False
            if not self.queue.renew(self.consumer, batch):
                return False
        return True

    def _housekeeping(self) -> None:
        """Every ``stats_every``: the queue's chores, then one line with this
        forwarder's totals and the queue's, or, while the queue does not answer, the
        totals alone (they live here) and what the queue said when it last answered."""
        now = time.monotonic()
        if now - self._last_housekeeping < self.stats_every:
            return
        self._last_housekeeping = now
        try:
            self._count_drops(self.queue.housekeeping(self.consumer))
            self._last_stats = self.queue.stats()
            queue = self._queue_summary(self._last_stats)
        except Exception as error:
            queue = self._queue_down_summary(error)
        log.info("celery-langfuse forwarder %s %s; %s", self.consumer, self._own_totals(), queue)

    def _count_drops(self, dropped: Dropped) -> None:
        """Add what the queue's drop record held (RabbitMQ) to the totals, and say so:
        on that engine no worker sees the bound drop, so this is where it shows."""
        if not dropped.batches:
            return
        self.totals.dropped_batches += dropped.batches
        self.totals.dropped_spans += dropped.spans
        log.warning(
            "celery-langfuse forwarder %s: %d span(s) in %d batch(es) were dropped from the "
            "durable queue %s (its bound, durable_max_bytes, dropped the oldest, or workers "
            "could not reach it); %d counted by this forwarder since it started. Are enough "
            "forwarders running and Langfuse up?",
            self.consumer,
            dropped.spans,
            dropped.batches,
            self.queue.describe(),
            self.totals.dropped_spans,
        )

    def _own_totals(self) -> str:
        t = self.totals
        text = (
            f"since it started: delivered {t.forwarded_spans} spans ({t.forwarded_batches} "
            f"batches); gave up on {t.rejected_spans} spans Langfuse refused "
            f"({t.rejected_batches} batches) and {t.corrupt_batches} corrupt batches, moved "
            f"to the dead letters; split {t.split_batches} batches"
        )
        if self.queue.forwarders_count_drops:
            text += f"; counted {t.dropped_spans} dropped spans ({t.dropped_batches} batches)"
        return text

    def _queue_down_summary(self, error: Exception) -> str:
        down = self._queue_down_since
        text = f"queue {self.queue.describe()}: not answering" + (
            f" for {time.monotonic() - down:.0f} s" if down is not None else ""
        )
        text += f" ({type(error).__name__})"
        last = self._last_stats
        if last is not None and not self.queue.forwarders_count_drops:
            text += f", {last.count('dropped_spans')} spans dropped in all when it last answered"
        return text

    def _queue_summary(self, stats: QueueStats) -> str:
        text = (
            f"queue {self.queue.describe()}: {stats.batches} batches waiting, "
            f"{stats.count('dead_letter_batches')} dead letters"
        )
        if self.queue.forwarders_count_drops:
            return text + f", {stats.count('uncounted_drops')} drop records not yet counted"
        return (
            text + f", {stats.pending} pending, {stats.bytes} bytes, "
            f"{stats.count('dropped_spans')} spans dropped in all (queue and workers)"
        )


def _retry_after(response: httpx.Response) -> Optional[float]:
    raw = response.headers.get("retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
    return max(seconds, 0.0) if math.isfinite(seconds) else None
