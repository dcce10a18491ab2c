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


def _prerun_receivers() -> int:
    return len(signals.task_prerun.receivers)


def _publish_handler_connected() -> bool:
    from celery_langfuse.publish import on_before_task_publish

    return any(r is on_before_task_publish for _, r in signals.before_task_publish.receivers)


def test_install_twice_returns_the_same_installation_and_connects_once() -> None:
    app = Celery("install-twice")
    before = _prerun_receivers()
    first = install(app)
    second = install(app, flush_timeout=9)
    try:
        assert first is second
        assert second.config.flush_timeout != 9
        assert _prerun_receivers() == before + 1
        assert _publish_handler_connected()
    finally:
        uninstall(app)
    assert _prerun_receivers() == before


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


def test_uninstalling_one_app_keeps_tracing_the_others() -> None:
    kept, removed = Celery("kept"), Celery("removed")
    install(kept)
    install(removed)
    try:
        uninstall(removed)
        assert _publish_handler_connected()
    finally:
        uninstall(kept)
