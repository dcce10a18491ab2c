"""install() is idempotent, creates no client, and uninstall() undoes it."""

from __future__ import annotations

from celery import Celery, signals

from celery_langfuse import client, install, uninstall


def _publish_receivers() -> int:
    # task_prerun, not before_task_publish: its handler is wrapped per app, so the count
    # moves even when another installed app already connected the shared publish handler.
    return len(signals.task_prerun.receivers)


def test_install_twice_returns_the_same_installation_and_connects_once() -> None:
    app = Celery("install-twice")
    before = _publish_receivers()
    first = install(app)
    second = install(app, flush_timeout=9)
    try:
        assert first is second
        assert second.config.flush_timeout != 9
        assert _publish_receivers() == before + 1
    finally:
        uninstall(app)
    assert _publish_receivers() == before


def test_uninstalling_one_app_keeps_the_publish_context_of_another() -> None:
    first, second = Celery("first"), Celery("second")
    install(first)
    install(second)
    try:
        uninstall(first)
        headers: dict[str, object] = {}
        signals.before_task_publish.send(sender="some.task", body=None, headers=headers)
        assert "x-langfuse-published-at" in headers
    finally:
        uninstall(second)
        uninstall(first)


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
