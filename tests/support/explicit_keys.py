"""The user-code tasks with a Langfuse client made in code, with explicit keys, before
``install()`` runs: the worker's environment has no ``LANGFUSE_*`` keys at all.

The keys and base URL come from ``CELERY_LANGFUSE_TEST_EXPLICIT_*`` so the test can
point this client at its capture server.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from langfuse import Langfuse

_public_key = os.environ["CELERY_LANGFUSE_TEST_EXPLICIT_PUBLIC_KEY"]
_secret_key = os.environ["CELERY_LANGFUSE_TEST_EXPLICIT_SECRET_KEY"]
_base_url = os.environ["CELERY_LANGFUSE_TEST_EXPLICIT_BASE_URL"]


def _custom_exporter() -> Any:
    """The user's own exporter (CELERY_LANGFUSE_TEST_EXPLICIT_EXPORTER=1): OTel's OTLP
    exporter, uncompressed, to the same endpoint."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    token = base64.b64encode(f"{_public_key}:{_secret_key}".encode()).decode()
    return OTLPSpanExporter(
        endpoint=f"{_base_url}/api/public/otel/v1/traces",
        headers={"Authorization": f"Basic {token}"},
    )


langfuse = Langfuse(
    public_key=_public_key,
    secret_key=_secret_key,
    base_url=_base_url,
    flush_interval=float(os.environ.get("CELERY_LANGFUSE_TEST_EXPLICIT_FLUSH_INTERVAL", "5")),
    span_exporter=(
        _custom_exporter() if os.environ.get("CELERY_LANGFUSE_TEST_EXPLICIT_EXPORTER") else None
    ),
)

from tests.support.user_tasks import app  # noqa: E402  (install() runs after the client)

__all__ = ["app", "langfuse"]
