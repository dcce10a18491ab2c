"""OTLP/protobuf encoding of spans, written by hand: the wire format Langfuse ingests.

The OpenTelemetry exporter builds a tree of protobuf objects for every span and every
attribute, then serialises it; for the small spans of a task run that costs more than
recording the span. Here a span is encoded once, when it ends, straight to the bytes
of an OTLP ``Span`` message (field numbers from opentelemetry-proto's
``trace/v1/trace.proto`` and ``common/v1/common.proto``), and a batch request is the
concatenation of those bytes inside one resource and one instrumentation scope.
tests/test_lean_spans.py decodes what this writes with the official protobuf classes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional

_SMALL_VARINTS = tuple(bytes((n,)) for n in range(128))
_FIXED64 = struct.Struct("<Q").pack
_DOUBLE = struct.Struct("<d").pack
_FIXED32 = struct.Struct("<I").pack

# Span.kind INTERNAL; Span.flags: "has is_remote" (0x100), "parent is remote" (0x200),
# as the OTel SDK's encoder writes them.
_KIND_INTERNAL = b"\x30\x01"
_FLAGS_LOCAL_PARENT = b"\x85\x01" + _FIXED32(0x100)
_FLAGS_REMOTE_PARENT = b"\x85\x01" + _FIXED32(0x300)
# Link.flags of a link to a remote span: "has is_remote", "is remote".
_LINK_FLAGS_REMOTE = b"\x35" + _FIXED32(0x300)

#: Status codes of the OTLP Status message.
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag byte(s), the length, the payload."""
    return tag + _varint(len(payload)) + payload


def _any_value(value: Any) -> bytes:
    """An ``AnyValue`` message for an OTel attribute value."""
    if isinstance(value, str):
        return _field(b"\x0a", value.encode("utf-8", "replace"))
    if isinstance(value, bool):  # before int: bool is an int
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64, two's complement
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(item)) for item in value))
    if isinstance(value, Mapping):
        return _field(
            b"\x32", b"".join(_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items())
        )
    return _field(b"\x0a", str(value).encode("utf-8", "replace"))


_key_prefixes: dict[str, bytes] = {}


def _key_value(key: str, value: Any) -> bytes:
    """A ``KeyValue`` message; the encoded key is cached (the same few keys recur)."""
    prefix = _key_prefixes.get(key)
    if prefix is None:
        prefix = _field(b"\x0a", key.encode("utf-8", "replace"))
        if len(_key_prefixes) < 4096:
            _key_prefixes[key] = prefix
    return prefix + _field(b"\x12", _any_value(value))


#: Whole ``KeyValue`` fields of short string and boolean attributes, which recur from
#: span to span (type, environment, level, app-root mark ...); bounded like the keys.
_short_fields: dict[tuple[bytes, str, Any], bytes] = {}
_SHORT = 40


#: A lean span's metadata, given when it starts, as a dict: written as the SDK writes
#: an observation's metadata, one ``langfuse.observation.metadata.<key>`` attribute a
#: key with the installed SDK's encoding of the value (``_sdk.metadata_encoder``), here
#: on the export thread rather than on the task's.
METADATA = "langfuse.observation.metadata"


def attributes(tag: bytes, values: Mapping[str, Any]) -> bytes:
    """Repeated ``KeyValue`` fields under ``tag``; None values are left out."""
    parts = []
    for key, value in values.items():  # a loop: this runs for every span
        if value is None:
            continue
        if key == METADATA and type(value) is dict:
            parts.append(_metadata_attributes(tag, value))
            continue
        kind = type(value)
        if kind is bool or (kind is str and len(value) <= _SHORT):
            cache_key = (tag, key, value)
            field = _short_fields.get(cache_key)
            if field is None:
                field = _field(tag, _key_value(key, value))
                if len(_short_fields) < 4096:
                    _short_fields[cache_key] = field
            parts.append(field)
        else:
            parts.append(_field(tag, _key_value(key, value)))
    return b"".join(parts)


class FinishedSpan(NamedTuple):
    """What an ended span sends: encoded later, on the export thread."""

    trace_id: int
    span_id: int
    parent_id: Optional[int]
    parent_is_remote: bool
    name: str
    start_ns: int
    end_ns: int
    attributes: Mapping[str, Any]
    events: Sequence[tuple[str, int, Mapping[str, Any]]] = ()
    status_code: int = STATUS_UNSET
    status_message: Optional[str] = None
    #: OTel span links, each ``(trace id, span id)`` of a remote span.
    links: Sequence[tuple[int, int]] = ()


def encode_span(span: FinishedSpan) -> bytes:
    """One span, as the ``spans`` field (2) of a ``ScopeSpans`` message."""
    (trace_id, span_id, parent_id, parent_is_remote, name, start_ns, end_ns) = span[:7]
    parts = [
        b"\x0a\x10",
        trace_id.to_bytes(16, "big"),
        b"\x12\x08",
        span_id.to_bytes(8, "big"),
    ]
    if parent_id is not None:
        parts += (b"\x22\x08", parent_id.to_bytes(8, "big"))
    parts += (
        _field(b"\x2a", name.encode("utf-8", "replace")),
        _KIND_INTERNAL,
        b"\x39",
        _FIXED64(start_ns),
        b"\x41",
        _FIXED64(end_ns),
        attributes(b"\x4a", span.attributes),
    )
    for event_name, time_ns, event_attributes in span.events:
        event = b"\x09" + _FIXED64(time_ns) + _field(b"\x12", event_name.encode("utf-8", "replace"))
        parts.append(_field(b"\x5a", event + attributes(b"\x1a", event_attributes)))
    for link_trace_id, link_span_id in span.links:
        link = b"\x0a\x10" + link_trace_id.to_bytes(16, "big") + b"\x12\x08"
        parts.append(_field(b"\x6a", link + link_span_id.to_bytes(8, "big") + _LINK_FLAGS_REMOTE))
    if span.status_code != STATUS_UNSET:
        status = b"\x18" + _varint(span.status_code)
        if span.status_message:
            status = _field(b"\x12", span.status_message.encode("utf-8", "replace")) + status
        parts.append(_field(b"\x7a", status))
    parts.append(_FLAGS_REMOTE_PARENT if parent_is_remote else _FLAGS_LOCAL_PARENT)
    return _field(b"\x12", b"".join(parts))


def encode_scope(
    *,
    resource_attributes: Mapping[str, Any],
    scope_name: str,
    scope_version: Optional[str],
    scope_attributes: Mapping[str, Any],
) -> tuple[bytes, bytes]:
    """The parts of a request that are the same for every batch: the ``Resource``
    field and the ``InstrumentationScope`` field, ready for :func:`encode_request`."""
    resource = _field(b"\x0a", attributes(b"\x0a", resource_attributes))
    scope = _field(b"\x0a", scope_name.encode()) + attributes(b"\x1a", scope_attributes)
    if scope_version:
        scope += _field(b"\x12", scope_version.encode())
    return resource, _field(b"\x0a", scope)


def encode_request(scope: tuple[bytes, bytes], spans: Sequence[bytes]) -> bytes:
    """An ``ExportTraceServiceRequest`` of encoded spans, all in one resource and scope."""
    resource, instrumentation_scope = scope
    scope_spans = _field(b"\x12", instrumentation_scope + b"".join(spans))
    return _field(b"\x0a", resource + scope_spans)


def _metadata_attributes(tag: bytes, metadata: Mapping[str, Any]) -> bytes:
    # Not through the short-field cache: metadata values (task ids ...) rarely recur.
    encode = _metadata_encoder()
    parts = []
    for key, value in metadata.items():
        encoded = encode(value)
        if encoded is not None:
            parts.append(_field(tag, _key_value(f"{METADATA}.{key}", encoded)))
    return b"".join(parts)


_encoder: Any = None


def _metadata_encoder() -> Any:
    global _encoder
    if _encoder is None:
        from . import _sdk

        _encoder = _sdk.installed().metadata_encoder()
    return _encoder
