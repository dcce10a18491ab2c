"""The summaries database: SQLite, shared by the API and the workers."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import settings

_SCHEMA = """
CREATE TABLE IF NOT EXISTS summaries (
    id TEXT PRIMARY KEY,
    user_id TEXT,
    title TEXT,
    status TEXT NOT NULL,
    chunks INTEGER,
    summary TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)
"""


@contextmanager
def _connection() -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(settings.DATABASE, timeout=10)
    connection.row_factory = sqlite3.Row
    try:
        with connection:
            connection.execute(_SCHEMA)
            yield connection
    finally:
        connection.close()


def create(summary_id: str, *, user_id: str | None, title: str) -> None:
    now = time.time()
    with _connection() as db:
        db.execute(
            "INSERT INTO summaries (id, user_id, title, status, created_at, updated_at) "
            "VALUES (?, ?, ?, 'queued', ?, ?)",
            (summary_id, user_id, title, now, now),
        )


def update(summary_id: str, **fields: Any) -> None:
    columns = ", ".join(f"{name} = ?" for name in fields)
    with _connection() as db:
        db.execute(
            f"UPDATE summaries SET {columns}, updated_at = ? WHERE id = ?",
            (*fields.values(), time.time(), summary_id),
        )


def get(summary_id: str) -> dict[str, Any] | None:
    with _connection() as db:
        row = db.execute("SELECT * FROM summaries WHERE id = ?", (summary_id,)).fetchone()
    return dict(row) if row is not None else None


def purge_older_than(seconds: float) -> int:
    with _connection() as db:
        cursor = db.execute(
            "DELETE FROM summaries WHERE status = 'done' AND updated_at < ?",
            (time.time() - seconds,),
        )
    return cursor.rowcount


def count_by_status() -> dict[str, int]:
    with _connection() as db:
        rows = db.execute("SELECT status, COUNT(*) AS n FROM summaries GROUP BY status").fetchall()
    return {row["status"]: row["n"] for row in rows}
