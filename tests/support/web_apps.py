"""Small FastAPI and Flask apps for the web layer tests: each request enqueues tasks of
tests/support/tasks.py, so a test can follow request -> task -> nested task."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Request
from flask import Flask, abort
from flask import request as flask_request

from celery_langfuse import TraceAttributes
from celery_langfuse.web import IncomingRequest, LangfuseASGIMiddleware, trace_flask
from tests.support import tasks

#: What the internal services of these tests send to be trusted with their trace
#: headers (docs/web.md, "Trust"); anonymous test requests do not.
TRUST_SECRET = "test-trust-secret-0123456789"


def identify(request: IncomingRequest) -> TraceAttributes:
    """Users authenticate with ``Authorization: Bearer <user id>``; sessions are a cookie."""
    token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    return TraceAttributes(user_id=token or None, session_id=request.cookies.get("session_id"))


# -- FastAPI ----------------------------------------------------------------------

# FastAPI's own OpenTelemetry spans are turned off, as docs/web.md tells users to.
NO_FASTAPI_TRACING: Any = {"tracing": False}
fastapi_app = FastAPI(telemetry=NO_FASTAPI_TRACING)


@fastapi_app.post("/orders/{order_id}")
def create_order(order_id: int) -> dict[str, str]:
    return {"task_id": tasks.spawn_child.delay(order_id).id}


@fastapi_app.post("/async-orders/{order_id}")
async def create_order_async(order_id: int) -> dict[str, str]:
    return {"task_id": tasks.add.delay(order_id, 1).id}


@fastapi_app.get("/orders/{order_id}")
def get_order(order_id: int) -> None:
    raise HTTPException(status_code=404, detail=f"no order {order_id}")


@fastapi_app.get("/crash")
def crash() -> None:
    raise RuntimeError("kaboom")


@fastapi_app.get("/health")
def health() -> dict[str, str]:
    tasks.add.delay(0, 0)  # even work done here must not produce a request trace
    return {"status": "ok"}


@fastapi_app.get("/echo-headers")
def echo_headers(request: Request) -> dict[str, Any]:
    return dict(request.headers)


v1 = FastAPI(telemetry=NO_FASTAPI_TRACING)


@v1.get("/items/{item_id}")
def get_item(item_id: str) -> dict[str, str]:
    return {"item": item_id}


fastapi_app.mount("/v1", v1)
fastapi_app.add_middleware(LangfuseASGIMiddleware, identify=identify, trust_secret=TRUST_SECRET)

# The same app with FastAPI's own tracing left on (its default).
fastapi_traced_app = FastAPI()
fastapi_traced_app.add_api_route("/orders/{order_id}", create_order, methods=["POST"])
fastapi_traced_app.add_middleware(LangfuseASGIMiddleware, identify=identify)


# -- Flask ------------------------------------------------------------------------

flask_app = Flask(__name__)


@flask_app.post("/orders/<int:order_id>")
def flask_create_order(order_id: int) -> dict[str, str]:
    return {"task_id": tasks.spawn_child.delay(order_id).id}


@flask_app.get("/orders/<int:order_id>")
def flask_get_order(order_id: int) -> None:
    abort(404)


@flask_app.get("/crash")
def flask_crash() -> None:
    raise RuntimeError("kaboom")


@flask_app.get("/health")
def flask_health() -> dict[str, str]:
    return {"status": "ok"}


@flask_app.get("/echo-headers")
def flask_echo_headers() -> dict[str, Any]:
    return dict(flask_request.headers)


trace_flask(flask_app, identify=identify)
