"""install() is idempotent, creates no client, and uninstall() undoes it."""

from __future__ import annotations

import pytest
from celery import Celery, signals

from celery_langfuse import client, install, uninstall


@pytest.fixture(autouse=True)
def langfuse_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys present, so install() connects its handlers (without them it connects none)."""
    monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", "pk-lf-install")
    monkeypatch.setenv("LANGFUSE_SECRET_KEY", "sk-lf-install")


def _publish_receivers() -> int:
    return len(signals.before_task_publish.receivers)


def test_install_twice_returns_the_same_installation_and_connects_once() -> None:
    app = Celery("install-twice")
    before = _publish_receivers()
    first = install(app)
    second = install(app, flush_timeout=9)
    try:
        assert first is second
        assert second.config.flush_timeout != 9
        # the publish handler is one per process, whatever the number of apps
        assert _publish_receivers() == max(before, 1)
    finally:
        uninstall(app)
    assert _publish_receivers() == before


def test_uninstalling_one_app_keeps_tracing_the_other() -> None:
    first, second = Celery("first"), Celery("second")
    before = _publish_receivers()
    install(first)
    install(second)
    try:
        assert _publish_receivers() == before + (0 if before else 1)
        uninstall(second)
        assert _publish_receivers() == before + (0 if before else 1)
    finally:
        uninstall(first)
        uninstall(second)


def test_uninstall_of_an_app_never_installed_is_a_no_op() -> None:
    uninstall(Celery("never-installed"))


def test_install_creates_no_langfuse_client() -> None:
    # Lazy creation is what makes install() safe before a prefork pool forks.
    app = Celery("lazy")
    saved = client._client
    client._client = None
    try:
        install(app)
        assert client._client is None
    finally:
        uninstall(app)
        client._client = saved


def test_a_worker_main_process_loads_the_exporters_http_client_for_its_pool() -> None:
    # Prefork children inherit what the main process imported before the pool forked:
    # the export thread's HTTP client is loaded at worker_init, not by each child at its
    # first batch, while it runs tasks. A fresh interpreter: this one has it already.
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from celery import Celery, signals\n"
        "from celery_langfuse import install\n"
        "install(Celery('w'))\n"
        "print('requests' in sys.modules)\n"
        "signals.worker_init.send(sender=None)\n"
        "print('requests' in sys.modules)\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "LANGFUSE_PUBLIC_KEY": "pk-lf-test",
        "LANGFUSE_SECRET_KEY": "sk-lf-test",
        "LANGFUSE_BASE_URL": "http://127.0.0.1:9",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]
