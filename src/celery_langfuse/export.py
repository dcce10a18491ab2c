"""Sending this library's own observations to Langfuse, in batches, off the task thread.

Ended spans arrive as flat tuples of strings and numbers (``otlp.FinishedSpan``), which
the garbage collector soon stops walking, and wait in a queue drained by one daemon
thread that encodes them (:mod:`celery_langfuse.otlp`), off the task's thread, and
POSTs a gzip'd OTLP request to Langfuse's ingestion endpoint whenever ``flush_at``
spans are waiting or ``flush_interval`` seconds have passed, the same triggers as the
SDK's batch processor. Retries follow the OTLP exporter's rule (connection errors,
408, 429 and 5xx, with backoff, within the export timeout); a batch that still fails
is dropped with a rate-limited warning, and a full queue drops new spans the same way:
a task is never slowed or failed because Langfuse is down.

:class:`ExportProcessor` is also registered as a span processor on the Langfuse client's
tracer provider, doing nothing per span, so that ``langfuse.flush()`` and the
client's shutdown flush this queue too.
"""

from __future__ import annotations

import gzip
import logging
import os
import random
import threading
import time
from typing import Any, Optional

from opentelemetry.sdk.trace import SpanProcessor

from .logs import warn_rate_limited
from .otlp import FinishedSpan, encode_request, encode_span

log = logging.getLogger(__name__)

#: Spans waiting at most; more are dropped (the SDK's batch processor keeps 2048 too).
MAX_QUEUED_SPANS = 2048
#: Spans in one request at most.
MAX_BATCH_SPANS = 512
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: zlib's fastest level: on a batch of task-run spans it takes half the CPU of level 6
#: for about 6% more bytes (docs/benchmarks.md); the batch is sent once and dropped.
GZIP_LEVEL = 1


def load_sender() -> None:
    """Import the HTTP client the export thread sends with (about 0.1 s of CPU) ahead of
    the first batch: in a prefork worker's main process, so that every child inherits
    it instead of paying for it while it runs tasks."""
    import requests  # noqa: F401


class ExportProcessor(SpanProcessor):
    """A queue of encoded spans and the thread that sends them (see the module doc)."""

    def __init__(
        self,
        *,
        endpoint: str,
        headers: dict[str, str],
        timeout: float,
        flush_at: int,
        flush_interval: float,
        gzip_body: bool,
        scope: tuple[bytes, bytes],
    ) -> None:
        self.endpoint = endpoint
        self._headers = {
            **headers,
            "Content-Type": "application/x-protobuf",
            **({"Content-Encoding": "gzip"} if gzip_body else {}),
        }
        self._timeout = timeout
        self._flush_at = max(1, min(flush_at, MAX_BATCH_SPANS))
        self._flush_interval = max(0.01, flush_interval)
        self._gzip = gzip_body
        self._scope = scope
        self._reset()
        # A prefork child starts with an empty queue and no thread; its first span
        # starts one (threads do not survive a fork).
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._condition = threading.Condition(self._lock)
        self._queue: list[FinishedSpan] = []
        self._flush_waiters: list[threading.Event] = []
        self._thread: Optional[threading.Thread] = None
        self._sending = False
        self._stopped = False
        self._dropped = 0
        self._session: Any = None

    # -- the task thread's side -------------------------------------------------------

    def submit(self, span: FinishedSpan) -> None:
        """Queue one ended span; never blocks on the network."""
        with self._lock:  # the condition's lock: a C context manager, unlike the condition
            if self._stopped:
                return
            queue = self._queue
            if len(queue) >= MAX_QUEUED_SPANS:
                self._dropped += 1  # reported by the export thread, not here
                return
            queue.append(span)
            if len(queue) >= self._flush_at:
                self._condition.notify()
            if self._thread is None:
                self._start_thread()

    def _start_thread(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="celery-langfuse-export", daemon=True
        )
        self._thread.start()

    def queued(self) -> int:
        """Spans waiting to be sent (a batch being sent counts as sent)."""
        return len(self._queue)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Send everything queued now; True when it was sent (or dropped) in time."""
        done = threading.Event()
        with self._condition:
            if not self._queue and not self._sending:
                return True
            self._flush_waiters.append(done)
            if self._thread is None:
                self._start_thread()
            self._condition.notify()
        return done.wait(timeout_millis / 1000)

    def shutdown(self) -> None:
        self.force_flush(int(self._timeout * 1000))
        with self._condition:
            self._stopped = True
            self._condition.notify()

    # -- the export thread ------------------------------------------------------------

    def _run(self) -> None:
        condition = self._condition
        while True:
            with condition:
                if (
                    len(self._queue) < self._flush_at
                    and not self._flush_waiters
                    and not self._stopped
                ):
                    condition.wait(self._flush_interval)
                batch = self._queue[:MAX_BATCH_SPANS]
                del self._queue[:MAX_BATCH_SPANS]
                drained = not self._queue
                waiters: list[threading.Event] = []
                if drained:
                    waiters, self._flush_waiters = self._flush_waiters, []
                stopped = self._stopped
                self._sending = bool(batch)
                dropped, self._dropped = self._dropped, 0
            if dropped:
                warn_rate_limited(
                    log,
                    "export-queue-full",
                    "celery-langfuse: %d observations were waiting for Langfuse; dropped %d more",
                    MAX_QUEUED_SPANS,
                    dropped,
                )
            if batch:
                try:
                    self._send(batch)
                except Exception:  # never let the thread die: the next batch may go through
                    warn_rate_limited(
                        log, "export-error", "celery-langfuse: exporting observations failed"
                    )
                batch = []  # not kept alive while the thread waits for the next one
                with condition:
                    self._sending = False
            for waiter in waiters:
                waiter.set()
            if stopped and drained:
                return

    def _send(self, batch: list[FinishedSpan]) -> None:
        body = encode_request(self._scope, [self._encoded(span) for span in batch])
        if self._gzip:
            body = gzip.compress(body, compresslevel=GZIP_LEVEL)
        deadline = time.monotonic() + self._timeout
        delay = 0.5
        while True:
            problem = self._post(body, deadline)
            if problem is None:
                return
            reason, retry = problem
            if not retry or time.monotonic() + delay >= deadline:
                warn_rate_limited(
                    log,
                    "export-failed",
                    "celery-langfuse: Langfuse did not accept %d observations (%s); dropped them",
                    len(batch),
                    reason,
                )
                return
            time.sleep(delay * (0.5 + random.random()))
            delay *= 2

    @staticmethod
    def _encoded(span: FinishedSpan) -> bytes:
        try:
            return encode_span(span)
        except Exception:  # one bad attribute value must not lose the batch
            warn_rate_limited(
                log, "encode", "celery-langfuse: could not encode observation %r", span.name
            )
            return b""

    def _post(self, body: bytes, deadline: float) -> Optional[tuple[str, bool]]:
        """POST one request: None when accepted, else (why, whether to retry)."""
        import requests  # the OTLP exporter the SDK loads imports it anyway

        if self._session is None:
            self._session = requests.Session()
        try:
            response = self._session.post(
                self.endpoint,
                data=body,
                headers=self._headers,
                timeout=max(0.1, min(self._timeout, deadline - time.monotonic())),
            )
        except requests.RequestException as error:
            return type(error).__name__, True
        if response.ok:
            return None
        return f"HTTP {response.status_code}", response.status_code in _RETRY_STATUS
