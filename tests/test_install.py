"""install() is idempotent, creates no client, and uninstall() undoes it."""

from __future__ import annotations

from celery import Celery, signals

from celery_langfuse import client, install, uninstall


def _publish_receivers() -> int:
    return len(signals.before_task_publish.receivers)


def test_install_twice_returns_the_same_installation_and_connects_once() -> None:
    app = Celery("install-twice")
    before = _publish_receivers()
    first = install(app)
    # +1 unless another installed app (one of the tests' own) already connected it.
    connected = _publish_receivers()
    second = install(app, flush_timeout=9)
    try:
        assert first is second
        assert second.config.flush_timeout != 9
        assert connected in (before, before + 1)
        assert _publish_receivers() == connected
    finally:
        uninstall(app)
    assert _publish_receivers() == before


def test_uninstalling_one_app_keeps_the_other_apps_traced() -> None:
    first, second = Celery("first"), Celery("second")
    install(first)
    install(second)
    try:
        uninstall(first)
        message_headers: dict[str, object] = {}
        signals.before_task_publish.send(sender="tasks.x", headers=message_headers)
        assert "x-langfuse-published-at" in message_headers
    finally:
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
