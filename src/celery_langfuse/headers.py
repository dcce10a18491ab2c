"""The wire format: the only module that knows trace header names.

A message (or an HTTP request) carries two views of the same trace context, so that
OpenTelemetry consumers and Langfuse-aware ones both understand it:

- W3C ``traceparent`` (plus ``tracestate``/``baggage``) as the global OTel propagator
  writes them;
- ``x-langfuse-*`` headers: trace id, parent observation id, and the trace-level
  attributes ``langfuse.propagate_attributes`` sets (user, session, tags, trace name,
  version, environment, metadata, prompt, skills: whichever the installed SDK has),
  plus the publish time so the worker can report queue wait, and
  ``x-langfuse-sampled: 0`` when the trace was sampled out (the W3C sampled flag says
  the same, but only when the global propagator writes ``traceparent``);
- for a message celery beat sent: the schedule entry's name and when the run was due,
  so the worker can score the cron run's health;
- trust (docs/web.md, "Trust"): ``x-langfuse-signature``, an HMAC of the parent ids and
  trace attributes that producers holding ``producer_secret`` add to their messages, and
  ``x-langfuse-trust-secret``, the shared secret internal HTTP callers send.

Headers are untrusted input. :func:`extract` validates every value and drops what
does not fit; a bad header means a fresh trace and a debug log, never an exception.
From a sender that is not trusted (``extract(..., trusted=False)``) only the W3C
``traceparent`` is continued: its trace attributes are ignored, and Langfuse ids it
names are recorded as a claim (:class:`Distrusted`) instead of being continued.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from opentelemetry import baggage, propagate
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACE_ID = "x-langfuse-trace-id"
PARENT_ID = "x-langfuse-parent-id"
USER_ID = "x-langfuse-user-id"
SESSION_ID = "x-langfuse-session-id"
TAGS = "x-langfuse-tags"
TRACE_NAME = "x-langfuse-trace-name"
ENVIRONMENT = "x-langfuse-environment"
METADATA = "x-langfuse-metadata"
VERSION = "x-langfuse-version"
PROMPT_NAME = "x-langfuse-prompt-name"
PROMPT_VERSION = "x-langfuse-prompt-version"
SKILLS_AVAILABLE = "x-langfuse-skills-available"
ATTACH_SKILLS = "x-langfuse-attach-skills"
PUBLISHED_AT = "x-langfuse-published-at"
SAMPLED = "x-langfuse-sampled"
CRON_ENTRY = "x-langfuse-cron-entry"
CRON_DUE_AT = "x-langfuse-cron-due-at"
SIGNATURE = "x-langfuse-signature"
#: Set by the caller on one message (``apply_async(headers={LINKED_TRACE: "1"})``): the
#: task starts a trace linked to the caller's ("0": it stays in it). Read and removed
#: by the publish handler, so a retry does not repeat it.
LINKED_TRACE = "x-langfuse-linked-trace"
#: Written instead of a parent: the id of the trace this message starts, linked to the
#: publishing trace (whose ids travel in the trace metadata, under the two keys below).
LINK_TRACE_ID = "x-langfuse-link-trace-id"
#: The trace metadata keys of a linked trace that name the observation it links to: the
#: publish observation in the caller's trace (JSON-encoded, as trace metadata travels).
LINKED_FROM_TRACE_ID = "parent_trace_id"
LINKED_FROM_OBSERVATION_ID = "parent_observation_id"
#: Added by a worker's main process to the request of a message it saw lost and now
#: receives again (never published): ``<attempt>:<lost run's observation id>``.
REDELIVERY = "x-langfuse-redelivery"
#: Sent by internal HTTP callers only (never in a Celery message, never in
#: :data:`ALL_HEADERS`, so nothing that forwards those headers forwards the secret).
TRUST_SECRET = "x-langfuse-trust-secret"

#: The trace attributes' headers (signed, and ignored from an untrusted sender).
_ATTRIBUTE_HEADERS = (
    USER_ID,
    SESSION_ID,
    TAGS,
    TRACE_NAME,
    ENVIRONMENT,
    METADATA,
    VERSION,
    PROMPT_NAME,
    PROMPT_VERSION,
    SKILLS_AVAILABLE,
    ATTACH_SKILLS,
)

#: Every header this library writes; a reader may use it to strip or forward them.
ALL_HEADERS = (
    TRACEPARENT,
    TRACE_ID,
    PARENT_ID,
    *_ATTRIBUTE_HEADERS,
    PUBLISHED_AT,
    SAMPLED,
    CRON_ENTRY,
    CRON_DUE_AT,
    SIGNATURE,
    LINK_TRACE_ID,
)

# Limits follow what Langfuse itself accepts for propagated attributes.
_MAX_ATTRIBUTE_CHARS = 200
#: At most this many tags and metadata keys cross a message or an HTTP call, whatever
#: set them (headers received, ``identify``, ``propagate_attributes``): more are dropped
#: when written and when read.
MAX_TAGS = 50
MAX_METADATA_KEYS = 50
_MAX_METADATA_CHARS = 8_000
#: JSON header values nested deeper are dropped before they are parsed: the parser
#: would recurse near the interpreter's limit ("[[[[..."), where any finalizer that
#: runs meanwhile fails for lack of stack.
_MAX_JSON_DEPTH = 32
#: Longest trust secret or signature compared; a longer header is not trusted.
MAX_SECRET_CHARS = 1_024
_MAX_SKILLS_CHARS = 8_000
_TRACE_ID_RE = re.compile(r"[0-9a-f]{32}")
_SPAN_ID_RE = re.compile(r"[0-9a-f]{16}")
_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ENVIRONMENT_RE = re.compile(r"(?!langfuse)[a-z0-9_-]{1,40}")
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16

# The SDK's span processor marks the first exported span of a trace in a process as
# the trace's "app root" unless this baggage entry names the trace: a worker run
# continuing a producer's trace must not claim the trace's name and input.
_APP_ROOT_CLAIM_BAGGAGE_KEY = "langfuse_trace_id"
# The SDK's span processor reads every baggage entry with this prefix as a trace
# attribute (langfuse_user_id, langfuse_session_id, langfuse_metadata_*, ...).
_LANGFUSE_BAGGAGE_PREFIX = "langfuse_"


@dataclass(frozen=True)
class TraceAttributes:
    """Trace-level attributes that Langfuse filters on and that cross the broker: what
    ``langfuse.propagate_attributes`` set where the message was sent. Fields an
    installed SDK does not propagate (``environment`` before 4.12, ``prompt_*`` before
    4.18, ``*skills*`` before 5.2) are carried but not re-applied by it."""

    user_id: Optional[str] = None
    session_id: Optional[str] = None
    tags: tuple[str, ...] = ()
    trace_name: Optional[str] = None
    environment: Optional[str] = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    #: The trace's ``version`` (``langfuse.version``).
    version: Optional[str] = None
    #: The prompt linked to generations (``propagate_attributes(prompt=...)``).
    prompt_name: Optional[str] = None
    prompt_version: Optional[int] = None
    #: ``skills_available`` as the SDK keeps it: a JSON list of skill references.
    skills_available: Optional[str] = None
    attach_skills: Optional[bool] = None

    def __bool__(self) -> bool:
        return bool(
            self.user_id
            or self.session_id
            or self.tags
            or self.trace_name
            or self.environment
            or self.metadata
            or self.version
            or self.prompt_name
            or self.skills_available
            or self.attach_skills is not None
        )

    def bounded(self) -> TraceAttributes:
        """These attributes with at most :data:`MAX_TAGS` tags and
        :data:`MAX_METADATA_KEYS` metadata keys (the first ones)."""
        if len(self.tags) <= MAX_TAGS and len(self.metadata) <= MAX_METADATA_KEYS:
            return self
        return TraceAttributes(
            user_id=self.user_id,
            session_id=self.session_id,
            tags=self.tags[:MAX_TAGS],
            trace_name=self.trace_name,
            environment=self.environment,
            metadata=dict(list(self.metadata.items())[:MAX_METADATA_KEYS]),
        )


class TraceParent(NamedTuple):
    """Where a consumer continues a trace: ids validated, ready to attach.

    A named tuple, like :class:`Extracted`: every task run reads one, and a frozen
    dataclass costs an ``object.__setattr__`` per field to make.
    """

    trace_id: str
    parent_id: str
    sampled: bool = True
    #: True when the producer is Langfuse-aware (wrote ``x-langfuse-trace-id``):
    #: its observation already owns the trace's name and input.
    from_langfuse: bool = False

    def span_context(self) -> SpanContext:
        """The remote parent as an OTel span context."""
        return SpanContext(
            trace_id=int(self.trace_id, 16),
            span_id=int(self.parent_id, 16),
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED if self.sampled else TraceFlags.DEFAULT),
        )

    def context(self, base: Optional[otel_context.Context] = None) -> otel_context.Context:
        """An OTel context whose current span is the remote parent."""
        ctx = otel_trace.set_span_in_context(NonRecordingSpan(self.span_context()), base)
        if self.from_langfuse:
            ctx = with_app_root_claim(ctx, self.trace_id)
        return ctx


def with_app_root_claim(ctx: otel_context.Context, trace_id: str) -> otel_context.Context:
    """``ctx`` with the baggage entry that tells Langfuse's span processor (here, and in
    any service the baggage header reaches) that trace ``trace_id`` already has its
    app root, as the SDK's ``start_as_current_observation`` sets it."""
    if baggage.get_baggage(_APP_ROOT_CLAIM_BAGGAGE_KEY, ctx) == trace_id:
        return ctx
    return baggage.set_baggage(_APP_ROOT_CLAIM_BAGGAGE_KEY, trace_id, context=ctx)


def without_langfuse_baggage(ctx: otel_context.Context) -> otel_context.Context:
    """``ctx`` without the baggage entries Langfuse reads as trace attributes: what an
    OTel server instrumentation may have extracted from an untrusted caller's
    ``baggage`` header before the request reached this library."""
    for key in baggage.get_all(ctx):
        if key.startswith(_LANGFUSE_BAGGAGE_PREFIX):
            ctx = baggage.remove_baggage(key, ctx)
    return ctx


@dataclass(frozen=True)
class CronRun:
    """A message celery beat sent for one run of a schedule entry."""

    entry: str
    #: When the run was due (Unix time), if the entry's schedule could tell.
    due_at: Optional[float] = None


class Distrusted(NamedTuple):
    """What a sender that is not trusted asked for and did not get."""

    #: The Langfuse ids it named as parent (valid ones only): recorded, not continued.
    claimed_trace_id: Optional[str]
    claimed_parent_id: Optional[str]
    #: Names of the parent and attribute headers it sent that were ignored.
    ignored: tuple[str, ...]

    def metadata(self) -> dict[str, Any]:
        """What the observation that starts instead records (header names, valid ids)."""
        recorded: dict[str, Any] = {"ignored_trace_headers": list(self.ignored)}
        if self.claimed_trace_id:
            recorded["claimed_trace_id"] = self.claimed_trace_id
        if self.claimed_parent_id:
            recorded["claimed_parent_id"] = self.claimed_parent_id
        return recorded


class Extracted(NamedTuple):
    """Everything a consumer reads from one message's headers."""

    parent: Optional[TraceParent]
    attributes: TraceAttributes
    published_at: Optional[float]
    #: Set when beat sent the message; None for every other message.
    cron: Optional[CronRun] = None
    #: Names of trace headers that were present but invalid (or over a limit), and so
    #: ignored (or cut).
    malformed: tuple[str, ...] = ()
    #: Set when the sender was not trusted and sent Langfuse ids or trace attributes.
    distrusted: Optional[Distrusted] = None
    #: The trace a linked message starts (from a trusted sender, without a parent).
    link_trace_id: Optional[str] = None
    #: With ``link_trace_id``: the caller's publish observation that trace links to.
    linked_from: Optional[TraceParent] = None


def inject(
    headers: MutableMapping[str, Any],
    *,
    parent: Optional[TraceParent],
    attributes: TraceAttributes,
    cron: Optional[CronRun] = None,
    signing_key: Optional[bytes] = None,
    link_trace_id: Optional[str] = None,
) -> None:
    """Write the wire format into ``headers``, keeping every other header as it is.

    ``parent`` is the observation the consumer's work becomes a child of; the global
    OTel propagator writes it as ``traceparent`` (and ``tracestate``/``baggage``), and
    the ``x-langfuse-*`` headers repeat it for Langfuse-aware consumers. With
    ``signing_key`` (the producer secret) the parent ids and attributes are signed.
    ``link_trace_id`` (with no ``parent``): the new trace a linked message starts.
    """
    if parent is not None:
        _write_w3c(headers, parent, otel_context.get_current())
        headers[TRACE_ID] = parent.trace_id
        headers[PARENT_ID] = parent.parent_id
        if parent.sampled:
            headers.pop(SAMPLED, None)  # a retry copies the headers it was sent with
        else:
            headers[SAMPLED] = "0"
    if link_trace_id is not None:
        headers[LINK_TRACE_ID] = link_trace_id
    elif LINK_TRACE_ID in headers:
        del headers[LINK_TRACE_ID]  # copied from the message a retry repeats
    if attributes.user_id:
        headers[USER_ID] = attributes.user_id
    if attributes.session_id:
        headers[SESSION_ID] = attributes.session_id
    if attributes.tags:
        headers[TAGS] = json.dumps(list(attributes.tags[:MAX_TAGS]), separators=(",", ":"))
    if attributes.trace_name:
        headers[TRACE_NAME] = attributes.trace_name
    if attributes.environment:
        headers[ENVIRONMENT] = attributes.environment
    if attributes.metadata:
        metadata = attributes.metadata
        if len(metadata) > MAX_METADATA_KEYS:
            metadata = dict(list(metadata.items())[:MAX_METADATA_KEYS])
        headers[METADATA] = json.dumps(dict(metadata), separators=(",", ":"))
    if attributes.version:
        headers[VERSION] = attributes.version
    if attributes.prompt_name and attributes.prompt_version is not None:
        headers[PROMPT_NAME] = attributes.prompt_name
        headers[PROMPT_VERSION] = str(attributes.prompt_version)
    if attributes.skills_available:
        headers[SKILLS_AVAILABLE] = attributes.skills_available
    if attributes.attach_skills is not None:
        headers[ATTACH_SKILLS] = "1" if attributes.attach_skills else "0"
    if cron is not None:
        headers[CRON_ENTRY] = cron.entry
        if cron.due_at is not None:
            headers[CRON_DUE_AT] = f"{cron.due_at:.6f}"
    headers[PUBLISHED_AT] = f"{time.time():.6f}"
    if signing_key is not None:
        headers[SIGNATURE] = signature(headers, signing_key)
    elif SIGNATURE in headers:
        del headers[SIGNATURE]  # copied from the message a retry repeats: no longer true


# What a producer's signature covers: everything that decides where a run goes and
# whose it is. The W3C ``traceparent`` is continued from anyone, so it is not signed.
_SIGNED_HEADERS = (TRACE_ID, PARENT_ID, SAMPLED, *_ATTRIBUTE_HEADERS)


def signature(headers: Mapping[str, Any], key: bytes) -> str:
    """HMAC-SHA256 (hex) of the signed headers' values in ``headers``, under ``key``."""
    mac = hmac.new(key, b"celery-langfuse/1", hashlib.sha256)
    for name in _SIGNED_HEADERS:
        value = headers.get(name)
        if value is None:
            mac.update(b"\n%s-" % name.encode())
            continue
        # Length-prefixed, so no value can pass for the end of one header and the
        # start of the next; a value that is not a string (inject never writes one)
        # signs as a marker that no string matches.
        text = value.encode("utf-8", "replace") if isinstance(value, str) else None
        if text is None:
            mac.update(b"\n%s!" % name.encode())
        else:
            mac.update(b"\n%s=%d:%s" % (name.encode(), len(text), text))
    # Signed only when present, so every message without it signs as before.
    link = headers.get(LINK_TRACE_ID)
    if link is not None:
        text = link.encode("utf-8", "replace") if isinstance(link, str) else b"!"
        mac.update(b"\n%s=%d:%s" % (LINK_TRACE_ID.encode(), len(text), text))
    return mac.hexdigest()


def signed_by(headers: Mapping[str, Any], key: bytes) -> bool:
    """Whether ``headers`` carry a valid signature made with ``key`` (constant time)."""
    received = headers.get(SIGNATURE)
    if not isinstance(received, str) or len(received) != 64 or not received.isascii():
        return False
    return hmac.compare_digest(received, signature(headers, key))


_REDELIVERY_RE = re.compile(r"([0-9]{1,6}):([0-9a-f]{16})?")


def redelivery_value(attempt: int, lost_observation_id: Optional[str]) -> str:
    """The :data:`REDELIVERY` value for a run's ``attempt`` after a lost one."""
    return f"{attempt}:{lost_observation_id or ''}"


def read_redelivery(raw: Any) -> Optional[tuple[int, Optional[str]]]:
    """``(attempt, lost observation id or None)`` from a :data:`REDELIVERY` value."""
    match = _REDELIVERY_RE.fullmatch(raw) if isinstance(raw, str) else None
    if match is None:
        return None
    return int(match.group(1)), match.group(2)


def secret_matches(received: Any, secret: str) -> bool:
    """Whether ``received`` (an HTTP header's value) is ``secret``, compared in constant
    time; anything oversized or not a string is not."""
    if not isinstance(received, str) or len(received) > MAX_SECRET_CHARS:
        return False
    return hmac.compare_digest(
        received.encode("utf-8", "surrogateescape"), secret.encode("utf-8", "surrogateescape")
    )


def _write_w3c(
    headers: MutableMapping[str, Any], parent: TraceParent, ctx: otel_context.Context
) -> None:
    """What the global OTel propagator writes for ``parent`` in ``ctx``: ``traceparent``
    and the context's baggage. With OTel's default propagator and no baggage but the
    app-root claim (the usual case), the two headers are written directly: the same
    strings, without the propagators' generic encoding on every publish."""
    entries = baggage.get_all(ctx)
    claim = parent.trace_id if parent.from_langfuse else entries.get(_APP_ROOT_CLAIM_BAGGAGE_KEY)
    if (
        len(entries) > (_APP_ROOT_CLAIM_BAGGAGE_KEY in entries)  # other entries: encode them
        or not (claim is None or (isinstance(claim, str) and _TRACE_ID_RE.fullmatch(claim)))
        or not _default_propagator()
    ):
        propagate.inject(headers, context=parent.context(ctx))
        return
    flags = "01" if parent.sampled else "00"
    headers[TRACEPARENT] = f"00-{parent.trace_id}-{parent.parent_id}-{flags}"
    if claim is not None:
        headers[_BAGGAGE] = f"{_APP_ROOT_CLAIM_BAGGAGE_KEY}={claim}"


_BAGGAGE = "baggage"
_checked_propagator: tuple[object, bool] = (None, False)


def _default_propagator() -> bool:
    """Whether the global propagator is OTel's default: W3C trace context, then W3C
    baggage (checked once per propagator object; ``set_global_textmap`` replaces it)."""
    global _checked_propagator
    textmap = propagate.get_global_textmap()
    checked, is_default = _checked_propagator
    if checked is not textmap:
        from opentelemetry.baggage.propagation import W3CBaggagePropagator
        from opentelemetry.propagators.composite import CompositePropagator
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parts = getattr(textmap, "_propagators", None)
        is_default = type(textmap) is CompositePropagator and [
            type(part) for part in parts or ()
        ] == [TraceContextTextMapPropagator, W3CBaggagePropagator]
        _checked_propagator = (textmap, is_default)
    return is_default


def extract(headers: Mapping[str, Any], *, trusted: bool = True) -> Extracted:
    """Read the wire format back, tolerating anything: bad values are dropped, and
    their header names listed in :attr:`Extracted.malformed`.

    From a sender that is not ``trusted``, the trace attributes are ignored and so are
    the Langfuse parent ids (a parent Langfuse may never have received, in a trace the
    sender does not own): the ids are recorded in :attr:`Extracted.distrusted` and the
    work starts a trace of its own. A ``traceparent`` alone is still continued, as any
    W3C service continues it.
    """
    reader = _Reader(headers)
    if trusted:
        parent, attributes, distrusted = reader.parent(), reader.attributes(), None
    else:
        parent, attributes, distrusted = reader.distrusted()
    link_trace_id = (
        reader.link_trace_id()
        if trusted and parent is None and headers.get(LINK_TRACE_ID) is not None
        else None
    )
    return Extracted(
        parent=parent,
        attributes=attributes,
        published_at=reader.timestamp(PUBLISHED_AT),
        cron=None if headers.get(CRON_ENTRY) is None else reader.cron_run(),
        link_trace_id=link_trace_id,
        linked_from=None if link_trace_id is None else _linked_from(attributes.metadata),
        malformed=tuple(reader.malformed) if reader.malformed else (),
        distrusted=distrusted,
    )


def _json_depth_at_most(text: str, limit: int) -> bool:
    """Whether ``text``, read as JSON, nests arrays and objects at most ``limit`` deep.
    Most values have few brackets and are answered by counting them."""
    if text.count("[") + text.count("{") <= limit:
        return True
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return False
        elif char in "]}":
            depth -= 1
    return True


def _linked_from(metadata: Mapping[str, str]) -> Optional[TraceParent]:
    """The observation a linked trace's metadata names, if both ids are valid."""
    ids = []
    for key, pattern, zero in (
        (LINKED_FROM_TRACE_ID, _TRACE_ID_RE, _ZERO_TRACE_ID),
        (LINKED_FROM_OBSERVATION_ID, _SPAN_ID_RE, _ZERO_SPAN_ID),
    ):
        try:
            value = json.loads(metadata.get(key) or "null")
        except ValueError:
            return None
        if not (isinstance(value, str) and pattern.fullmatch(value) and value != zero):
            return None
        ids.append(value)
    return TraceParent(ids[0], ids[1])


_NO_ATTRIBUTES = TraceAttributes()


class _Reader:
    """Validates one message's trace headers, noting every header it had to drop."""

    def __init__(self, headers: Mapping[str, Any]) -> None:
        self._headers = headers
        self.malformed: list[str] = []

    def attributes(self) -> TraceAttributes:
        for name in _ATTRIBUTE_HEADERS:
            if self._headers.get(name) is not None:
                break
        else:
            return _NO_ATTRIBUTES  # most messages carry none: skip the validation
        return TraceAttributes(
            user_id=self.short_string(USER_ID),
            session_id=self.short_string(SESSION_ID),
            tags=self.tags(),
            trace_name=self.short_string(TRACE_NAME),
            environment=self.environment(),
            metadata=self.metadata(),
            version=self.short_string(VERSION),
            **self.prompt(),
            skills_available=self.skills_available(),
            attach_skills=self.flag(ATTACH_SKILLS),
        )

    def distrusted(self) -> tuple[Optional[TraceParent], TraceAttributes, Optional[Distrusted]]:
        """An untrusted sender's parent (W3C only), no attributes, and what it claimed."""
        get = self._headers.get
        ignored = tuple(
            name for name in (TRACE_ID, PARENT_ID, *_ATTRIBUTE_HEADERS) if get(name) is not None
        )
        if not ignored:
            return self.parent(), _NO_ATTRIBUTES, None
        claimed_trace_id = self._matching(TRACE_ID, _TRACE_ID_RE, _ZERO_TRACE_ID)
        claimed_parent_id = self._matching(PARENT_ID, _SPAN_ID_RE, _ZERO_SPAN_ID)
        parent = None
        if get(TRACE_ID) is None and get(PARENT_ID) is None:
            parent = self.parent()  # only attributes were ignored: the W3C parent holds
        return parent, _NO_ATTRIBUTES, Distrusted(claimed_trace_id, claimed_parent_id, ignored)

    def _drop(self, name: str, raw: Any) -> None:
        self.malformed.append(name)
        log.debug("ignoring malformed %s header: %.100r", name, raw)

    def _cut(self, name: str, count: int, limit: int) -> None:
        self.malformed.append(name)
        log.debug("keeping the first %d of %d entries of the %s header", limit, count, name)

    def parent(self) -> Optional[TraceParent]:
        # Our own ids first: they name an observation Langfuse received. A traceparent
        # rewritten by another instrumentation may point at a span Langfuse never sees.
        get = self._headers.get
        trace_id, parent_id = get(TRACE_ID), get(PARENT_ID)
        if (
            type(trace_id) is str
            and type(parent_id) is str
            and _TRACE_ID_RE.fullmatch(trace_id)
            and _SPAN_ID_RE.fullmatch(parent_id)
            and trace_id != _ZERO_TRACE_ID
            and parent_id != _ZERO_SPAN_ID
        ):
            pass  # the usual case: both as this library writes them
        elif trace_id is not None or parent_id is not None:
            # Written otherwise (case, spaces), missing one, or bad: checked one by one,
            # noting what is dropped.
            trace_id = self._matching(TRACE_ID, _TRACE_ID_RE, _ZERO_TRACE_ID)
            parent_id = self._matching(PARENT_ID, _SPAN_ID_RE, _ZERO_SPAN_ID)
        if trace_id and parent_id:
            sampled = get(SAMPLED)
            sampled = sampled is None or str(sampled).strip() != "0"
            return TraceParent(trace_id, parent_id, sampled=sampled, from_langfuse=True)
        raw = self._headers.get(TRACEPARENT)
        if raw is None:
            return None
        match = _TRACEPARENT_RE.fullmatch(raw.strip().lower()) if isinstance(raw, str) else None
        if (
            match is None
            or match.group(1) == "ff"
            or match.group(2) == _ZERO_TRACE_ID
            or match.group(3) == _ZERO_SPAN_ID
        ):
            self._drop(TRACEPARENT, raw)
            return None
        sampled = bool(int(match.group(4), 16) & 0x01)
        return TraceParent(match.group(2), match.group(3), sampled=sampled)

    def _matching(self, name: str, pattern: re.Pattern[str], zero: str) -> Optional[str]:
        raw = self._headers.get(name)
        if raw is None:
            return None
        if isinstance(raw, str):
            value = raw.strip().lower()
            if pattern.fullmatch(value) and value != zero:
                return value
        self._drop(name, raw)
        return None

    def link_trace_id(self) -> Optional[str]:
        return self._matching(LINK_TRACE_ID, _TRACE_ID_RE, _ZERO_TRACE_ID)

    def short_string(self, name: str) -> Optional[str]:
        raw = self._headers.get(name)
        if raw is None:
            return None
        if isinstance(raw, str) and 0 < len(raw) <= _MAX_ATTRIBUTE_CHARS and raw.isascii():
            return raw
        self._drop(name, raw)
        return None

    def environment(self) -> Optional[str]:
        raw = self._headers.get(ENVIRONMENT)
        if raw is None:
            return None
        if isinstance(raw, str) and _ENVIRONMENT_RE.fullmatch(raw):
            return raw
        self._drop(ENVIRONMENT, raw)
        return None

    def _json(self, name: str) -> Any:
        raw = self._headers.get(name)
        if raw is None:
            return None
        if (
            isinstance(raw, str)
            and len(raw) <= _MAX_METADATA_CHARS
            and _json_depth_at_most(raw, _MAX_JSON_DEPTH)
        ):
            try:
                return json.loads(raw)
            except ValueError:
                pass
        self._drop(name, raw)
        return None

    def tags(self) -> tuple[str, ...]:
        value = self._json(TAGS)
        if not isinstance(value, list):
            return ()
        if len(value) > MAX_TAGS:
            self._cut(TAGS, len(value), MAX_TAGS)
        return tuple(
            tag
            for tag in value[:MAX_TAGS]
            if isinstance(tag, str) and 0 < len(tag) <= _MAX_ATTRIBUTE_CHARS
        )

    def metadata(self) -> dict[str, str]:
        value = self._json(METADATA)
        if not isinstance(value, dict):
            return {}
        if len(value) > MAX_METADATA_KEYS:
            self._cut(METADATA, len(value), MAX_METADATA_KEYS)
        return {
            key: item
            for key, item in list(value.items())[:MAX_METADATA_KEYS]
            if isinstance(key, str)
            and key.isascii()
            and isinstance(item, str)
            and len(item) <= _MAX_ATTRIBUTE_CHARS
        }

    def prompt(self) -> dict[str, Any]:
        """``prompt_name`` and ``prompt_version``, both or neither."""
        name = self.short_string(PROMPT_NAME)
        raw = self._headers.get(PROMPT_VERSION)
        if name is not None and isinstance(raw, str) and raw.isdigit() and len(raw) <= 10:
            return {"prompt_name": name, "prompt_version": int(raw)}
        if raw is not None:  # bad, or without a usable name
            self._drop(PROMPT_VERSION, raw)
        elif name is not None:  # a name without a version
            self._drop(PROMPT_NAME, name)
        return {}

    def skills_available(self) -> Optional[str]:
        raw = self._headers.get(SKILLS_AVAILABLE)
        if raw is None:
            return None
        value = self._json(SKILLS_AVAILABLE)
        if (
            isinstance(value, list)
            and all(
                isinstance(skill, dict) and isinstance(skill.get("name"), str) for skill in value
            )
            and len(raw) <= _MAX_SKILLS_CHARS
        ):
            return str(raw)
        if value is not None:
            self._drop(SKILLS_AVAILABLE, raw)
        return None

    def flag(self, name: str) -> Optional[bool]:
        raw = self._headers.get(name)
        if raw is None:
            return None
        if raw in ("1", "0"):
            return bool(raw == "1")
        self._drop(name, raw)
        return None

    def cron_run(self) -> Optional[CronRun]:
        entry = self.short_string(CRON_ENTRY)
        if entry is None:
            return None
        return CronRun(entry, due_at=self.timestamp(CRON_DUE_AT))

    def timestamp(self, name: str) -> Optional[float]:
        raw = self._headers.get(name)
        if raw is None:
            return None
        try:
            value = float(raw)
        except (TypeError, ValueError, OverflowError):  # OverflowError: float(10**400)
            self._drop(name, raw)
            return None
        if math.isfinite(value) and value > 0:
            return value
        self._drop(name, raw)
        return None
