"""A FastAPI and a Flask app for the web exit-path tests (tests/test_exit_paths.py):
each request opens a user generation and enqueues a task, as an API's handler would,
and answers with the task's id and the pid of the server worker that served it.

Run under real servers (``uvicorn --workers 2``, ``gunicorn --preload -w 2``), so the
Langfuse client of a ``--preload`` master is made before the workers fork.
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from flask import Flask
from langfuse import get_client

from celery_langfuse.web import LangfuseASGIMiddleware, trace_flask
from tests.support import tasks
from tests.support.user_tasks import record_generation

# Made at import: under gunicorn --preload, in the master, before the workers fork.
get_client()

fastapi_app = FastAPI(telemetry={"tracing": False})


def create(order_id: int) -> dict[str, object]:
    """The work of both apps' handler: the generation records which process made it."""
    pid = os.getpid()
    record_generation(f"llm {order_id}", metadata={"pid": pid})
    return {"task_id": tasks.add.delay(order_id, 1).id, "pid": pid}


@fastapi_app.post("/orders/{order_id}")
def create_order(order_id: int) -> dict[str, object]:
    return create(order_id)


fastapi_app.add_middleware(LangfuseASGIMiddleware)

flask_app = Flask(__name__)


@flask_app.post("/orders/<int:order_id>")
def flask_create_order(order_id: int) -> dict[str, object]:
    return create(order_id)


trace_flask(flask_app)
