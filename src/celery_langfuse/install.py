"""``install(app)`` / ``uninstall(app)``: connect and disconnect every signal handler.

Celery signals are process-wide. The publish handler (a message does not say which
app sent it) and the shutdown flush are connected once per process, while any app is
installed; each installation connects its own worker-side handlers, which skip tasks
of other apps. Connecting is all ``install`` does: no Langfuse client is created until a
message is published or a task runs, so it is safe at import time of the app module,
before a prefork pool forks.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from celery import Celery, signals

from . import client
from .beat import BeatTracing
from .config import TracingConfig
from .publish import on_before_task_publish
from .worker import WorkerTracing

log = logging.getLogger(__name__)


@dataclass
class Installation:
    """What ``install(app)`` returns: the app, its settings and its handlers."""

    app: Celery
    config: TracingConfig
    worker: WorkerTracing
    beat: BeatTracing
    _connections: list[tuple[Any, Callable[..., Any]]] = field(default_factory=list)

    def connect(self) -> None:
        worker = self.worker
        _connect(
            self._connections,
            (signals.task_prerun, self._for_app(worker.on_task_prerun)),
            (signals.task_failure, self._for_app(worker.on_task_failure)),
            (signals.task_postrun, self._for_app(worker.on_task_postrun)),
            (signals.task_internal_error, self._for_app(worker.on_task_internal_error)),
            (signals.task_revoked, self._for_app(worker.on_task_revoked)),
            (signals.task_unknown, self._for_app(worker.on_task_unknown)),
            (signals.task_rejected, self._for_app(worker.on_task_rejected)),
            (signals.beat_init, self.beat.on_beat_init),
            (signals.beat_embedded_init, self.beat.on_beat_embedded_init),
        )

    def disconnect(self) -> None:
        _disconnect(self._connections)
        self.beat.unwrap()

    def _for_app(self, handler: Callable[..., None]) -> Callable[..., None]:
        app = self.app

        def only_this_app(sender: Any = None, **kwargs: Any) -> None:
            # sender is the task, or the consumer for unknown/rejected messages
            if getattr(sender, "app", app) is app:
                handler(sender=sender, **kwargs)

        return only_this_app


_installations: dict[int, Installation] = {}
_process_connections: list[tuple[Any, Callable[..., Any]]] = []
_lock = threading.Lock()


def _flush_before_exit(**_: Any) -> None:
    """Prefork children exit through ``os._exit``: this signal is their last chance."""
    client.flush(client.exit_flush_timeout)


def _connect(
    connections: list[tuple[Any, Callable[..., Any]]], *pairs: tuple[Any, Callable[..., Any]]
) -> None:
    for signal, handler in pairs:
        signal.connect(handler, weak=False)
        connections.append((signal, handler))


def _disconnect(connections: list[tuple[Any, Callable[..., Any]]]) -> None:
    for signal, handler in connections:
        signal.disconnect(handler)
    connections.clear()


def install(app: Celery, **options: Any) -> Installation:
    """Trace every task of ``app`` in Langfuse. Idempotent: a second call returns the
    same installation unchanged. Options are the fields of :class:`TracingConfig`;
    a wrong value raises :class:`~celery_langfuse.config.ConfigurationError`."""
    if not isinstance(app, Celery):
        raise TypeError(f"install() needs a celery.Celery app, got {type(app).__name__}")
    with _lock:
        existing = _installations.get(id(app))
        if existing is not None:
            return existing
        config = TracingConfig.from_options(options)
        installation = Installation(
            app=app, config=config, worker=WorkerTracing(config), beat=BeatTracing(app, config)
        )
        installation.connect()
        if not _installations:
            _connect(
                _process_connections,
                (signals.before_task_publish, on_before_task_publish),
                (signals.worker_process_shutdown, _flush_before_exit),
                (signals.worker_shutdown, _flush_before_exit),
            )
        _installations[id(app)] = installation
        client.exit_flush_timeout = max(i.config.flush_timeout for i in _installations.values())
        return installation


def uninstall(app: Celery) -> None:
    """Disconnect everything ``install(app)`` connected. A no-op if not installed."""
    with _lock:
        installation = _installations.pop(id(app), None)
        if installation is None:
            return
        installation.disconnect()
        if not _installations:
            _disconnect(_process_connections)
