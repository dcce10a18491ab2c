"""``install(app)`` / ``uninstall(app)``: connect and disconnect every signal handler.

Celery signals are process-wide, so the handlers are connected once per process and
serve every installed app; worker-side handlers skip tasks of apps that were not
installed. Connecting is all ``install`` does: no Langfuse client is created until a
message is published or a task runs, so it is safe at import time of the app module,
before a prefork pool forks.

Settings are resolved and validated here, once (see ``config.py``). Without Langfuse
keys, with ``enabled`` off, or with the SDK's ``LANGFUSE_TRACING_ENABLED=false``,
``install`` connects nothing: tracing is off, with one warning for the missing keys,
and every task runs exactly as without this library.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from celery import Celery, signals

from . import client, publish
from .config import TracingConfig
from .publish import on_before_task_publish
from .worker import WorkerTracing

log = logging.getLogger(__name__)

_MISSING_KEYS_WARNING = (
    "celery-langfuse: LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY are not both set and no "
    "Langfuse client exists, so tracing is off for app %r. Set both variables (or create "
    "a langfuse.Langfuse client before install()); `celery-langfuse doctor -A <app>` checks "
    "the setup."
)


@dataclass
class Installation:
    """What ``install(app)`` returns: the app, its settings and its handlers."""

    app: Celery
    config: TracingConfig
    worker: WorkerTracing
    #: Why nothing is connected, when tracing is off; None when it is on.
    off_reason: str | None = None
    _connections: list[tuple[Any, Callable[..., Any]]] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.off_reason is None

    def connect(self) -> None:
        worker = self.worker
        for signal, handler in (
            (signals.before_task_publish, on_before_task_publish),
            (signals.task_prerun, self._for_app(worker.on_task_prerun)),
            (signals.task_failure, self._for_app(worker.on_task_failure)),
            (signals.task_postrun, worker.on_task_postrun),
            (signals.task_internal_error, worker.on_task_internal_error),
            (signals.task_revoked, worker.on_task_revoked),
            (signals.task_unknown, worker.on_task_unknown),
            (signals.task_rejected, worker.on_task_rejected),
            (signals.worker_process_shutdown, self.flush),
            (signals.worker_shutdown, self.flush),
        ):
            signal.connect(handler, weak=False)
            self._connections.append((signal, handler))

    def disconnect(self) -> None:
        for signal, handler in self._connections:
            signal.disconnect(handler)
        self._connections.clear()

    def connected_signals(self) -> list[tuple[str, bool]]:
        """``(signal name, still connected)`` for every handler ``connect`` connected."""
        return [
            (getattr(signal, "name", None) or repr(signal), _is_connected(signal, handler))
            for signal, handler in self._connections
        ]

    def flush(self, **_: Any) -> None:
        """Send buffered observations, bounded by ``flush_timeout``."""
        client.flush(self.config.flush_timeout)

    def _for_app(self, handler: Callable[..., None]) -> Callable[..., None]:
        app = self.app

        def only_this_app(sender: Any = None, **kwargs: Any) -> None:
            if getattr(sender, "app", app) is app:
                handler(sender=sender, **kwargs)

        return only_this_app


def _is_connected(signal: Any, handler: Callable[..., Any]) -> bool:
    # Connected with weak=False, so Celery keeps the handler itself, not a weakref.
    receivers = getattr(signal, "receivers", None) or ()
    return any(receiver is handler for _, receiver in receivers)


_installations: dict[int, Installation] = {}
_lock = threading.Lock()
_warned_missing_keys = False


def install(app: Celery, **options: Any) -> Installation:
    """Trace every task of ``app`` in Langfuse. Idempotent: a second call returns the
    same installation unchanged. Options are the fields of :class:`TracingConfig`,
    resolved with the ``CELERY_LANGFUSE_*`` variables and the environment preset; a
    wrong value raises :class:`~celery_langfuse.config.ConfigurationError`."""
    global _warned_missing_keys
    if not isinstance(app, Celery):
        raise TypeError(f"install() needs a celery.Celery app, got {type(app).__name__}")
    with _lock:
        existing = _installations.get(id(app))
        if existing is not None:
            return existing
        config = TracingConfig.resolve(options)
        off_reason = None
        if not config.enabled:
            off_reason = f"disabled by enabled=False ({config.source_of('enabled')})"
        elif os.environ.get("LANGFUSE_TRACING_ENABLED", "").strip().lower() == "false":
            off_reason = "disabled by LANGFUSE_TRACING_ENABLED=false (the SDK sends nothing)"
        elif not client.langfuse_keys_configured():
            off_reason = "Langfuse keys missing (LANGFUSE_PUBLIC_KEY, LANGFUSE_SECRET_KEY)"
            if not _warned_missing_keys:
                _warned_missing_keys = True
                log.warning(_MISSING_KEYS_WARNING, app.main)
        installation = Installation(
            app=app, config=config, worker=WorkerTracing(config), off_reason=off_reason
        )
        if installation.enabled:
            installation.connect()
        _installations[id(app)] = installation
        _apply_process_settings()
        return installation


def uninstall(app: Celery) -> None:
    """Disconnect everything ``install(app)`` connected. A no-op if not installed."""
    with _lock:
        installation = _installations.pop(id(app), None)
        if installation is not None:
            installation.disconnect()
            _apply_process_settings()


def installation_for(app: Celery) -> Installation | None:
    """The installation of ``app`` in this process, if ``install(app)`` was called."""
    with _lock:
        return _installations.get(id(app))


def _apply_process_settings() -> None:
    """Settings that are one per process follow the first installed app that traces.

    Celery's publish signal does not say which app sends a message, and the process
    has one Langfuse client; with several installed apps, the first one decides.
    """
    active = [i for i in _installations.values() if i.enabled]
    if active:
        # One publish handler serves every app (Celery connects a function once), so
        # uninstalling one app must not take it from the others.
        signals.before_task_publish.connect(on_before_task_publish, weak=False)
        first = active[0].config
        publish.policy = first.policy
        client.client_settings = client.ClientSettings(first.flush_at, first.flush_interval)
        client.exit_flush_timeout = max(i.config.flush_timeout for i in active)
    else:
        publish.policy = None
