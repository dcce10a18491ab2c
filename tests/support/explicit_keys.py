"""The user-code tasks with a Langfuse client made in code, with explicit keys, before
``install()`` runs: the worker's environment has no ``LANGFUSE_*`` keys at all.

The keys and base URL come from ``CELERY_LANGFUSE_TEST_EXPLICIT_*`` so the test can
point this client at its capture server. Optionally the user brings their own export:

- ``CELERY_LANGFUSE_TEST_EXPLICIT_EXPORTER=<mark>``: the client's exporter is the
  user's own, which adds the resource attribute ``test.exported_by=<mark>`` to every
  span it sends, so the capture server shows which exporter sent a span;
- ``CELERY_LANGFUSE_TEST_EXPLICIT_SPAN_FILE=<path>``: the user adds a span processor of
  their own to the client's tracer provider, a batch processor whose exporter appends
  each span to that file as a JSON line; its timer never fires during a test, so only
  a flush writes there.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from typing import Any

from langfuse import Langfuse
from opentelemetry import trace as otel_trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

_public_key = os.environ["CELERY_LANGFUSE_TEST_EXPLICIT_PUBLIC_KEY"]
_secret_key = os.environ["CELERY_LANGFUSE_TEST_EXPLICIT_SECRET_KEY"]
_base_url = os.environ["CELERY_LANGFUSE_TEST_EXPLICIT_BASE_URL"]

class MarkingExporter(OTLPSpanExporter):
    """The user's own exporter: OTel's OTLP exporter, uncompressed, to the same
    endpoint, adding ``test.exported_by=<mark>`` to the resource of each span it sends."""

    def __init__(self, mark: str, **options: Any) -> None:
        super().__init__(**options)
        self._mark = Resource({"test.exported_by": mark})

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return super().export([self._marked(span) for span in spans])

    def _marked(self, span: ReadableSpan) -> ReadableSpan:
        return ReadableSpan(
            name=span.name,
            context=span.context,
            parent=span.parent,
            resource=(span.resource or Resource.get_empty()).merge(self._mark),
            attributes=span.attributes,
            events=span.events,
            links=span.links,
            kind=span.kind,
            status=span.status,
            start_time=span.start_time,
            end_time=span.end_time,
            instrumentation_scope=span.instrumentation_scope,
        )


class JsonLinesExporter(SpanExporter):
    """Appends each span (name, ids, the exporting process) to a file, a JSON line each,
    one write per batch."""

    def __init__(self, path: str) -> None:
        self._path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(_described(span)) + "\n" for span in spans)
        with open(self._path, "a") as file:
            file.write(lines)
        return SpanExportResult.SUCCESS


def _described(span: ReadableSpan) -> dict[str, Any]:
    context, parent = span.context, span.parent
    return {
        "name": span.name,
        "trace_id": format(context.trace_id, "032x") if context else None,
        "id": format(context.span_id, "016x") if context else None,
        "parent_id": format(parent.span_id, "016x") if parent else None,
        "pid": os.getpid(),
    }


def _custom_exporter(mark: str) -> MarkingExporter:
    token = base64.b64encode(f"{_public_key}:{_secret_key}".encode()).decode()
    return MarkingExporter(
        mark,
        endpoint=f"{_base_url}/api/public/otel/v1/traces",
        headers={"Authorization": f"Basic {token}"},
    )


_mark = os.environ.get("CELERY_LANGFUSE_TEST_EXPLICIT_EXPORTER")
langfuse = Langfuse(
    public_key=_public_key,
    secret_key=_secret_key,
    base_url=_base_url,
    flush_interval=float(os.environ.get("CELERY_LANGFUSE_TEST_EXPLICIT_FLUSH_INTERVAL", "5")),
    span_exporter=_custom_exporter(_mark) if _mark else None,
)

if os.environ.get("CELERY_LANGFUSE_TEST_EXPLICIT_SPAN_FILE"):
    # The client's tracer provider is the global one it registered (none existed).
    provider: Any = otel_trace.get_tracer_provider()
    provider.add_span_processor(
        BatchSpanProcessor(
            JsonLinesExporter(os.environ["CELERY_LANGFUSE_TEST_EXPLICIT_SPAN_FILE"]),
            schedule_delay_millis=600_000,
        )
    )

from tests.support.user_tasks import app  # noqa: E402  (install() runs after the client)

__all__ = ["app", "langfuse"]
