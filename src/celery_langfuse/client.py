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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Optional

import langfuse
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.trace import Status, StatusCode

from .headers import CronRun, TraceAttributes, with_app_root_claim

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


class attached:  # lower case: used like the function-style context managers beside it
    """Make ``ctx`` the current OTel context for the duration of the block.

    A class rather than ``@contextmanager``: every task run enters two of these, and a
    generator-based context manager costs several times as much.
    """

    __slots__ = ("_ctx", "_token")

    def __init__(self, ctx: otel_context.Context) -> None:
        self._ctx = ctx

    def __enter__(self) -> None:
        self._token = otel_context.attach(self._ctx)

    def __exit__(self, *_: object) -> None:
        otel_context.detach(self._token)


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


# -- trace-level attributes -------------------------------------------------------
#
# `langfuse.propagate_attributes` keeps user/session/tags/... in the OTel context under
# keys of its own; the SDK's reader for them is private. This is the one place that
# knows those keys (tests/test_sdk_contract.py fails if the SDK changes them).

_PROPAGATED_KEY = "langfuse.propagated.{}"


_USER_ID, _SESSION_ID, _TAGS, _TRACE_NAME, _TRACE_ENVIRONMENT, _TRACE_METADATA = (
    _PROPAGATED_KEY.format(name)
    for name in ("user_id", "session_id", "tags", "trace_name", "environment", "metadata")
)
_NO_TRACE_ATTRIBUTES = TraceAttributes()


def current_trace_attributes(ctx: Optional[otel_context.Context] = None) -> TraceAttributes:
    """The trace attributes set with ``propagate_attributes`` in ``ctx`` (default: the
    current context)."""
    if ctx is None:
        ctx = otel_context.get_current()
    user_id, session_id, tags = ctx.get(_USER_ID), ctx.get(_SESSION_ID), ctx.get(_TAGS)
    trace_name, environment = ctx.get(_TRACE_NAME), ctx.get(_TRACE_ENVIRONMENT)
    metadata = ctx.get(_TRACE_METADATA)
    if not (user_id or session_id or tags or trace_name or environment or metadata):
        return _NO_TRACE_ATTRIBUTES  # the usual case: nothing propagated
    return TraceAttributes(
        user_id=_str_or_none(user_id),
        session_id=_str_or_none(session_id),
        tags=tuple(tags) if isinstance(tags, (list, tuple)) else (),
        trace_name=_str_or_none(trace_name),
        environment=_str_or_none(environment),
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


# -- observations on the hot path -------------------------------------------------
#
# The SDK's `start_observation` wraps each span in a `LangfuseSpan` that runs media
# detection and masking over input, output and metadata, JSON-encodes every metadata
# key on its own and looks the observation type up several times. Measured on a no-op
# task, that wrapper was a third of everything tracing added to a worker
# (docs/benchmarks.md). The handlers' payloads are already small JSON-safe copies
# (payload.capture), so they create their observations here instead: on the SDK's own
# tracer, so the SDK's span processor still copies propagated attributes, marks app
# roots and applies its export filter, and with the attributes the SDK would write.
# The client's `mask`, if set, is applied here as the SDK would; media embedded in the
# payloads is still found and uploaded by the SDK's exporter, which scans every
# attribute of every span it exports.

_TYPE = "langfuse.observation.type"
_INPUT = "langfuse.observation.input"
_OUTPUT = "langfuse.observation.output"
_METADATA = "langfuse.observation.metadata"
_LEVEL = "langfuse.observation.level"
_STATUS_MESSAGE = "langfuse.observation.status_message"
_ENVIRONMENT = "langfuse.environment"
_RELEASE = "langfuse.release"


class Observation:
    """A Langfuse span observation on the hot path; see :func:`start_observation`."""

    __slots__ = ("_mask", "span")

    def __init__(self, span: otel_trace.Span, mask: Any) -> None:
        self.span = span
        self._mask = mask

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    @property
    def id(self) -> str:
        return format(self.span.get_span_context().span_id, "016x")

    def update(
        self,
        *,
        input: Any = None,
        output: Any = None,
        metadata: Optional[dict[str, Any]] = None,
        level: Optional[str] = None,
        status_message: Optional[str] = None,
    ) -> None:
        """Set what is given; None leaves a field as it is (as the SDK's ``update``)."""
        span = self.span
        if not span.is_recording():
            return
        attributes: dict[str, Any] = {}
        if input is not None:
            attributes[_INPUT] = _json(input, self._mask)
        if output is not None:
            attributes[_OUTPUT] = _json(output, self._mask)
        if metadata:
            masked = _masked(metadata, self._mask)
            if isinstance(masked, dict):
                # One key each, so this adds to the metadata set at the start.
                for key, value in masked.items():
                    if value is not None:
                        attributes[f"{_METADATA}.{key}"] = _encode(value)
            else:
                attributes[_METADATA] = _encode(masked)
        if level is not None:
            attributes[_LEVEL] = level
        if status_message is not None:
            attributes[_STATUS_MESSAGE] = status_message
        if attributes:
            span.set_attributes(attributes)
        if level == "ERROR":
            span.set_status(Status(StatusCode.ERROR, description=status_message))

    def end(self) -> None:
        self.span.end()



def start_observation(
    name: str,
    *,
    context: Optional[otel_context.Context] = None,
    input: Any = None,
    metadata: Optional[dict[str, Any]] = None,
    level: Optional[str] = None,
    status_message: Optional[str] = None,
) -> Observation:
    """Start a Langfuse span observation as a child of ``context`` (default: current).

    The lean equivalent of ``get_langfuse().start_observation(as_type="span", ...)``
    for the signal handlers: see the comment above. Not made current; use
    :func:`context_with` for that.
    """
    client = get_langfuse()
    mask = getattr(client, "_mask", None)
    # Everything known at the start goes in with the span: one pass over the attributes.
    attributes = dict(_static_attributes(client))
    if input is not None:
        attributes[_INPUT] = _json(input, mask)
    if metadata:
        # The whole object in one attribute: Langfuse reads it as the metadata and
        # overlays any `langfuse.observation.metadata.<key>` set later.
        attributes[_METADATA] = _encode(_masked(metadata, mask))
    if level is not None:
        attributes[_LEVEL] = level
    if status_message is not None:
        attributes[_STATUS_MESSAGE] = status_message
    tracer: otel_trace.Tracer = client._otel_tracer  # the SDK's tracer, its scope and processor
    span = tracer.start_span(name, context=context, attributes=attributes)
    if level == "ERROR":
        span.set_status(Status(StatusCode.ERROR, description=status_message))
    return Observation(span, mask)


def context_with(
    observation: Observation, context: Optional[otel_context.Context] = None
) -> otel_context.Context:
    """``context`` with ``observation`` as its current span, as the SDK's
    ``start_as_current_observation`` makes it: including its claim to the trace's app
    root, which the W3C baggage header carries to other services."""
    ctx = otel_trace.set_span_in_context(observation.span, context)
    if observation.span.is_recording():
        ctx = with_app_root_claim(ctx, observation.trace_id)
    return ctx


_static: Optional[tuple[Any, dict[str, str]]] = None


def _static_attributes(client: Any) -> dict[str, str]:
    """The attributes every observation of this client starts with (type, environment,
    release), computed once per client."""
    global _static
    cached = _static
    if cached is None or cached[0] is not client:
        attributes = {_TYPE: "span"}
        environment = getattr(client, "_environment", None)
        release = getattr(client, "_release", None)
        if environment:
            attributes[_ENVIRONMENT] = environment
        if release:
            attributes[_RELEASE] = release
        cached = _static = (client, attributes)
    return cached[1]


# Payloads come from payload.capture (JSON types only); `default=str` guards the rest.
# One encoder for all: `json.dumps` with options builds a new one on every call.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


def _masked(value: Any, mask: Any) -> Any:
    """``value`` through the Langfuse client's ``mask`` function, as the SDK applies it."""
    if mask is None:
        return value
    try:
        return mask(data=value)
    except Exception:
        log.debug("celery-langfuse: the Langfuse mask function failed", exc_info=True)
        return "<fully masked due to failed mask function>"


def _json(value: Any, mask: Any) -> str:
    value = _masked(value, mask)
    return value if isinstance(value, str) else _encode(value)


# -- cron runs -----------------------------------------------------------------------
#
# The beat layer opens a cron run's root observation around the scheduler's send; the
# publish handler reads the run from the context to put it on the message.

_CRON_RUN_KEY = otel_context.create_key("celery-langfuse.cron-run")

#: Score names, one place for the worker and the beat process.
CRON_SUCCESS_SCORE = "cron_success"
CRON_LATENESS_SCORE = "cron_lateness_seconds"


def current_cron_run(ctx: Optional[otel_context.Context] = None) -> Optional[CronRun]:
    """The cron run whose message is being sent in ``ctx`` (default: the current
    context), if any."""
    run = otel_context.get_value(_CRON_RUN_KEY, ctx)
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
