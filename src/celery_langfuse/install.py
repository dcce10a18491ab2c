"""``install(app)`` / ``uninstall(app)``: connect and disconnect every signal handler.

Celery signals are process-wide, so the handlers are connected once per process and
serve every installed app; worker-side handlers skip tasks of apps that were not
installed. Connecting is all ``install`` does: no Langfuse client is created until a
message is published or a task runs, so it is safe at import time of the app module,
before a prefork pool forks. The exception is durable mode, which creates the client at
once so that user code calling ``langfuse.get_client()`` later shares its exporter;
that is safe before a fork too, as the SDK restarts its threads in the child.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from celery import Celery, signals

from . import client
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
    _connections: list[tuple[Any, Callable[..., Any]]] = field(default_factory=list)

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

    def flush(self, **_: Any) -> None:
        """Send buffered observations, bounded by ``flush_timeout``."""
        client.flush(self.config.flush_timeout)

    def _for_app(self, handler: Callable[..., None]) -> Callable[..., None]:
        app = self.app

        def only_this_app(sender: Any = None, **kwargs: Any) -> None:
            if getattr(sender, "app", app) is app:
                handler(sender=sender, **kwargs)

        return only_this_app


_installations: dict[int, Installation] = {}
_lock = threading.Lock()


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
        installation = Installation(app=app, config=config, worker=WorkerTracing(config))
        installation.connect()
        _installations[id(app)] = installation
        client.exit_flush_timeout = max(i.config.flush_timeout for i in _installations.values())
    if config.export == "durable":
        assert config.durable_url is not None  # validated by TracingConfig
        client.export_durably(
            client.DurableExport(config.durable_url, config.durable_queue, config.durable_max_bytes)
        )
    return installation


def uninstall(app: Celery) -> None:
    """Disconnect everything ``install(app)`` connected. A no-op if not installed."""
    with _lock:
        installation = _installations.pop(id(app), None)
        if installation is not None:
            installation.disconnect()
            if _installations:
                # One publish handler serves every app (a publish names no app to
                # filter on): the apps still installed keep it.
                signals.before_task_publish.connect(on_before_task_publish, weak=False)
