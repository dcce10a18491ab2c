"""Fixtures of the Django tests: Django set up on this project against the real
PostgreSQL, and its Celery app served by a real in-thread worker.

``DJANGO_SETTINGS_MODULE`` is set only while a Django test module runs: Celery installs
its Django fixup into every app created while it is set, which other tests' apps must
not get. Django itself stays set up for the rest of the session (it cannot be undone),
but the app's installation is undone after each module, so tests that follow find
the process's tracing as they expect it (the first installed app decides
process-wide settings).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from celery_langfuse.testing import CaptureServer
from tests.conftest import in_thread_worker, require_redis

from . import database

SETTINGS_MODULE = "tests.support.django_site.settings"


@pytest.fixture(scope="module")
def django_site(langfuse_capture: CaptureServer) -> Iterator[Any]:
    """The project's Celery app, after ``django.setup()`` and migrations."""
    if not database.postgres_answers():
        pytest.fail("PostgreSQL must answer on 127.0.0.1:5432 for the Django tests")
    require_redis()
    database.ensure_database()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_SETTINGS_MODULE", SETTINGS_MODULE)
        import django

        django.setup()
        database.migrate()
        from celery_langfuse import install, uninstall
        from celery_langfuse._install import installation_for
        from tests.support.django_site import celery_app

        if installation_for(celery_app) is None:  # undone by an earlier module
            install(celery_app)  # as proj/celery.py does
        celery_app.control.purge()
        try:
            yield celery_app
        finally:
            uninstall(celery_app)


@pytest.fixture(scope="module")
def django_worker(django_site: Any) -> Iterator[Any]:
    """A real in-thread worker (threads pool) for the project's app."""
    with in_thread_worker(django_site, pool="threads", concurrency=2) as worker:
        yield worker
