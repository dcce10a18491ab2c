"""End-to-end Langfuse tracing for Celery: ``install(app)`` and every task is traced.

The web request that enqueued a task, the worker run, the tasks it spawned and the
beat run that scheduled it become linked traces in Langfuse, with user and session
ids carried across the broker.
"""

from .config import ConfigurationError, TracingConfig
from .headers import ALL_HEADERS, TraceAttributes, TraceParent, extract, inject
from .install import Installation, install, uninstall

__all__ = [
    "ALL_HEADERS",
    "ConfigurationError",
    "Installation",
    "TraceAttributes",
    "TraceParent",
    "TracingConfig",
    "extract",
    "inject",
    "install",
    "uninstall",
]
