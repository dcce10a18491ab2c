"""The observations this library records itself, without the OTel SDK's span machinery.

A task run costs one observation, and with the SDK's span each one is a dozen
objects (attributes, limits, events, links, locks, contexts) that wait in the batch
queue until export, where they are copied for the media scan and rebuilt as protobuf
objects: on a no-op task that was most of what tracing cost, garbage collection
included (docs/benchmarks.md). A :class:`LeanSpan` is one object and a dict while it
runs; when it ends it is queued as a flat tuple for
:class:`~celery_langfuse.export.ExportProcessor`, whose thread encodes it to OTLP bytes
(:mod:`celery_langfuse.otlp`) and sends it.

It is still an OpenTelemetry span: made current, it is the parent of whatever the task
starts (the SDK's observations, other instrumentations' spans), and the SDK's
``update_current_span`` and friends write to it. What the SDK's span processor does
when a span starts is done here too: the trace attributes set with
``propagate_attributes`` are copied onto it and the app root is marked by the same
rule. A span whose input or output carries a base64 data URI is handed to the SDK's
processor when it ends instead, so the SDK uploads the media as it would.

:func:`recorder_for` decides, once per client, whether this path can be used: only
when the client exports the SDK's default way, with nothing that would see the spans
differently (a custom exporter, span filter, export mask, sampler, id generator, or
another span processor on its tracer provider). Otherwise observations are SDK spans.
Before the process has a client, :func:`standalone_recorder` configures the same
path from the ``LANGFUSE_*`` variables, without importing the SDK.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Optional

from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.trace import Link, SpanContext, Status, StatusCode, TraceFlags

from . import _sdk, otlp
from .export import ExportProcessor

if TYPE_CHECKING:
    from .headers import TraceParent

log = logging.getLogger(__name__)

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_IS_APP_ROOT = "langfuse.internal.is_app_root"
_MEDIA_MARK = ";base64,"
_PROPAGATED_PREFIX = "langfuse.propagated."
#: The ``propagate_attributes`` values read and written without the SDK: its context
#: key (``_get_propagated_context_key``) -> the span attribute its processor copies it
#: to (``_get_propagated_span_key``). Plain strings and a list of strings, which the
#: SDK copies as they are; a context holding any other key of the SDK's (metadata,
#: environment, prompt, skills, experiments) is read by the SDK's own function.
#: tests/test_sdk_contract.py checks both directions against the installed SDK.
PLAIN_PROPAGATED = {
    _PROPAGATED_PREFIX + "user_id": "user.id",
    _PROPAGATED_PREFIX + "session_id": "session.id",
    _PROPAGATED_PREFIX + "version": "langfuse.version",
    _PROPAGATED_PREFIX + "tags": "langfuse.trace.tags",
    _PROPAGATED_PREFIX + "trace_name": "langfuse.trace.name",
}
# The SDK's names (langfuse/_client/propagation.py), here so that a worker need not
# import the SDK; tests/test_lean_spans.py checks them against it.
_BAGGAGE_PREFIX = "langfuse_"
_APP_ROOT_CLAIM = "langfuse_trace_id"
_STATUS_CODES = {StatusCode.OK: otlp.STATUS_OK, StatusCode.ERROR: otlp.STATUS_ERROR}


class LeanSpan(otel_trace.Span):
    """A recording span that becomes OTLP bytes when it ends; see the module doc."""

    __slots__ = (
        "_context",
        "_ended",
        "_events",
        "_links",
        "_parent",
        "_parent_id",
        "_parent_is_remote",
        "_recorder",
        "_remote_parent",
        "_status",
        "attributes",
        "name",
        "span_id",
        "start_time",
        "trace_id",
    )

    def __init__(
        self,
        recorder: Recorder,
        name: str,
        trace_id: int,
        span_id: int,
        parent: Optional[SpanContext],
        attributes: dict[str, Any],
        start_time: int,
        remote_parent: Optional[TraceParent] = None,
        links: tuple[tuple[int, int], ...] = (),
    ) -> None:
        self._recorder = recorder
        self.trace_id = trace_id
        self.span_id = span_id
        # The OTel span contexts, its own and its parent's, are made when first asked
        # for: a task that starts nothing inside its run never needs them.
        self._context: Optional[SpanContext] = None
        self._parent = parent
        self._remote_parent = remote_parent
        if remote_parent is not None:
            self._parent_id: Optional[int] = int(remote_parent.parent_id, 16)
            self._parent_is_remote = True
        elif parent is not None:
            self._parent_id = parent.span_id
            self._parent_is_remote = parent.is_remote
        else:
            self._parent_id = None
            self._parent_is_remote = False
        self.name = name
        self.start_time = start_time
        self.attributes = attributes
        self._events: Optional[list[tuple[str, int, Mapping[str, Any]]]] = None
        # (trace id, span id) of remote spans, given at the start (otlp.FinishedSpan.links).
        self._links = links
        self._status: tuple[int, Optional[str]] = (otlp.STATUS_UNSET, None)
        self._ended = False

    @property
    def parent(self) -> Optional[SpanContext]:
        parent = self._parent
        if parent is None and self._remote_parent is not None:
            parent = self._parent = self._remote_parent.span_context()
        return parent

    def get_span_context(self) -> SpanContext:
        context = self._context
        if context is None:
            context = self._context = SpanContext(self.trace_id, self.span_id, False, _SAMPLED)
        return context

    def is_recording(self) -> bool:
        return not self._ended

    def set_attribute(self, key: str, value: Any) -> None:
        if not self._ended and value is not None:
            self.attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if not self._ended:
            self.attributes.update((k, v) for k, v in attributes.items() if v is not None)

    def update_name(self, name: str) -> None:
        if not self._ended:
            self.name = name

    def add_event(
        self,
        name: str,
        attributes: Optional[Mapping[str, Any]] = None,
        timestamp: Optional[int] = None,
    ) -> None:
        if self._ended:
            return
        if self._events is None:
            self._events = []
        self._events.append((name, timestamp or time.time_ns(), dict(attributes or {})))

    def set_status(self, status: Any, description: Optional[str] = None) -> None:
        if self._ended:
            return
        if isinstance(status, Status):
            status, description = status.status_code, status.description
        code = _STATUS_CODES.get(status)
        if code is not None and self._status[0] != otlp.STATUS_OK:  # OK is final, as in OTel
            self._status = (code, description if code == otlp.STATUS_ERROR else None)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Optional[Mapping[str, Any]] = None,
        timestamp: Optional[int] = None,
        escaped: bool = False,
    ) -> None:
        fields = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
            **(attributes or {}),
        }
        self.add_event("exception", fields, timestamp)

    def end(self, end_time: Optional[int] = None) -> None:
        if self._ended:
            return
        self._ended = True
        self._recorder.finish(self, end_time or time.time_ns())

    def __repr__(self) -> str:
        return f"LeanSpan({self.name!r}, span_id={self.span_id:016x})"


class Recorder:
    """Starts :class:`LeanSpan` observations for one Langfuse client and sends them."""

    def __init__(self, export: ExportProcessor, sdk_client: Callable[[], Any]) -> None:
        self.export = export
        # For the rare span carrying media, which the SDK's processor must see.
        self._sdk_client = sdk_client

    def start_span(
        self,
        name: str,
        context: Optional[otel_context.Context],
        attributes: dict[str, Any],
        start_time: Optional[int],
        root_of: Optional[int],
        remote_parent: Optional[TraceParent] = None,
        link: Optional[TraceParent] = None,
    ) -> otel_trace.Span:
        """A recording span, or, under a parent sampled out, the non-recording span the
        SDK's default (parent-based) sampler would make.

        ``remote_parent``: the span's parent came in a message; its context need not be
        made for this (``context`` is the one it would have been added to). ``link``: a
        remote span it links to (an OTel span link).
        """
        if context is None:
            context = otel_context.get_current()
        parent_span: Any = None
        parent: Optional[SpanContext] = None
        claim: Optional[str] = None
        if remote_parent is not None:
            trace_id = int(remote_parent.trace_id, 16)
            if not remote_parent.sampled:
                return otel_trace.NonRecordingSpan(
                    SpanContext(trace_id, random.getrandbits(64) or 1, False, _NOT_SAMPLED)
                )
            if remote_parent.from_langfuse:
                claim = remote_parent.trace_id  # TraceParent.context() would set it
        elif root_of is not None:
            trace_id = root_of
        else:
            parent_span = otel_trace.get_current_span(context)
            parent = parent_span.get_span_context()
            if parent.is_valid:
                if not parent.trace_flags.sampled:
                    return otel_trace.NonRecordingSpan(
                        SpanContext(
                            parent.trace_id,
                            random.getrandbits(64) or 1,
                            False,
                            parent.trace_flags,
                            parent.trace_state,
                        )
                    )
                trace_id = parent.trace_id
            else:
                parent = None
                trace_id = random.getrandbits(128) or 1
        propagated, context_claim = _context_facts(context)
        if claim is None:
            claim = context_claim
        if propagated:
            attributes.update(propagated)
        if _is_app_root(trace_id, parent, parent_span, claim):
            attributes[_IS_APP_ROOT] = True
        return LeanSpan(
            self,
            name,
            trace_id,
            random.getrandbits(64) or 1,
            parent,
            attributes,
            start_time or time.time_ns(),
            remote_parent,
            () if link is None else ((int(link.trace_id, 16), int(link.parent_id, 16)),),
        )

    def finish(self, span: LeanSpan, end_time: int) -> None:
        if _may_carry_media(span.attributes):
            self._hand_to_sdk(span, end_time)
            return
        status_code, status_message = span._status
        self.export.submit(
            otlp.FinishedSpan(
                span.trace_id,
                span.span_id,
                span._parent_id,
                span._parent_is_remote,
                span.name,
                span.start_time,
                end_time,
                span.attributes,
                span._events or (),
                status_code,
                status_message,
                span._links,
            )
        )

    def _hand_to_sdk(self, span: LeanSpan, end_time: int) -> None:
        from langfuse._version import __version__ as langfuse_version
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        resources = self._sdk_client()._resources
        processor = _langfuse_processor(resources.tracer_provider)
        if processor is None:
            log.debug("celery-langfuse: no Langfuse span processor for a span with media")
            return
        if not _sdk.installed().media_scanned_at_export:
            _sdk.upload_media_in_attributes(
                span.attributes, span.trace_id, span.span_id, resources._media_manager
            )

        code, message = span._status
        status_code = {otlp.STATUS_OK: StatusCode.OK, otlp.STATUS_ERROR: StatusCode.ERROR}.get(
            code, StatusCode.UNSET
        )
        readable = ReadableSpan(
            name=span.name,
            context=span.get_span_context(),
            parent=span.parent,
            resource=resources.tracer_provider.resource,
            attributes=span.attributes,
            events=[Event(name, attrs, ts) for name, ts, attrs in span._events or ()],
            kind=otel_trace.SpanKind.INTERNAL,
            instrumentation_scope=InstrumentationScope(
                _LANGFUSE_TRACER_NAME, langfuse_version, None, {"public_key": resources.public_key}
            ),
            status=Status(status_code, message),
            start_time=span.start_time,
            end_time=end_time,
            links=[
                Link(SpanContext(trace_id, span_id, True, _SAMPLED))
                for trace_id, span_id in span._links
            ],
        )
        processor.on_end(readable)


def _may_carry_media(attributes: Mapping[str, Any]) -> bool:
    """Whether the SDK's media scan could find something to upload (a base64 data URI)."""
    for value in attributes.values():  # noqa: SIM110 (any() over a generator costs more)
        if isinstance(value, str) and _MEDIA_MARK in value:
            return True
    return False


def _is_app_root(
    trace_id: int, parent: Optional[SpanContext], parent_span: Any, claim: Optional[str]
) -> bool:
    """The SDK span processor's rule: a span is its trace's app root in Langfuse unless
    its parent is a local span that Langfuse receives, or the context claims the trace
    already has its root (baggage set where the trace started)."""
    if parent is not None and not parent.is_remote and _exported_by_langfuse(parent_span):
        return False
    return claim is None or claim != format(trace_id, "032x")


# The two lookups below are the same for every observation started in one context, or
# under one parent: a producer publishing several tasks from one request, say. Each
# keeps its last answer, held by a weak reference to what it was about (contexts are
# immutable; whether a span is the kind Langfuse exports does not change).
_last_context: Optional[tuple[Callable[[], Any], dict[str, Any], Optional[str]]] = None
_last_exported: Optional[tuple[Callable[[], Any], bool]] = None


def _context_facts(context: otel_context.Context) -> tuple[dict[str, Any], Optional[str]]:
    """The propagated attributes in ``context`` and its app-root claim (a trace id)."""
    global _last_context
    cached = _last_context
    if cached is not None and cached[0]() is context:
        return cached[1], cached[2]
    propagated = _propagated_attributes(context)
    claim = baggage.get_baggage(_APP_ROOT_CLAIM, context)
    claim = None if claim is None else str(claim).lower()
    _last_context = (weakref.ref(context), propagated, claim)
    return propagated, claim


def _exported_by_langfuse(span: Any) -> bool:
    """Whether ``span`` is alive and of a kind the SDK's processor exports."""
    if isinstance(span, LeanSpan):
        return True
    if not span.is_recording():
        return False
    global _last_exported
    cached = _last_exported
    if cached is not None and cached[0]() is span:
        return cached[1]
    exported = _default_export_span(span)
    with contextlib.suppress(TypeError):  # a span class with __slots__ and no weak refs
        _last_exported = (weakref.ref(span), exported)
    return exported


def _default_export_span(span: Any) -> bool:
    if "langfuse" not in sys.modules:
        return False  # no Langfuse span processor exists to export it
    from langfuse._client.span_filter import is_default_export_span

    try:
        return bool(is_default_export_span(span))
    except Exception:
        return False


def _propagated_attributes(context: otel_context.Context) -> dict[str, Any]:
    """The span attributes the SDK's processor copies from ``propagate_attributes``.

    The SDK's function for it is private; this is the one place that calls it
    (tests/test_lean_spans.py fails if it changes). It walks every key the SDK might
    have set, so it is skipped when the context holds none: ``propagate_attributes``
    keeps its values under ``langfuse.propagated.*`` keys, or in ``langfuse_*`` baggage
    entries with ``as_baggage=True`` (the app-root claim aside).
    """
    # Loops, not any()/all() over generators: this runs for every observation.
    plain: Optional[dict[str, Any]] = None
    for key in context:
        if isinstance(key, str) and key.startswith(_PROPAGATED_PREFIX):
            span_key = PLAIN_PROPAGATED.get(key)
            value = context[key]
            if span_key is None or not isinstance(value, (str, list)):
                break  # the SDK's reader: it validates and flattens the others
            if plain is None:
                plain = {}
            plain[span_key] = value
    else:
        for key in baggage.get_all(context):
            if key != _APP_ROOT_CLAIM and key.startswith(_BAGGAGE_PREFIX):
                break
        else:
            # Only plain values (the usual case: a task's trace name, a request's user
            # and session): copied as the SDK copies them, without importing it.
            return plain or {}
    from langfuse._client.propagation import _get_propagated_attributes_from_context

    return _get_propagated_attributes_from_context(context)


# -- when the lean path is used ------------------------------------------------------


def recorder_for(client: Any) -> Optional[Recorder]:
    """A :class:`Recorder` for ``client``, or None where its observations must be SDK
    spans (see the module doc). Reads the client's private resource manager; kept in
    this function and covered by tests/test_lean_spans.py."""
    try:
        return _recorder_for(client)
    except Exception:
        log.debug("celery-langfuse: using the SDK's span path", exc_info=True)
        return None


def _recorder_for(client: Any) -> Optional[Recorder]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    resources = getattr(client, "_resources", None)
    if resources is None or not getattr(client, "_tracing_enabled", False):
        return None
    # Fields some supported SDK versions lack read as "not set" (see _sdk.py).
    sample_rate = resources.sample_rate
    if (
        resources.span_exporter is not None
        or resources.should_export_span is not None
        or getattr(resources, "mask_otel_spans", None) is not None
        or getattr(resources, "id_generator", None) is not None
        or getattr(resources, "blocked_instrumentation_scopes", None)
        # SDK 5.2's processor adds the configured skills to spans in some contexts.
        or getattr(resources, "skills", None) is not None
        or (sample_rate is not None and sample_rate < 1)
    ):
        return None
    provider = resources.tracer_provider
    if not isinstance(provider, TracerProvider):
        return None
    default_sampler = ParentBased(ALWAYS_ON).get_description()  # type: ignore[no-untyped-call]
    if provider.sampler.get_description() != default_sampler:  # type: ignore[no-untyped-call]
        return None
    if _langfuse_processor(provider, only=True) is None:
        return None
    export = _span_export(
        public_key=resources.public_key,
        secret_key=resources.secret_key,
        base_url=resources.base_url,
        timeout=resources.timeout,
        flush_at=resources.flush_at,
        flush_interval=resources.flush_interval,
        compression=getattr(resources, "otel_compression", None),
        additional_headers=resources.additional_headers,
        resource_attributes=dict(provider.resource.attributes),
    )
    provider.add_span_processor(export)  # so langfuse.flush() and shutdown reach it
    return Recorder(export, lambda: client)


def _langfuse_processor(provider: Any, *, only: bool = False) -> Any:
    """The Langfuse span processor on ``provider`` (with ``only``: if it is the only
    processor there). Reads the OTel SDK's private processor list."""
    from langfuse._client.span_processor import LangfuseSpanProcessor

    processors = provider._active_span_processor._span_processors
    found = [p for p in processors if isinstance(p, LangfuseSpanProcessor)]
    if not found or (only and len(processors) != 1):
        return None
    return found[0]


def standalone_recorder(
    *,
    flush_at: Optional[int],
    flush_interval: Optional[float],
    durable: bool,
    sdk_client: Callable[[], Any],
) -> Optional[Recorder]:
    """A :class:`Recorder` for a process without a Langfuse client, configured from the
    ``LANGFUSE_*`` variables as ``Langfuse()`` would read them, without importing the
    SDK; None where that would differ from what the SDK sends: durable mode, the SDK's
    own sampling (``LANGFUSE_SAMPLE_RATE``), tracing switched off, missing keys, or an
    OpenTelemetry tracer provider set up in this process (its other processors would
    see the SDK's spans, so they stay SDK spans). ``sdk_client`` makes the client when
    a span carries media."""
    env = os.environ
    public_key, secret_key = env.get("LANGFUSE_PUBLIC_KEY"), env.get("LANGFUSE_SECRET_KEY")
    try:
        sample_rate = float(env.get("LANGFUSE_SAMPLE_RATE", 1.0))
    except ValueError:
        return None
    if (
        durable
        or not (public_key and secret_key)
        or sample_rate < 1
        or env.get("LANGFUSE_TRACING_ENABLED", "true").lower() == "false"
        or not isinstance(otel_trace.get_tracer_provider(), otel_trace.ProxyTracerProvider)
    ):
        return None
    environment, release = environment_and_release()
    try:
        export = _span_export(
            public_key=public_key,
            secret_key=secret_key,
            base_url=env.get("LANGFUSE_BASE_URL")
            or env.get("LANGFUSE_HOST", "https://cloud.langfuse.com"),
            timeout=int(env.get("LANGFUSE_TIMEOUT", 5)),
            flush_at=flush_at,
            flush_interval=flush_interval,
            compression=None,
            additional_headers=None,
            resource_attributes=_sdk_resource_attributes(environment, release),
        )
    except ValueError:
        return None
    return Recorder(export, sdk_client)


def _span_export(
    *,
    public_key: str,
    secret_key: str,
    base_url: str,
    timeout: Optional[float],
    flush_at: Optional[int],
    flush_interval: Optional[float],
    compression: Optional[str],
    additional_headers: Optional[dict[str, str]],
    resource_attributes: dict[str, Any],
) -> ExportProcessor:
    """The exporter the SDK's span processor would be: same endpoint, headers, batch
    triggers and compression, from the same settings."""
    import base64

    env = os.environ
    if flush_at is None:
        flush_at = int(env.get("LANGFUSE_FLUSH_AT") or 512)
    if flush_interval is None:
        flush_interval = float(env.get("LANGFUSE_FLUSH_INTERVAL") or 5.0)
    path = env.get("LANGFUSE_OTEL_TRACES_EXPORT_PATH")
    endpoint = f"{base_url}/{path}" if path else f"{base_url}/api/public/otel/v1/traces"
    sdk = _sdk.installed()
    sdk_version = sdk.version or "unknown"
    gzip_body = _gzip(compression, sdk)
    if gzip_body is None:
        raise ValueError("an OTLP compression the lean exporter does not write")
    auth = base64.b64encode(f"{public_key}:{secret_key}".encode()).decode("ascii")
    headers = {
        "Authorization": f"Basic {auth}",
        "x-langfuse-sdk-name": "python",
        "x-langfuse-sdk-version": sdk_version,
        "x-langfuse-public-key": public_key,
    }
    if sdk.ingestion_version is not None:
        headers["x-langfuse-ingestion-version"] = sdk.ingestion_version
    headers.update(additional_headers or {})
    return ExportProcessor(
        endpoint=endpoint,
        headers=headers,
        timeout=float(timeout or 5),
        flush_at=flush_at,
        flush_interval=flush_interval,
        gzip_body=gzip_body,
        scope=otlp.encode_scope(
            resource_attributes=resource_attributes,
            scope_name=_LANGFUSE_TRACER_NAME,
            scope_version=sdk_version,
            scope_attributes={"public_key": public_key},
        ),
    )


def _sdk_resource_attributes(environment: Optional[str], release: Optional[str]) -> dict[str, Any]:
    """The resource the SDK's tracer provider would carry (langfuse's
    ``_init_tracer_provider``): OTel's defaults and detectors, environment, release."""
    from opentelemetry.sdk.resources import Resource

    own = {"langfuse.environment": environment, "langfuse.release": release}
    resource = Resource.create({key: value for key, value in own.items() if value is not None})
    return dict(resource.attributes)


def _gzip(compression: Optional[str], sdk: _sdk.InstalledSdk) -> Optional[bool]:
    """Whether the installed SDK's exporter would gzip; None for a compression this
    exporter does not write (deflate), where the SDK's own exporter must be used.

    SDK 5: the argument, then ``LANGFUSE_OTEL_COMPRESSION``, then the OTel variables,
    then gzip; "none" turns it off, anything else invalid is skipped. SDK 4.18: the
    argument or ``LANGFUSE_OTEL_COMPRESSION`` if valid, else what the OTLP exporter
    reads itself: the first OTel variable set, else none. Older SDK 4: only the OTel
    variables.
    """
    env = os.environ
    langfuse_settings = (compression, env.get("LANGFUSE_OTEL_COMPRESSION"))
    otel_settings = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"),
        env.get("OTEL_EXPORTER_OTLP_COMPRESSION"),
    )
    if sdk.gzip_by_default:
        for value in (*langfuse_settings, *otel_settings):
            value = (value or "").strip().lower()
            if value in ("gzip", "none"):
                return value == "gzip"
        return True
    if sdk.has_compression_setting:
        value = (compression or env.get("LANGFUSE_OTEL_COMPRESSION") or "").strip().lower()
        if value in ("gzip", "none"):
            return value == "gzip"
    value = (otel_settings[0] or otel_settings[1] or "none").strip().lower()
    if value == "deflate":
        return None
    return value == "gzip"  # the OTLP exporter sends anything else uncompressed


def environment_and_release() -> tuple[Optional[str], Optional[str]]:
    """The tracing environment and release ``Langfuse()`` reads from the environment."""
    env = os.environ
    release = env.get("LANGFUSE_RELEASE") or next(
        (env[name] for name in _COMMON_RELEASE_VARIABLES if name in env), None
    )
    return env.get("LANGFUSE_TRACING_ENVIRONMENT"), release


# The SDK's (langfuse/_utils/environment.py); tests/test_lean_spans.py compares them.
_COMMON_RELEASE_VARIABLES = (
    "RENDER_GIT_COMMIT",
    "CI_COMMIT_SHA",
    "CIRCLE_SHA1",
    "SOURCE_VERSION",
    "TRAVIS_COMMIT",
    "GIT_COMMIT",
    "GITHUB_SHA",
    "BITBUCKET_COMMIT",
    "BUILD_SOURCEVERSION",
    "DRONE_COMMIT_SHA",
)
_LANGFUSE_TRACER_NAME = "langfuse-sdk"  # the SDK's tracer scope, which its ingestion expects

