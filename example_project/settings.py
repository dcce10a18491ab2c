"""Configuration from environment variables, read once at import.

Langfuse is configured by the SDK's own variables (LANGFUSE_PUBLIC_KEY,
LANGFUSE_SECRET_KEY, LANGFUSE_BASE_URL, LANGFUSE_TRACING_ENVIRONMENT, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

#: Where Celery sends tasks: ``redis://...``, or ``filesystem://`` with BROKER_FOLDER.
BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
#: A folder shared by every process, for the ``filesystem://`` broker only.
BROKER_FOLDER = os.environ.get("CELERY_BROKER_FOLDER", "")
#: Where task results go; defaults to the broker (Redis) or to BROKER_FOLDER/results.
_FILE_RESULTS = f"file://{Path(BROKER_FOLDER, 'results')}"
RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND") or (
    _FILE_RESULTS if BROKER_URL.startswith("filesystem") else BROKER_URL
)
#: The queue the API sends to and the worker consumes.
QUEUE = os.environ.get("CELERY_QUEUE", "summaries")
#: The summaries database (SQLite), shared by the API and the workers.
DATABASE = os.environ.get("SUMMARIES_DATABASE", str(Path.cwd() / "summaries.sqlite3"))
#: Words per chunk: a document is summarised chunk by chunk, in parallel.
CHUNK_WORDS = int(os.environ.get("SUMMARY_CHUNK_WORDS", "40"))
#: Seconds between two runs of the beat schedule's first entry (the second runs half as often).
BEAT_INTERVAL = float(os.environ.get("BEAT_INTERVAL_SECONDS", "60"))
#: Summaries older than this many seconds are purged by beat.
RETENTION_SECONDS = float(os.environ.get("SUMMARY_RETENTION_SECONDS", str(7 * 24 * 3600)))
