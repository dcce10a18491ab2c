"""Forward the durable queue to Langfuse: what ``celery-langfuse forward`` runs.

A :class:`Forwarder` takes batches from a :class:`~celery_langfuse.durable.SpanQueue`
(first any abandoned by a forwarder that died, then new ones), POSTs each to
Langfuse's OTLP endpoint exactly as the SDK would, and removes it from the queue only
when Langfuse answered 2xx. Anything else is retried with capped exponential backoff
and jitter (honouring ``Retry-After``), for as long as it takes, except the answers
that say Langfuse will never accept that body (400, 413, 422): those batches are
removed and counted as rejected, so one bad batch cannot block the queue.

Run as many forwarders as you like: the consumer group gives each batch to one of
them. Delivery is at least once: a forwarder killed after Langfuse accepted a batch
but before removing it leaves the batch to be sent again, and Langfuse, which keeps
one observation per span id, stores it once.
"""

from __future__ import annotations

import base64
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

from . import _sdk
from .durable import Batch, SpanQueue

log = logging.getLogger(__name__)

OTLP_PATH = "/api/public/otel/v1/traces"
DEFAULT_BASE_URL = "https://cloud.langfuse.com"
#: Answers meaning "this body will never be accepted": retrying cannot help.
_NEVER_ACCEPTED = frozenset({400, 413, 422})
_MAX_RETRY_AFTER = 300.0
_FORGET_CONSUMERS_AFTER = 3600.0
_STATS_EVERY = 60.0


@dataclass(frozen=True)
class Answer:
    """What Langfuse made of one POST."""

    accepted: bool
    retry: bool
    reason: str
    retry_after: Optional[float] = None


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
    ) -> None:
        self.url = base_url.rstrip("/") + OTLP_PATH
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
        """From ``LANGFUSE_BASE_URL`` (or ``LANGFUSE_HOST``), ``LANGFUSE_PUBLIC_KEY`` and
        ``LANGFUSE_SECRET_KEY``, the variables the SDK reads. KeyError names a missing one."""
        base_url = os.environ.get("LANGFUSE_BASE_URL") or os.environ.get(
            "LANGFUSE_HOST", DEFAULT_BASE_URL
        )
        return cls(
            base_url,
            os.environ["LANGFUSE_PUBLIC_KEY"],
            os.environ["LANGFUSE_SECRET_KEY"],
            timeout=timeout,
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
        return Answer(False, status not in _NEVER_ACCEPTED, reason, _retry_after(response))

    def close(self) -> None:
        self._http.close()


class Forwarder:
    """Moves batches from a queue to Langfuse until told to stop.

    ``claim_timeout`` is how long a batch may stay pending with one forwarder before
    another takes it over: longer than ``endpoint``'s request timeout, since a claim
    is renewed between attempts, not during one.
    """

    def __init__(
        self,
        queue: SpanQueue,
        endpoint: LangfuseEndpoint,
        *,
        consumer: Optional[str] = None,
        batch_size: int = 4,
        claim_timeout: float = 60.0,
        max_backoff: float = 30.0,
        block: float = 1.0,
    ) -> None:
        self.queue = queue
        self.endpoint = endpoint
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.batch_size = batch_size
        self.claim_timeout = claim_timeout
        self.max_backoff = max_backoff
        self.block = block
        self.forwarded_spans = 0
        self.stop_event = threading.Event()
        self._last_claim = 0.0
        self._last_housekeeping = time.monotonic()

    def run(self) -> None:
        """Forward until :meth:`stop`. A batch being retried then stays pending and is
        picked up by this consumer name on restart, or by another forwarder."""
        log.info(
            "celery-langfuse forwarder %s: queue %r -> %s",
            self.consumer,
            self.queue.name,
            self.endpoint.url,
        )
        joined = False
        while not self.stop_event.is_set():
            try:
                if not joined:
                    self._join()
                    joined = True
                self.step()
            except Exception:
                # Redis unreachable, most likely, or the queue deleted: wait, join the
                # group again and carry on; a forwarder never exits on its own.
                log.warning("celery-langfuse forwarder: queue error; retrying", exc_info=True)
                joined = False
                self.stop_event.wait(min(self.max_backoff, 5.0))
            self._housekeeping()

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
        if now - self._last_claim >= min(self.claim_timeout / 4, 5.0):
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
        attempt = 0
        while True:
            if not self.queue.renew(self.consumer, batch):
                log.debug("celery-langfuse forwarder: batch %s is no longer ours", batch.id)
                return False
            answer = self.endpoint.send(batch.data)
            if answer.accepted:
                self.queue.settle(batch, "forwarded")
                self.forwarded_spans += batch.spans
                return True
            if not answer.retry:
                log.error(
                    "celery-langfuse forwarder: Langfuse refused batch %s (%d spans) for good, "
                    "removing it: %s",
                    batch.id,
                    batch.spans,
                    answer.reason,
                )
                self.queue.settle(batch, "rejected")
                return True
            delay = self._backoff(attempt, answer.retry_after)
            attempt += 1
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
        now = time.monotonic()
        if now - self._last_housekeeping < _STATS_EVERY:
            return
        self._last_housekeeping = now
        try:
            self.queue.forget_idle_consumers(_FORGET_CONSUMERS_AFTER, keep=self.consumer)
            stats = self.queue.stats()
        except Exception:
            return  # the main loop reports queue errors
        log.info(
            "celery-langfuse forwarder %s: %d spans forwarded by this forwarder; queue: %d "
            "batches, %d bytes, %d pending; dropped %d spans so far",
            self.consumer,
            self.forwarded_spans,
            stats.batches,
            stats.bytes,
            stats.pending,
            stats.count("dropped_spans"),
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
