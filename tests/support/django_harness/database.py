"""The tests' PostgreSQL role and database, made through ``su postgres -c psql``.

Idempotent: the role and the database are created when missing, and Django's
migrations (plus tables of the unmigrated ``shop`` app) are applied on each call.
"""

from __future__ import annotations

import os
import socket
import subprocess

NAME = os.environ.get("CELERY_LANGFUSE_TEST_DJANGO_DB", "celery_langfuse_django")
PASSWORD = "celery-langfuse-tests"


def postgres_answers(timeout: float = 2.0) -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout).close()
        return True
    except OSError:
        return False


def _psql(sql: str) -> str:
    result = subprocess.run(
        ["su", "postgres", "-c", f'psql -v ON_ERROR_STOP=1 -tAc "{sql}"'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(f"psql failed ({sql}): {result.stderr.strip()}")
    return result.stdout.strip()


def ensure_database() -> None:
    """Create the role and database if they are missing."""
    if _psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{NAME}'") != "1":
        _psql(f"CREATE ROLE {NAME} LOGIN PASSWORD '{PASSWORD}'")
    if _psql(f"SELECT 1 FROM pg_database WHERE datname = '{NAME}'") != "1":
        _psql(f"CREATE DATABASE {NAME} OWNER {NAME}")


def migrate() -> None:
    """Apply migrations in this (already set up) Django process."""
    from django.core.management import call_command

    call_command("migrate", run_syncdb=True, verbosity=0, interactive=False)
