"""End-to-end Langfuse tracing for Celery: ``install(app)`` and every task is traced.

The web request that enqueued a task, the worker run, the tasks it spawned and the
beat run that scheduled it become linked traces in Langfuse, with user and session
ids carried across the broker.

Names are imported on first use, so importing a submodule (the pytest plugin, for
one) does not load Celery or the Langfuse SDK.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._install import Installation, install, uninstall
    from ._policy import SamplingContext
    from .config import ConfigurationError, TracingConfig
    from .headers import ALL_HEADERS, TraceAttributes, TraceParent, extract, inject
    from .trace_logs import add_trace_ids

_EXPORTS = {
    "ConfigurationError": "config",
    "TracingConfig": "config",
    "ALL_HEADERS": "headers",
    "TraceAttributes": "headers",
    "TraceParent": "headers",
    "extract": "headers",
    "inject": "headers",
    "Installation": "_install",
    "install": "_install",
    "uninstall": "_install",
    "SamplingContext": "_policy",
    "add_trace_ids": "trace_logs",
}

__all__ = [
    "ALL_HEADERS",
    "ConfigurationError",
    "Installation",
    "SamplingContext",
    "TraceAttributes",
    "TraceParent",
    "TracingConfig",
    "add_trace_ids",
    "extract",
    "inject",
    "install",
    "uninstall",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'celery_langfuse' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # looked up once
    return value
