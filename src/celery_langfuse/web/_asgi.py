"""ASGI middleware (FastAPI, Starlette and any ASGI app): one observation per request.

The route template is read after the app has handled the request: Starlette's router
(and so FastAPI's) stores the matched route in ``scope["route"]``, on the same scope
dict the middleware passed in. Mounted sub-applications add their prefix to
``scope["root_path"]``, which is put back in front of the inner route's template
(as the matched text: a mount's own path parameters are not templated back).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, Callable

from .. import client
from ._core import RequestTrace, WebTracingConfig
from ._request import IncomingRequest

# As permissive as Starlette's own middleware protocol, so `app.add_middleware(...)`
# type-checks in users' code.
Scope = Any
Message = Any
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger(__name__)
_warned_about_framework_spans = False


class LangfuseASGIMiddleware:
    """Trace each HTTP request of an ASGI app in Langfuse.

    FastAPI / Starlette::

        app.add_middleware(LangfuseASGIMiddleware, identify=my_identify)

    Any ASGI app: ``app = LangfuseASGIMiddleware(app)``. Keyword arguments are the
    fields of :class:`WebTracingConfig`.
    """

    def __init__(self, app: ASGIApp, /, **options: Any) -> None:
        self.app = app
        self.config = WebTracingConfig(**options)
        client.flush_before_sigterm()  # an API process stopped by SIGTERM keeps its observations

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "lifespan":
            await self.app(scope, receive, _flushing_at_shutdown(send))
            return
        if scope.get("type") != "http" or self.config.excludes(str(scope.get("path", ""))):
            await self.app(scope, receive, send)
            return
        _warn_about_framework_spans(scope)
        trace = RequestTrace.begin(IncomingRequest.from_asgi(scope), self.config)
        if trace is None:
            await self.app(scope, receive, send)
            return

        async def send_recording_status(message: Message) -> None:
            if message.get("type") == "http.response.start":
                trace.record_status(int(message.get("status", 0)))
            await send(message)

        server_root_path = str(scope.get("root_path", ""))
        try:
            await self.app(scope, receive, send_recording_status)
        except BaseException as exc:
            trace.record_exception(exc)
            if trace.status_code is None:
                trace.record_status(500)  # what the server answers for an escaped exception
            raise
        finally:
            trace.detach()
            trace.end(route_template(scope, server_root_path))


def route_template(scope: Scope, server_root_path: str = "") -> str | None:
    """The matched route's template (``/orders/{order_id}``), or None when none matched.

    ``server_root_path`` is the scope's ``root_path`` before routing: what routing
    added to it since is the prefix of the mounts the request went through.
    """
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(template, str):
        return None
    root_path = str(scope.get("root_path", ""))
    mount_prefix = ""
    if root_path.startswith(server_root_path):
        mount_prefix = root_path[len(server_root_path) :]
    return (mount_prefix.rstrip("/") + template) or "/"


_SHUTDOWN_ANSWERS = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed"})


def _flushing_at_shutdown(send: Send) -> Send:
    """``send`` for the lifespan scope: flush before answering the server's shutdown.

    The server's shutdown (after the last request) is the moment to send what the
    process buffered: a server may end the process without ``atexit`` hooks after it
    (uvicorn re-raises the SIGTERM it handled; its ``--workers`` processes import the
    app only after installing their own signal handlers). Bounded by the installation's
    ``flush_timeout`` (``client.flush_before_exit``: a moment only, right after an exit
    flush that gave up), off the event loop.
    """

    async def send_after_flushing(message: Message) -> None:
        if message.get("type") in _SHUTDOWN_ANSWERS:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, client.flush_before_exit)
        await send(message)

    return send_after_flushing


def _warn_about_framework_spans(scope: Scope) -> None:
    """Warn once when FastAPI's built-in OpenTelemetry tracing is on.

    FastAPI then makes its own spans (``fastapi.endpoint``, ...) current around the
    handler. Langfuse's default export filter drops them, so an observation started in
    the handler (a task's publish, an LLM call) points at a parent Langfuse never
    receives. FastAPI marks a traced request with ``scope["fastapi.telemetry"]``.
    """
    global _warned_about_framework_spans
    if _warned_about_framework_spans:
        return
    if getattr(scope.get("fastapi.telemetry"), "span", None) is not None:
        _warned_about_framework_spans = True
        log.warning(
            "celery-langfuse: FastAPI's built-in OpenTelemetry tracing is on; Langfuse does "
            "not export its spans, so tasks and observations started in a handler would "
            "point at parents missing from Langfuse. Create the app with "
            "FastAPI(telemetry={'tracing': False}) (see docs/web.md)."
        )
