"""The user-code tasks with a Langfuse client made in code, with explicit keys, before
``install()`` runs: the worker's environment has no ``LANGFUSE_*`` keys at all.

The keys and base URL come from ``CELERY_LANGFUSE_TEST_EXPLICIT_*`` so the test can
point this client at its capture server.
"""

from __future__ import annotations

import os

from langfuse import Langfuse

langfuse = Langfuse(
    public_key=os.environ["CELERY_LANGFUSE_TEST_EXPLICIT_PUBLIC_KEY"],
    secret_key=os.environ["CELERY_LANGFUSE_TEST_EXPLICIT_SECRET_KEY"],
    base_url=os.environ["CELERY_LANGFUSE_TEST_EXPLICIT_BASE_URL"],
    flush_interval=float(os.environ.get("CELERY_LANGFUSE_TEST_EXPLICIT_FLUSH_INTERVAL", "5")),
)

from tests.support.user_tasks import app  # noqa: E402  (install() runs after the client)

__all__ = ["app", "langfuse"]
