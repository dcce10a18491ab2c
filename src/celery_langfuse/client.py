"""The one Langfuse client of the process, and the few SDK details the handlers need.

The client is created lazily, on first use, through ``langfuse.get_client()`` (so the
``LANGFUSE_*`` environment variables keep their meaning). Lazy creation matters for
prefork: ``install(app)`` runs at import time in the parent, before the pool forks,
and each child then builds its own exporter. The SDK re-creates its threads after a
fork too, so a client made before the fork also keeps working.

:func:`flush` bounds the SDK's ``flush()``, which has no deadline of its own: a worker
must never hang at shutdown because Langfuse is unreachable.
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import langfuse
from opentelemetry import context as otel_context

from .headers import TraceAttributes

log = logging.getLogger(__name__)

_lock = threading.Lock()
_client: Optional[langfuse.Langfuse] = None
#: Deadline for the flush at interpreter exit; ``install`` sets it from its settings.
exit_flush_timeout = 3.0


def get_langfuse() -> langfuse.Langfuse:
    """The process's Langfuse client, created on first use."""
    global _client
    client = _client
    if client is None:
        with _lock:
            if _client is None:
                _client = langfuse.get_client()
                # Registered after the SDK's own (unbounded) exit hook, so it runs
                # first; shutting the client down unregisters the SDK's hook.
                atexit.register(_shutdown_at_exit)
            client = _client
    return client


@contextmanager
def attached(ctx: otel_context.Context) -> Iterator[None]:
    """Make ``ctx`` the current OTel context for the duration of the block."""
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


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
