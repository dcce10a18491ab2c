"""``install(app)`` / ``uninstall(app)``: connect and disconnect every signal handler.

Celery signals are process-wide. The publish handler (a message does not say which
app sent it) and the shutdown flush are connected once per process, while any app is
installed; each installation connects its own worker-side handlers, which skip tasks
of other apps. Connecting is all ``install`` does: no Langfuse client is created until a
message is published or a task runs, so it is safe at import time of the app module,
before a prefork pool forks. The exception is durable mode, which creates the client at
once so that user code calling ``langfuse.get_client()`` later shares its exporter;
that is safe before a fork too, as the SDK restarts its threads in the child.

Settings are resolved and validated here, once (see ``config.py``). Without Langfuse
keys, with ``enabled`` off, or with the SDK's ``LANGFUSE_TRACING_ENABLED=false``,
``install`` connects nothing: tracing is off, with one warning for the missing keys,
and every task runs exactly as without this library. An unsupported Langfuse SDK
(outside ``langfuse>=4.7,<6``, see ``_sdk.py``) is refused with a
:class:`~celery_langfuse.config.ConfigurationError` before anything is connected.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from celery import Celery, signals

from . import _policy, _sdk, client, export, publish, trace_logs
from .beat import BeatTracing
from .config import ConfigurationError, TracingConfig, app_settings
from .publish import on_before_task_publish
from .worker import WorkerTracing

# Named as before the module became private: logging configurations name it.
log = logging.getLogger("celery_langfuse.install")

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
    beat: BeatTracing
    #: Why nothing is connected, when tracing is off; None when it is on.
    off_reason: Optional[str] = None
    _connections: list[tuple[Any, Callable[..., Any]]] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.off_reason is None

    def connect(self) -> None:
        worker = self.worker
        if self.config.linked_trace_tasks and not self.app.finalized:
            # Checked once its tasks are registered, in every process that finalizes it:
            # a producer decides linking at publish as much as a worker does.
            _connect(
                self._connections, (self.app.on_after_finalize, self._check_linked_trace_tasks)
            )
        _connect(
            self._connections,
            (signals.task_prerun, self._for_app(worker.on_task_prerun)),
            (signals.task_failure, self._for_app(worker.on_task_failure)),
            (signals.task_postrun, self._for_app(worker.on_task_postrun)),
            (signals.task_internal_error, self._for_app(worker.on_task_internal_error)),
            (signals.task_revoked, self._for_app(worker.on_task_revoked)),
            (signals.task_unknown, self._for_app(worker.on_task_unknown)),
            (signals.task_rejected, self._for_app(worker.on_task_rejected)),
            (signals.task_received, self._for_app(worker.on_task_received)),
            (signals.beat_init, self.beat.on_beat_init),
            (signals.beat_embedded_init, self.beat.on_beat_embedded_init),
        )

    def _check_linked_trace_tasks(self, **_: Any) -> None:
        """When the app finalizes (its tasks registered): one warning naming the
        ``linked_trace_tasks`` patterns that match none of them, and the tasks."""
        unmatched = unmatched_patterns(self.app, self.config.linked_trace_tasks)
        if unmatched:
            log.warning(
                "celery-langfuse setting linked_trace_tasks: %s; a typo? Only a task "
                "registered later or sent by name (send_task) can start a linked trace by it",
                _describe_unmatched(self.app, unmatched),
            )

    def disconnect(self) -> None:
        _disconnect(self._connections)
        self.beat.unwrap()

    def connected_signals(self) -> list[tuple[str, bool]]:
        """``(signal name, still connected)`` for each handler this app traces with:
        its own, then the process-wide ones; empty when tracing is off."""
        if not self.enabled:
            return []
        return [
            (getattr(signal, "name", None) or repr(signal), _is_connected(signal, handler))
            for signal, handler in (*self._connections, *_PROCESS_HANDLERS)
        ]

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
_warned_missing_keys = False


def _flush_before_exit(**_: Any) -> None:
    """Prefork children exit through ``os._exit``: this signal is their last chance.
    In a process that goes on to ``atexit`` (the worker's main process), a later exit
    flush after one that gave up takes only a moment (``client.flush_before_exit``)."""
    client.flush_before_exit()


def _warm_up(**_: Any) -> None:
    """Prepare how observations are sent (and the client, where one is needed) when a
    pool process starts (prefork children, the solo pool), before it takes tasks; and
    check that log records still carry the trace ids (a logging setup made since
    install() may have replaced the record factory)."""
    client.warm_up()
    trace_logs.ensure_record_factory()


def _prepare_worker(**_: Any) -> None:
    """In a worker's main process, before its pool starts: load what every pool
    process's exporter needs, once, for prefork children to inherit."""
    if client.langfuse_keys_configured():
        export.load_sender()
    trace_logs.ensure_record_factory()


_PROCESS_HANDLERS: tuple[tuple[Any, Callable[..., Any]], ...] = (
    (signals.before_task_publish, on_before_task_publish),
    (signals.worker_init, _prepare_worker),
    (signals.worker_process_init, _warm_up),
    (signals.worker_process_shutdown, _flush_before_exit),
    (signals.worker_shutdown, _flush_before_exit),
)


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


def _is_connected(signal: Any, handler: Callable[..., Any]) -> bool:
    # Connected with weak=False, so Celery keeps the handler itself, not a weakref.
    receivers = getattr(signal, "receivers", None) or ()
    return any(receiver is handler for _, receiver in receivers)


def install(app: Celery, **options: Any) -> Installation:
    """Trace every task of ``app`` in Langfuse. Idempotent: a second call returns the
    same installation unchanged. Options are the fields of :class:`TracingConfig`,
    resolved with the ``CELERY_LANGFUSE_*`` variables and the environment preset; a
    wrong value, or an installed Langfuse SDK outside the supported range, raises
    :class:`~celery_langfuse.config.ConfigurationError` and connects nothing."""
    global _warned_missing_keys
    if not isinstance(app, Celery):
        raise TypeError(f"install() needs a celery.Celery app, got {type(app).__name__}")
    with _lock:
        existing = _installations.get(id(app))
        if existing is not None:
            return existing
        config = TracingConfig.resolve(options, app_config=app_settings(app))
        if config.enabled:
            _sdk.require_supported()  # decided here, once; tasks run untraced if refused
        if app.finalized:  # its tasks are registered: a pattern matching none is a mistake
            unmatched = unmatched_patterns(app, config.linked_trace_tasks)
            if unmatched:
                given = list(config.linked_trace_tasks)
                raise ConfigurationError(
                    f"celery-langfuse setting linked_trace_tasks={given!r}: "
                    f"{_describe_unmatched(app, unmatched)}; must be task name patterns "
                    "(fnmatch) of its tasks"
                )
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
        if off_reason is None and config.export == "durable":
            _check_durable_queue(config)
        installation = Installation(
            app=app,
            config=config,
            worker=WorkerTracing(config),
            beat=BeatTracing(app, config),
            off_reason=off_reason,
        )
        _installations[id(app)] = installation
        if installation.enabled:
            installation.connect()
            _apply_process_settings()
    if installation.enabled and config.export == "durable":
        client.get_langfuse()
    return installation


def uninstall(app: Celery) -> None:
    """Disconnect everything ``install(app)`` connected. A no-op if not installed."""
    with _lock:
        installation = _installations.pop(id(app), None)
        if installation is None:
            return
        installation.disconnect()
        _apply_process_settings()


def installation_for(app: Celery) -> Optional[Installation]:
    """The installation of ``app`` in this process, if ``install(app)`` was called."""
    with _lock:
        return _installations.get(id(app))


def _apply_process_settings() -> None:
    """The process-wide handlers and settings, while any installed app traces.

    Celery's publish signal does not say which app sends a message, and the process
    has one Langfuse client: with several installed apps, the first one decides which
    tasks publishing treats as excluded and how the client is created.
    """
    active = [i for i in _installations.values() if i.enabled]
    if not active:
        _disconnect(_process_connections)
        publish.policy = None
        _policy.process_policy = None
        _policy.trace_guard.limit = None
        publish.trace_url_prefix = None
        publish.signing_key = None
        trace_logs.uninstall_record_factory()
        return
    if not _process_connections:
        _connect(_process_connections, *_PROCESS_HANDLERS)
        client.flush_before_sigterm()
    first = active[0].config
    publish.policy = first.policy
    _policy.process_policy = first.policy
    _policy.trace_guard.limit = first.max_trace_observations
    publish.trace_url_prefix = trace_logs.trace_url_prefix(first.project_id)
    publish.signing_key = first.producer_secret.encode() if first.producer_secret else None
    client.client_settings = client.ClientSettings(
        first.flush_at, first.flush_interval, _durable_export(first)
    )
    client.exit_flush_timeout = max(i.config.flush_timeout for i in active)
    if any(i.config.log_trace_ids for i in active):
        trace_logs.install_record_factory()
    else:
        trace_logs.uninstall_record_factory()


def unmatched_patterns(app: Celery, patterns: Any) -> list[str]:
    """The patterns matching none of ``app``'s registered tasks (call once its tasks
    are registered: reading them finalizes the app)."""
    names = list(app.tasks.keys())
    return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]


def _describe_unmatched(app: Celery, unmatched: list[str]) -> str:
    """``'p' match(es) none of the tasks registered in app 'a' (its tasks: ...)``, naming
    at most 20 of them, Celery's built-in ``celery.*`` tasks left out."""
    names = sorted(name for name in app.tasks if not name.startswith("celery."))
    shown = ", ".join(names[:_NAMED_TASKS]) or "none"
    if len(names) > _NAMED_TASKS:
        shown += f" and {len(names) - _NAMED_TASKS} more"
    return (
        f"{', '.join(repr(p) for p in unmatched)} match(es) none of the tasks registered "
        f"in app {app.main!r} (its tasks: {shown})"
    )


_NAMED_TASKS = 20


def _check_durable_queue(config: TracingConfig) -> None:
    """Connect to the durable queue once: a wrong URL, a server that is not there or a
    missing client library is an error at install(), not spans lost later."""
    from .durable import QueueUnavailable, check_url, redact

    try:
        check_url(config.durable_url or "", config.durable_queue, config.durable_max_bytes)
    except QueueUnavailable as error:
        raise ConfigurationError(
            f"celery-langfuse setting durable_url={redact(config.durable_url or '')!r}: {error}"
        ) from None


def _durable_export(config: TracingConfig) -> Optional[client.DurableExport]:
    if config.export != "durable" or config.durable_url is None:
        return None
    return client.DurableExport(
        config.durable_url,
        config.durable_queue,
        config.durable_max_bytes,
        config.durable_buffer_bytes,
        config.durable_spill_dir,
        config.durable_spill_max_bytes,
    )
