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
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import TYPE_CHECKING, Any, Optional

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.trace import Link, Status, StatusCode

from . import _sdk
from ._policy import new_span_id
from .export import ExportProcessor, load_sender
from .headers import TraceAttributes, TraceParent, with_app_root_claim
from .spans import (
    LeanSpan,
    Recorder,
    environment_and_release,
    recorder_for,
    standalone_recorder,
)

if TYPE_CHECKING:
    import langfuse

log = logging.getLogger(__name__)

_lock = threading.Lock()
_client: Optional[langfuse.Langfuse] = None
#: Every exporter of lean spans made in this process (see :func:`_recorder`), flushed
#: with the client.
_exports: list[ExportProcessor] = []
#: Deadline for the flush at interpreter exit; ``install`` sets it from its settings.
exit_flush_timeout = 3.0
#: An exit flush gave up (Langfuse unreachable) and no flush has finished since: the
#: exit hooks after it (a worker's shutdown signal, then SIGTERM's or atexit's flush)
#: then take a moment each instead of ``exit_flush_timeout`` again, and do not warn
#: again, so a process that passes several ends within one timeout.
_exit_gave_up = False


@dataclass(frozen=True)
class DurableExport:
    """Where durable mode queues spans (the ``durable_*`` settings of ``install``)."""

    url: str
    queue: str
    max_bytes: int
    buffer_bytes: int
    spill_dir: Optional[str]
    spill_max_bytes: int


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
                _register_exit_hook()
            client = _client
    return client


def _register_exit_hook() -> None:
    """Make :func:`flush_at_exit` the next ``atexit`` hook to run (they run last
    registered first), ahead of the SDK's own, unbounded one: it shuts every client
    down, and a client's shutdown first unregisters the SDK's hook. Called again
    whenever another client may have registered its hook since."""
    atexit.unregister(flush_at_exit)
    atexit.register(flush_at_exit)


def existing_client() -> Optional[langfuse.Langfuse]:
    """The process's Langfuse client if there is one (this library's or the user's),
    without creating one or importing the SDK."""
    client = _client
    if client is None and "langfuse" in sys.modules and sdk_client_exists():
        client = get_langfuse()
    return client


def warm_up() -> None:
    """Decide how observations are sent, and make what that needs, now; never raises."""
    if not langfuse_keys_configured():
        return  # nothing would be sent; the first observation warns as before
    try:
        load_sender()
        if _recorder() is None:
            get_langfuse()
    except Exception:
        log.warning("celery-langfuse: could not create the Langfuse client", exc_info=True)


def _create_client() -> langfuse.Langfuse:
    """The one place a client is made: the user's, if they made one, else ours.

    ``Langfuse(...)`` reads keys, base URL, environment and everything else from the
    ``LANGFUSE_*`` variables as ``get_client()`` would; only the flush batch size and
    interval come from the installation. A client the user created first (with its
    own keys or settings) is never replaced.
    """
    global created_with_settings
    import langfuse

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
    from .durable import DurableSpanExporter, open_queue

    return DurableSpanExporter(
        open_queue(durable.url, durable.queue, durable.max_bytes),
        durable.max_bytes,
        buffer_bytes=durable.buffer_bytes,
        spill_dir=durable.spill_dir,
        spill_max_bytes=durable.spill_max_bytes,
    )


def sdk_client_exists() -> bool:
    """Whether a Langfuse client already exists in this process (the user's or ours)."""
    return bool(sdk_resource_managers())


def sdk_resource_managers() -> list[Any]:
    """The resource managers of every Langfuse client in this process (one per public
    key: the user's, made before or after ``install()``, and this library's), without
    creating one or importing the SDK.

    The SDK has no public way to list its clients; this reads its private registry.
    Kept in this one function and covered by tests/test_sdk_contract.py.
    """
    if "langfuse" not in sys.modules:
        return []
    from langfuse._client.resource_manager import LangfuseResourceManager

    with LangfuseResourceManager._lock:
        return list(LangfuseResourceManager._instances.values())


def _queued_spans(provider: Any) -> Optional[int]:
    """Ended spans waiting in the batch processors of an OTel SDK tracer provider, or
    None when they cannot be counted. OTel has no public count; this reads the
    provider's processor list and each batch processor's queue. Only for the warning
    of a flush that gave up; covered by tests/test_sdk_contract.py."""
    try:
        processors = provider._active_span_processor._span_processors
        total = 0
        for processor in processors:
            if isinstance(processor, ExportProcessor):
                total += processor.queued()
                continue
            batch = getattr(processor, "_batch_processor", None)
            if batch is not None:
                total += len(batch._queue)
        return total
    except Exception:
        return None


def langfuse_keys_configured() -> bool:
    """Whether a client could authenticate: both keys in the environment, or a client
    already made (with keys given in code)."""
    return (
        bool(os.environ.get("LANGFUSE_PUBLIC_KEY") and os.environ.get("LANGFUSE_SECRET_KEY"))
        or sdk_client_exists()
    )


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


def flush_before_exit(*, shutdown: bool = False) -> bool:
    """A flush on the way out of the process, bounded by ``exit_flush_timeout``; right
    after an exit flush gave up, a quick and quiet one (a shutdown still stops the
    SDK's clients and unregisters their own exit hooks)."""
    global _exit_gave_up
    quick = _exit_gave_up
    finished = flush(0.05 if quick else exit_flush_timeout, shutdown=shutdown, warn=not quick)
    if not finished:
        _exit_gave_up = True
        _register_exit_hook()  # ahead of a client's hook registered since: bounded too
    return finished


def _reset_exit_state() -> None:
    global _exit_gave_up
    _exit_gave_up = False


os.register_at_fork(after_in_child=_reset_exit_state)


def flush_at_exit() -> None:
    """The process's last flush (``atexit``; billiard's exit finalizers in an embedded
    beat), through :func:`flush_before_exit`."""
    if not flush_before_exit(shutdown=True):
        # OpenTelemetry's own exit hook runs next: it shuts the tracer provider down
        # and waits for the export still retrying against an unreachable Langfuse
        # (up to the exporter timeout). The deadline has passed; skip that wait.
        provider_shutdown = getattr(otel_trace.get_tracer_provider(), "shutdown", None)
        if provider_shutdown is not None:
            atexit.unregister(provider_shutdown)


def flush(timeout: float, *, shutdown: bool = False, warn: bool = True) -> bool:
    """Flush (or shut down) everything in this process that holds ended observations,
    giving up after ``timeout`` seconds: this library's exporters, every Langfuse
    client (the user's too, however and whenever it was made) and the OTel tracer
    provider the SDK registered (with any span processor the user added to it).

    Returns True when everything was sent in time. Never raises. When the deadline
    passes, one warning says how many observations were still waiting. Creates
    nothing: with no client and no exporter there is nothing buffered.
    """
    holders = _holders()
    if holders.empty:
        return True
    done = threading.Event()

    def run() -> None:
        try:
            _send_buffered(holders, timeout, shutdown)
        finally:
            done.set()

    # A daemon thread: if an exporter is stuck on an unreachable Langfuse, the
    # process may still exit once the deadline has passed.
    started = time.monotonic()
    threading.Thread(target=run, name="celery-langfuse-flush", daemon=True).start()
    finished = done.wait(timeout)
    if not finished and warn:
        waiting = holders.waiting()
        log.warning(
            "celery-langfuse: Langfuse did not accept buffered observations within %.1f s; "
            "giving up on %s queued observation(s) (and any batch being sent) so shutdown "
            "is not delayed",
            timeout,
            "an unknown number of" if waiting is None else waiting,
        )
    elif finished:
        log.debug("celery-langfuse: flushed in %.3f s", time.monotonic() - started)
        _reset_exit_state()
    return finished


@dataclass(frozen=True)
class _Holders:
    """What holds ended observations in this process, found when a flush starts."""

    #: The SDK's resource managers: one per Langfuse client (public key) in the process.
    clients: tuple[Any, ...]
    #: Tracer providers no client flushes: the global one when the user built it.
    providers: tuple[Any, ...]
    exports: tuple[ExportProcessor, ...]

    @property
    def empty(self) -> bool:
        return not (self.clients or self.providers or self.exports)

    def waiting(self) -> Optional[int]:
        """Observations still queued, or None when a queue cannot be read."""
        total = sum(export.queued() for export in self.exports)
        for provider in {id(p): p for p in self.tracer_providers()}.values():
            queued = _queued_spans(provider)
            if queued is None:
                return None
            total += queued
        return total

    def tracer_providers(self) -> list[Any]:
        found = [getattr(c, "tracer_provider", None) for c in self.clients]
        return [p for p in (*found, *self.providers) if p is not None]


def _holders() -> _Holders:
    clients = tuple(sdk_resource_managers())
    flushed_by_clients = {id(getattr(c, "tracer_provider", None)) for c in clients}
    global_provider = otel_trace.get_tracer_provider()
    providers: tuple[Any, ...] = ()
    if (
        id(global_provider) not in flushed_by_clients
        and callable(getattr(global_provider, "force_flush", None))
    ):
        providers = (global_provider,)
    return _Holders(clients, providers, tuple(_exports))


def flush_before_sigterm() -> None:
    """Make SIGTERM flush (bounded by ``exit_flush_timeout``) before it ends the process,
    where it would otherwise end it at once, with whatever was buffered.

    SIGTERM's default action kills a process without running ``atexit`` hooks, and
    servers such as uvicorn (0.29+) re-raise the SIGTERM they handled gracefully after
    restoring the handler that was in place before they started: every observation
    of the API process was lost at each deploy. Installed only from the main thread and
    only while SIGTERM has its default action, so a handler of the application, a
    server or Celery is never replaced (Celery's and gunicorn's, installed later,
    replace this one). The process still dies of SIGTERM, after the flush.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _flush_then_terminate)
    except (ValueError, OSError):  # no signals here (an embedded interpreter)
        pass


def _flush_then_terminate(signum: int, _frame: Any) -> None:
    signal.signal(signum, signal.SIG_DFL)
    try:
        flush_before_exit(shutdown=True)
    finally:
        os.kill(os.getpid(), signum)


_background_flush: Optional[threading.Thread] = None


def flush_in_background() -> None:
    """Start sending buffered observations now, without waiting for it.

    For processes that may be killed without an exit hook (beat embedded in a worker
    is ended by SIGTERM and leaves with ``os._exit``). At most one such flush runs at
    a time, so an unreachable Langfuse can never pile up threads.
    """
    global _background_flush
    holders = _holders()
    with _lock:
        running = _background_flush
        if holders.empty or (running is not None and running.is_alive()):
            return
        _background_flush = threading.Thread(
            target=_send_buffered,
            args=(holders, 30.0, False),
            name="celery-langfuse-flush",
            daemon=True,
        )
        _background_flush.start()


def _send_buffered(holders: _Holders, timeout: float, shutdown: bool) -> None:
    # Clients first: their provider's flush also reaches this library's exporter
    # where it is registered on it as a span processor.
    for manager in holders.clients:
        _call_logged(partial(_sdk.wake_score_consumers, manager))
        _call_logged(manager.shutdown if shutdown else manager.flush)
    for provider in holders.providers:
        _call_logged(partial(provider.force_flush, int(timeout * 1000)))
    for export in holders.exports:
        try:
            if shutdown:
                export.shutdown()
            else:
                export.force_flush(int(timeout * 1000))
        except Exception:
            log.warning("celery-langfuse: flushing observations failed", exc_info=True)


def _call_logged(action: Callable[[], object]) -> None:
    try:
        action()
    except Exception:
        log.warning("celery-langfuse: Langfuse flush failed", exc_info=True)


# -- roots of traces this library starts -------------------------------------------


@contextmanager
def root_observation(
    trace_id: str, *, name: str, start_time_ns: Optional[int] = None, **fields: Any
) -> Iterator[Observation]:
    """A parentless span observation in trace ``trace_id``, current inside the block.

    For traces whose id is drawn before they start (so the sampling decision can be
    made first) and for failures kept from a sampled-out trace. ``start_time_ns``
    backdates the observation to when the work began.
    """
    observation = start_observation(name, root_of=trace_id, start_time_ns=start_time_ns, **fields)
    try:
        with attached(context_with(observation)):
            yield observation
    finally:
        observation.end()


def _make_root(span: Any) -> None:
    """Drop the made-up parent of a span started in a chosen trace.

    Started under a remote parent span id of that trace (see :func:`start_observation`),
    Langfuse would show it as the child of an observation that does not exist (an
    orphan, not the root). The OTel SDK span keeps its parent in ``_parent``, read when
    it is exported; it is cleared here, right after the span started and before
    anything else can see it. tests/test_sdk_contract.py fails if that changes. A
    non-recording span (sampled out by the SDK's own sampler) has none.
    """
    if hasattr(span, "_parent"):
        span._parent = None


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
_TRACE_VERSION, _PROMPT_NAME, _PROMPT_VERSION, _SKILLS_AVAILABLE, _ATTACH_SKILLS = (
    _PROPAGATED_KEY.format(name)
    for name in ("version", "prompt_name", "prompt_version", "skills_available", "attach_skills")
)
_NO_TRACE_ATTRIBUTES = TraceAttributes()
#: Decided once, for the installed SDK (see _sdk.py): the `propagate_attributes`
#: keywords it takes, and whether it keeps metadata values JSON-encoded.
_SDK = _sdk.installed()
_PROPAGATED_ARGUMENTS = _SDK.propagated_arguments
_METADATA_IS_JSON = _SDK.metadata_values_are_json


def current_trace_attributes(ctx: Optional[otel_context.Context] = None) -> TraceAttributes:
    """The trace attributes set with ``propagate_attributes`` in ``ctx`` (default: the
    current context)."""
    if ctx is None:
        ctx = otel_context.get_current()
    user_id, session_id, tags = ctx.get(_USER_ID), ctx.get(_SESSION_ID), ctx.get(_TAGS)
    trace_name, environment = ctx.get(_TRACE_NAME), ctx.get(_TRACE_ENVIRONMENT)
    metadata, version = ctx.get(_TRACE_METADATA), ctx.get(_TRACE_VERSION)
    prompt_name, skills, attach_skills = (
        ctx.get(_PROMPT_NAME),
        ctx.get(_SKILLS_AVAILABLE),
        ctx.get(_ATTACH_SKILLS),
    )
    if not (
        user_id
        or session_id
        or tags
        or trace_name
        or environment
        or metadata
        or version
        or prompt_name
        or skills
        or attach_skills is not None
    ):
        return _NO_TRACE_ATTRIBUTES  # the usual case: nothing propagated
    prompt_version = ctx.get(_PROMPT_VERSION)
    return TraceAttributes(
        user_id=_str_or_none(user_id),
        session_id=_str_or_none(session_id),
        tags=tuple(tags) if isinstance(tags, (list, tuple)) else (),
        trace_name=_str_or_none(trace_name),
        environment=_str_or_none(environment),
        # Values stay encoded as the installed SDK keeps them; see `propagated`.
        metadata=dict(metadata) if isinstance(metadata, dict) else {},
        version=_str_or_none(version),
        prompt_name=_str_or_none(prompt_name) if type(prompt_version) is int else None,
        prompt_version=prompt_version if type(prompt_version) is int else None,
        skills_available=_str_or_none(skills),
        attach_skills=attach_skills if isinstance(attach_skills, bool) else None,
    )


@contextmanager
def propagated(attributes: TraceAttributes) -> Iterator[None]:
    """Re-apply trace attributes read from a message for everything started inside,
    those the installed SDK's ``propagate_attributes`` takes."""
    if not attributes:
        yield
        return
    plain = _plain_context(attributes)
    if plain is not None:
        token = otel_context.attach(plain)
        try:
            yield
        finally:
            otel_context.detach(token)
        return
    import langfuse

    arguments: dict[str, Any] = {
        "user_id": attributes.user_id,
        "session_id": attributes.session_id,
        "tags": list(attributes.tags) or None,
        "trace_name": attributes.trace_name,
        "version": attributes.version,
        "metadata": {key: _metadata_item(item) for key, item in attributes.metadata.items()}
        or None,
    }
    if attributes.environment and "environment" in _PROPAGATED_ARGUMENTS:
        arguments["environment"] = attributes.environment
    if attributes.prompt_name and "prompt" in _PROPAGATED_ARGUMENTS:
        arguments["prompt"] = {
            "name": attributes.prompt_name,
            "version": attributes.prompt_version,
        }
    if attributes.skills_available and "skills_available" in _PROPAGATED_ARGUMENTS:
        arguments["skills_available"] = _json_or_raw(attributes.skills_available)
    if attributes.attach_skills is not None and "attach_skills" in _PROPAGATED_ARGUMENTS:
        arguments["attach_skills"] = attributes.attach_skills
    with langfuse.propagate_attributes(**arguments):
        yield


def _plain_context(attributes: TraceAttributes) -> Optional[otel_context.Context]:
    """The current context with ``attributes`` set as ``propagate_attributes`` would
    set them, where that needs nothing of the SDK (so a worker whose tasks never use
    it does not import it): only user, session, version, tags and trace name, each
    within the SDK's 200 characters, under a span that is not recording (the SDK would
    set them on it too). None: let the SDK do it."""
    if (
        attributes.environment
        or attributes.metadata
        or attributes.prompt_name
        or attributes.skills_available
        or attributes.attach_skills is not None
        or otel_trace.get_current_span().is_recording()
    ):
        return None
    ctx = otel_context.get_current()
    values: dict[str, Any] = {}
    for key, value in (
        (_USER_ID, attributes.user_id),
        (_SESSION_ID, attributes.session_id),
        (_TRACE_VERSION, attributes.version),
        (_TRACE_NAME, attributes.trace_name),
    ):
        if value is not None:
            if not isinstance(value, str) or len(value) > _MAX_PROPAGATED_CHARS:
                return None  # the SDK drops it, with its warning
            values[key] = value
    if attributes.tags:
        if any(len(tag) > _MAX_PROPAGATED_CHARS for tag in attributes.tags):
            return None
        # As the SDK merges them: those already set first, then the new ones not
        # among them.
        set_before = ctx.get(_TAGS)
        existing = list(set_before) if isinstance(set_before, list) else []
        values[_TAGS] = existing + [tag for tag in attributes.tags if tag not in existing]
    for key, value in values.items():
        ctx = otel_context.set_value(key, value, ctx)
    return ctx


#: The SDK drops a propagated string longer than this (``_validate_string_value``).
_MAX_PROPAGATED_CHARS = 200


def _str_or_none(value: Any) -> Optional[str]:
    return value if isinstance(value, str) and value else None


def _metadata_item(value: str) -> Any:
    # SDK 5 JSON-encodes metadata values when they are set and again when they are
    # re-applied: decode once so "acme" does not arrive as "\"acme\"". SDK 4 keeps
    # them as the strings they were set as.
    return _json_or_raw(value) if _METADATA_IS_JSON else value


def _json_or_raw(value: str) -> Any:
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
_AS_ROOT = "langfuse.internal.as_root"


class Observation:
    """A Langfuse span observation on the hot path; see :func:`start_observation`."""

    __slots__ = ("_mask", "span")

    def __init__(self, span: otel_trace.Span, mask: Any) -> None:
        self.span = span
        self._mask = mask

    @property
    def trace_id(self) -> str:
        span = self.span
        # A lean span has its ids at hand; its span context is made only when asked for.
        ids = span if type(span) is LeanSpan else span.get_span_context()
        return format(ids.trace_id, "032x")

    @property
    def id(self) -> str:
        span = self.span
        ids = span if type(span) is LeanSpan else span.get_span_context()
        return format(ids.span_id, "016x")

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
                # One key each, so this adds to the metadata set at the start;
                # each value encoded as the installed SDK encodes it (see _sdk.py).
                for key, value in masked.items():
                    if value is not None:
                        attributes[f"{_METADATA}.{key}"] = _metadata_value(value)
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
    root_of: Optional[str] = None,
    start_time_ns: Optional[int] = None,
    parent: Optional[TraceParent] = None,
    link: Optional[TraceParent] = None,
) -> Observation:
    """Start a Langfuse span observation as a child of ``context`` (default: current),
    or, with ``root_of``, as the parentless root of that trace id, or, with ``parent``,
    as the child of a remote parent, as if started in ``parent.context(context)``.

    The lean equivalent of ``get_langfuse().start_observation(as_type="span", ...)``
    for the signal handlers: see the comment above. Not made current; use
    :func:`context_with` for that. ``start_time_ns`` backdates it. ``link``: a remote
    observation, in another trace, that it is linked to, written as an OTel span link
    (the root of a linked trace; Langfuse itself does not show links).
    """
    recorder = _recorder()
    # Without a recorder, observations are the SDK's spans: its client is needed.
    client = _client if recorder is not None else get_langfuse()
    mask = getattr(client, "_mask", None)
    # Everything known at the start goes in with the span: one pass over the attributes.
    attributes: dict[str, Any] = dict(_static_attributes(client))
    if input is not None:
        attributes[_INPUT] = _json(input, mask)
    if metadata:
        masked = metadata if mask is None else _masked(metadata, mask)
        if recorder is not None and type(masked) is dict:
            # Kept as a dict: the export thread writes it a key an attribute, as the SDK
            # does (otlp.METADATA), off the task's thread.
            attributes[_METADATA] = masked
        elif type(masked) is dict:
            for key, value in masked.items():  # the SDK's span: as the SDK writes it
                encoded = _metadata_value(value)
                if encoded is not None:  # the SDK writes no key for None
                    attributes[f"{_METADATA}.{key}"] = encoded
        else:
            attributes[_METADATA] = _encode(masked)  # a mask that made it a non-dict
    if level is not None:
        attributes[_LEVEL] = level
    if status_message is not None:
        attributes[_STATUS_MESSAGE] = status_message
    if root_of is not None:
        # Marked as a root the way the SDK marks spans started with `trace_context=`.
        attributes[_AS_ROOT] = True
    if recorder is not None:
        span = recorder.start_span(
            name,
            context,
            attributes,
            start_time_ns,
            int(root_of, 16) if root_of is not None else None,
            parent,
            link,
        )
    else:
        client = get_langfuse()
        if parent is not None:
            context = parent.context(context)
        if root_of is not None:
            # OTel starts a span in a given trace only under a parent of that trace: a
            # made-up remote one, dropped by _make_root once the span has started.
            context = TraceParent(root_of, new_span_id()).context(context)
        tracer: otel_trace.Tracer = client._otel_tracer  # the SDK's tracer and processor
        span = tracer.start_span(
            name,
            context=context,
            attributes=attributes,
            start_time=start_time_ns,
            links=None if link is None else [Link(link.span_context())],
        )
        if root_of is not None:
            _make_root(span)
    if level == "ERROR":
        span.set_status(Status(StatusCode.ERROR, description=status_message))
    return Observation(span, mask)


def context_with(
    observation: Observation,
    context: Optional[otel_context.Context] = None,
    trace_id: Optional[str] = None,
) -> otel_context.Context:
    """``context`` with ``observation`` as its current span, as the SDK's
    ``start_as_current_observation`` makes it: including its claim to the trace's app
    root, which the W3C baggage header carries to other services. ``trace_id``: the
    observation's, when the caller knows it."""
    span = observation.span
    ctx = otel_trace.set_span_in_context(span, context)
    if span.is_recording():
        ctx = with_app_root_claim(ctx, trace_id or observation.trace_id)
    return ctx


_recorders: Optional[tuple[Any, Optional[Recorder]]] = None


def _recorder() -> Optional[Recorder]:
    """How this library's observations are recorded (:mod:`celery_langfuse.spans`):
    decided once per client, and once before any client exists; None where they must
    be the SDK's own spans.

    Before the process has a Langfuse client, a standalone recorder sends them with
    the ``LANGFUSE_*`` settings the SDK would read, without importing the SDK: a
    worker whose tasks never use it does not pay for it. Once a client exists (the
    user's, or one made for media, scores or the SDK span path), its recorder is used.
    """
    global _recorders
    client = existing_client()
    cached = _recorders
    if cached is None or cached[0] is not client:
        with _lock:
            cached = _recorders
            if cached is None or cached[0] is not client:
                if client is not None:
                    recorder = recorder_for(client)
                else:
                    recorder = standalone_recorder(
                        flush_at=client_settings.flush_at,
                        flush_interval=client_settings.flush_interval,
                        durable=client_settings.durable is not None,
                        sdk_client=get_langfuse,
                    )
                if recorder is not None:
                    _exports.append(recorder.export)
                cached = _recorders = (client, recorder)
            if cached[1] is not None or client is not None:
                _register_exit_hook()  # after the client's own hook, if it has one
    return cached[1]


_static: Optional[tuple[Any, dict[str, str]]] = None


def _static_attributes(client: Any) -> dict[str, str]:
    """The attributes every observation of this client starts with (type, environment,
    release), computed once per client (None: from the environment, as the SDK would)."""
    global _static
    cached = _static
    if cached is None or cached[0] is not client:
        attributes = {_TYPE: "span"}
        if client is not None:
            environment = getattr(client, "_environment", None)
            release = getattr(client, "_release", None)
        else:
            environment, release = environment_and_release()
        if environment:
            attributes[_ENVIRONMENT] = environment
        if release:
            attributes[_RELEASE] = release
        cached = _static = (client, attributes)
    return cached[1]


# Payloads come from payload.capture (JSON types only); `default=str` guards the rest.
# One encoder for all, made once: `json.dumps` with options builds an encoder on every
# call, and `JSONEncoder.encode` builds its C scanner on every call. No circular
# reference check: what is encoded here are copies made by payload.capture, and this
# library's own metadata dicts (a cycle still fails, with RecursionError, in the
# handler's guard).
_json_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)
_c_encode = (
    c_make_encoder(None, str, encode_basestring, None, ":", ",", False, False, True)
    if c_make_encoder is not None
    else None  # an interpreter without the C accelerator
)


def _encode(value: Any) -> str:
    if _c_encode is None:
        return _json_encoder.encode(value)
    return "".join(_c_encode(value, 0))


#: One metadata value as the installed SDK writes a `langfuse.observation.metadata.<key>`
#: attribute: SDK 4 keeps strings and numbers as they are, SDK 5 JSON-encodes them all
#: (and tells the server so with its ingestion-version header).
_metadata_value = _SDK.metadata_encoder()


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
    if mask is not None:
        value = _masked(value, mask)
    return value if isinstance(value, str) else _encode(value)
