"""The one Langfuse client of the process, and the few SDK details the handlers need.

The client is created lazily, on first use, in :func:`_create_client`: the client the
user already made, if any, else a new one from the ``LANGFUSE_*`` environment variables
(which keep their meaning) and the installation's flush settings. Lazy creation
matters for prefork: ``install(app)`` runs at import time in the parent, before the
pool forks, and each child then builds its own exporter. The SDK re-creates its
threads after a fork too, so a client made before the fork also keeps working.

:func:`flush` bounds the SDK's ``flush()``, which has no deadline of its own: a worker
must never hang at shutdown because Langfuse is unreachable.

In durable mode the client is created at ``install()``, with an exporter that writes
to the durable queue (:mod:`celery_langfuse.durable`), so that
``langfuse.get_client()`` in user code, called later, shares it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import langfuse
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace

from .headers import CronRun, TraceAttributes

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


@dataclass(frozen=True)
class ClientSettings:
    """What this library passes to the client it creates; None leaves the SDK's own."""

    flush_at: Optional[int] = None
    flush_interval: Optional[float] = None
    #: Durable mode: spans go to this queue instead of straight to Langfuse.
    durable: Optional[DurableExport] = None


#: Set by ``install`` before the client exists; a client made earlier keeps its own.
client_settings = ClientSettings()
#: Whether this library made the client with ``client_settings`` (False: it found one).
created_with_settings = False


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


def _create_client() -> langfuse.Langfuse:
    """The one place a client is made: the user's, if they made one, else ours.

    ``Langfuse(...)`` reads keys, base URL, environment and everything else from the
    ``LANGFUSE_*`` variables as ``get_client()`` would; only the flush batch size and
    interval come from the installation. A client the user created first (with its
    own keys or settings) is never replaced.
    """
    global created_with_settings
    if sdk_client_exists():
        if client_settings.durable is not None:
            log.warning(
                "celery-langfuse: export='durable' is not in effect: a Langfuse client "
                "existed before install(), and the SDK keeps the first one; call install() "
                "before langfuse.get_client() or Langfuse()"
            )
        return langfuse.get_client()
    created_with_settings = True
    return langfuse.Langfuse(
        flush_at=client_settings.flush_at,
        flush_interval=client_settings.flush_interval,
        span_exporter=_durable_exporter(client_settings.durable),
    )


def _durable_exporter(durable: Optional[DurableExport]) -> Any:
    if durable is None:
        return None  # the SDK's own exporter, straight to Langfuse
    from .durable import DurableSpanExporter, SpanQueue

    return DurableSpanExporter(SpanQueue.from_url(durable.url, durable.queue), durable.max_bytes)


def sdk_client_exists() -> bool:
    """Whether a Langfuse client already exists in this process (the user's or ours).

    The SDK has no public way to ask this without creating one; this reads its private
    registry. Kept in this one function and covered by tests/test_sdk_contract.py.
    """
    if "langfuse" not in sys.modules:
        return False
    from langfuse._client.resource_manager import LangfuseResourceManager

    with LangfuseResourceManager._lock:
        return bool(LangfuseResourceManager._instances)


def langfuse_keys_configured() -> bool:
    """Whether a client could authenticate: both keys in the environment, or a client
    already made (with keys given in code)."""
    return bool(
        os.environ.get("LANGFUSE_PUBLIC_KEY") and os.environ.get("LANGFUSE_SECRET_KEY")
    ) or sdk_client_exists()


@contextmanager
def attached(ctx: otel_context.Context) -> Iterator[None]:
    """Make ``ctx`` the current OTel context for the duration of the block."""
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


def _shutdown_at_exit() -> None:
    if not flush(exit_flush_timeout, shutdown=True):
        # OpenTelemetry's own exit hook runs next: it shuts the tracer provider down
        # and waits for the export still retrying against an unreachable Langfuse
        # (up to the exporter timeout). The deadline has passed; skip that wait.
        provider_shutdown = getattr(otel_trace.get_tracer_provider(), "shutdown", None)
        if provider_shutdown is not None:
            atexit.unregister(provider_shutdown)


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
            _call_logged(action)
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


_background_flush: Optional[threading.Thread] = None


def flush_in_background() -> None:
    """Start sending buffered observations now, without waiting for it.

    For processes that may be killed without an exit hook (beat embedded in a worker
    is ended by SIGTERM and leaves with ``os._exit``). At most one such flush runs at
    a time, so an unreachable Langfuse can never pile up threads.
    """
    global _background_flush
    with _lock:
        client, running = _client, _background_flush
        if client is None or (running is not None and running.is_alive()):
            return
        _background_flush = threading.Thread(
            target=_call_logged, args=(client.flush,), name="celery-langfuse-flush", daemon=True
        )
        _background_flush.start()


def _call_logged(action: Callable[[], None]) -> None:
    try:
        action()
    except Exception:
        log.warning("celery-langfuse: Langfuse flush failed", exc_info=True)


# -- roots of traces this library starts -------------------------------------------


@contextmanager
def root_observation(
    trace_id: str, *, name: str, start_time_ns: Optional[int] = None, **fields: Any
) -> Iterator[Any]:
    """A parentless span observation in trace ``trace_id``, current inside the block.

    For traces whose id is drawn before they start (so the sampling decision can be
    made first) and for failures kept from a sampled-out trace. ``start_time_ns``
    backdates the observation to when the work began.
    """
    with get_langfuse().start_as_current_observation(
        trace_context={"trace_id": trace_id}, name=name, as_type="span", **fields
    ) as observation:
        _make_root(otel_trace.get_current_span(), start_time_ns)
        yield observation


def _make_root(span: Any, start_time_ns: Optional[int]) -> None:
    """Drop the parent the SDK invents for a span started in a chosen trace.

    ``trace_context={"trace_id": ...}`` is the SDK's only way into a chosen trace, and
    it starts the span under a made-up remote parent span id, which Langfuse would show
    as the child of an observation that does not exist (an orphan, not the root). The
    OTel SDK span keeps its parent and start time in ``_parent`` / ``_start_time``,
    read when it is exported; both are set here, right after the span started and
    before anything else can see it. tests/test_sdk_contract.py fails if that changes.
    A non-recording span (sampled out by the SDK's own sampler) has neither.
    """
    if hasattr(span, "_parent"):
        span._parent = None
        if start_time_ns is not None and hasattr(span, "_start_time"):
            span._start_time = start_time_ns


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


# -- cron runs -----------------------------------------------------------------------
#
# The beat layer opens a cron run's root observation around the scheduler's send; the
# publish handler reads the run from the context to put it on the message.

_CRON_RUN_KEY = otel_context.create_key("celery-langfuse.cron-run")

#: Score names, one place for the worker and the beat process.
CRON_SUCCESS_SCORE = "cron_success"
CRON_LATENESS_SCORE = "cron_lateness_seconds"


def current_cron_run() -> Optional[CronRun]:
    """The cron run whose message is being sent in the current context, if any."""
    run = otel_context.get_value(_CRON_RUN_KEY)
    return run if isinstance(run, CronRun) else None


@contextmanager
def sending_cron_run(run: CronRun) -> Iterator[None]:
    """Mark everything published inside as the message of this cron run."""
    token = otel_context.attach(otel_context.set_value(_CRON_RUN_KEY, run))
    try:
        yield
    finally:
        otel_context.detach(token)


def score_cron_run(
    trace_id: str,
    *,
    success: Optional[bool] = None,
    lateness_seconds: Optional[float] = None,
    comment: Optional[str] = None,
    metadata: Optional[dict[str, Any]] = None,
    environment: Optional[str] = None,
) -> None:
    """Record the cron health scores of one run on its trace; None means "not known"."""
    langfuse_client = get_langfuse()
    # Lateness first: scores leave in order, so whoever sees cron_success has both.
    if lateness_seconds is not None:
        langfuse_client.create_score(
            name=CRON_LATENESS_SCORE,
            value=round(lateness_seconds, 3),
            trace_id=trace_id,
            data_type="NUMERIC",
            metadata=metadata,
            environment=environment,
        )
    if success is not None:
        langfuse_client.create_score(
            name=CRON_SUCCESS_SCORE,
            value=1.0 if success else 0.0,
            trace_id=trace_id,
            data_type="NUMERIC",
            comment=comment,
            metadata=metadata,
            environment=environment,
        )
