"""The one Langfuse client of the process, and the few SDK details the handlers need.

The client is created lazily, on first use, through ``langfuse.get_client()`` (so the
``LANGFUSE_*`` environment variables keep their meaning). Lazy creation matters for
prefork: ``install(app)`` runs at import time in the parent, before the pool forks,
and each child then builds its own exporter. The SDK re-creates its threads after a
fork too, so a client made before the fork also keeps working.

:func:`flush` bounds the SDK's ``flush()``, which has no deadline of its own: a worker
must never hang at shutdown because Langfuse is unreachable.

In durable mode (:func:`export_durably`) the client is created at ``install()`` with
an exporter that writes to the durable queue (:mod:`celery_langfuse.durable`), so
that ``langfuse.get_client()`` in user code, called later, shares it.
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import langfuse
from opentelemetry import context as otel_context

from .headers import TraceAttributes

log = logging.getLogger(__name__)

_lock = threading.Lock()
_client: Optional[langfuse.Langfuse] = None
#: Deadline for the flush at interpreter exit; ``install`` sets it from its settings.
exit_flush_timeout = 3.0


@dataclass(frozen=True)
class DurableExport:
    """Where durable mode queues spans (the ``durable_*`` settings of ``install``)."""

    url: str
    queue: str
    max_bytes: int


_durable: Optional[DurableExport] = None


def get_langfuse() -> langfuse.Langfuse:
    """The process's Langfuse client, created on first use."""
    global _client
    client = _client
    if client is None:
        with _lock:
            if _client is None:
                _client = _create_client()
                # Registered after the SDK's own (unbounded) exit hook, so it runs
                # first; shutting the client down unregisters the SDK's hook.
                atexit.register(_shutdown_at_exit)
            client = _client
    return client


def export_durably(settings: DurableExport) -> None:
    """Export this process's spans through the durable queue; creates the client now."""
    global _durable
    with _lock:
        if _client is not None and _durable != settings:
            log.warning(
                "celery-langfuse: a Langfuse client already exists in this process, so "
                "export='durable' (queue %r) does not apply to it; install() the app with "
                "the same settings everywhere, and before any tracing starts",
                settings.queue,
            )
            return
        _durable = settings
    get_langfuse()


def _create_client() -> langfuse.Langfuse:
    """The one place this library makes a Langfuse client."""
    if _durable is None:
        return langfuse.get_client()
    from .durable import DurableSpanExporter, SpanQueue

    queue = SpanQueue.from_url(_durable.url, _durable.queue)
    exporter = DurableSpanExporter(queue, _durable.max_bytes)
    client = langfuse.Langfuse(span_exporter=exporter)
    # Without `_resources` the client is disabled (no keys) and exports nothing at all.
    enabled = getattr(client, "_resources", None) is not None
    if enabled and _span_exporter_of(client) is not exporter:
        log.warning(
            "celery-langfuse: export='durable' is not in effect: a Langfuse client for "
            "this public key was created before install(), and the SDK keeps the first "
            "one; call install() before langfuse.get_client() or Langfuse()"
        )
    return client


def _span_exporter_of(client: langfuse.Langfuse) -> Any:
    """The exporter the SDK wired for this client's public key; None without one.

    The SDK has no public accessor; this private read is checked by
    tests/test_sdk_contract.py, so an SDK change fails there.
    """
    return getattr(getattr(client, "_resources", None), "span_exporter", None)


def _shutdown_at_exit() -> None:
    flush(exit_flush_timeout, shutdown=True)


def flush(timeout: float, *, shutdown: bool = False) -> bool:
    """Flush (or shut down) the client, giving up after ``timeout`` seconds.

    Returns True when the SDK finished in time. Never raises. Without a client there
    is nothing buffered, so this does not create one.
    """
    client = _client
    if client is None:
        return True
    action = client.shutdown if shutdown else client.flush
    done = threading.Event()

    def run() -> None:
        try:
            action()
        except Exception:
            log.warning("celery-langfuse: Langfuse flush failed", exc_info=True)
        finally:
            done.set()

    # A daemon thread: if the exporter is stuck on an unreachable Langfuse, the
    # process may still exit once the deadline has passed.
    started = time.monotonic()
    threading.Thread(target=run, name="celery-langfuse-flush", daemon=True).start()
    finished = done.wait(timeout)
    if not finished:
        log.warning(
            "celery-langfuse: Langfuse did not accept buffered observations within %.1f s; "
            "giving up so shutdown is not delayed",
            timeout,
        )
    else:
        log.debug("celery-langfuse: flushed in %.3f s", time.monotonic() - started)
    return finished


# -- trace-level attributes -------------------------------------------------------
#
# `langfuse.propagate_attributes` keeps user/session/tags/... in the OTel context under
# keys of its own; the SDK's reader for them is private. This is the one place that
# knows those keys (tests/test_sdk_contract.py fails if the SDK changes them).

_PROPAGATED_KEY = "langfuse.propagated.{}"


def current_trace_attributes() -> TraceAttributes:
    """The trace attributes set with ``propagate_attributes`` in the current context."""
    ctx = otel_context.get_current()

    def value(name: str) -> Any:
        return otel_context.get_value(_PROPAGATED_KEY.format(name), ctx)

    tags = value("tags")
    metadata = value("metadata")
    return TraceAttributes(
        user_id=_str_or_none(value("user_id")),
        session_id=_str_or_none(value("session_id")),
        tags=tuple(tags) if isinstance(tags, (list, tuple)) else (),
        trace_name=_str_or_none(value("trace_name")),
        environment=_str_or_none(value("environment")),
        # Values stay JSON-encoded, as the SDK keeps them; see `propagated`.
        metadata=dict(metadata) if isinstance(metadata, dict) else {},
    )


@contextmanager
def propagated(attributes: TraceAttributes) -> Iterator[None]:
    """Re-apply trace attributes read from a message for everything started inside."""
    if not attributes:
        yield
        return
    with langfuse.propagate_attributes(
        user_id=attributes.user_id,
        session_id=attributes.session_id,
        tags=list(attributes.tags) or None,
        trace_name=attributes.trace_name,
        environment=attributes.environment,
        metadata={key: _json_or_raw(item) for key, item in attributes.metadata.items()} or None,
    ):
        yield


def _str_or_none(value: Any) -> Optional[str]:
    return value if isinstance(value, str) and value else None


def _json_or_raw(value: str) -> Any:
    # The SDK JSON-encodes metadata values when they are set and again when they are
    # re-applied: decode once so "acme" does not arrive as "\"acme\"".
    try:
        return json.loads(value)
    except ValueError:
        return value
