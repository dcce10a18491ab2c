"""The API layer: web requests as Langfuse traces that the tasks they enqueue join.

- :class:`LangfuseASGIMiddleware` (FastAPI, Starlette) and :class:`LangfuseWSGIMiddleware`
  (any WSGI app; :func:`trace_flask` for Flask) record one observation per request;
- :func:`inject_headers` / :func:`extract_context` carry a trace across HTTP calls
  between services, in the same wire format as Celery messages; the httpx hooks and
  :func:`trace_session` (requests) apply it to outgoing calls;
- :func:`read_incoming` decides whether a caller is trusted with its trace headers
  (docs/web.md, "Trust"), for the middlewares here and any other.

Framework modules are imported only when their helper is used, so this package
needs none of them installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._asgi import LangfuseASGIMiddleware, route_template
from ._core import (
    DEFAULT_EXCLUDED_PATHS,
    Identify,
    IncomingTrace,
    RequestTrace,
    WebTracingConfig,
    read_incoming,
    trusts_caller,
)
from ._propagation import (
    async_httpx_hooks,
    async_httpx_request_hook,
    extract_context,
    httpx_hooks,
    httpx_request_hook,
    inject_headers,
)
from ._request import IncomingRequest
from ._wsgi import EXCEPTION_KEY, ROUTE_KEY, LangfuseWSGIMiddleware

if TYPE_CHECKING:
    from ._flask import trace_flask
    from ._requests import TracingAdapter, trace_session

_LAZY = {
    "trace_flask": "._flask",
    "TracingAdapter": "._requests",
    "trace_session": "._requests",
}

__all__ = [
    "DEFAULT_EXCLUDED_PATHS",
    "EXCEPTION_KEY",
    "ROUTE_KEY",
    "Identify",
    "IncomingRequest",
    "IncomingTrace",
    "LangfuseASGIMiddleware",
    "LangfuseWSGIMiddleware",
    "RequestTrace",
    "TracingAdapter",
    "WebTracingConfig",
    "async_httpx_hooks",
    "async_httpx_request_hook",
    "extract_context",
    "httpx_hooks",
    "httpx_request_hook",
    "inject_headers",
    "read_incoming",
    "route_template",
    "trace_flask",
    "trace_session",
    "trusts_caller",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
