"""A FastAPI and a Flask app for the web exit-path tests (tests/test_exit_paths.py):
each request opens a user generation and enqueues a task, as an API's handler would.

Run under real servers (``uvicorn --workers 2``, ``gunicorn --preload -w 2``), so the
Langfuse client of a ``--preload`` master is made before the workers fork.
"""

from __future__ import annotations

from fastapi import FastAPI
from flask import Flask
from langfuse import get_client

from celery_langfuse.web import LangfuseASGIMiddleware, trace_flask
from tests.support import tasks
from tests.support.user_tasks import record_generation

# Made at import: under gunicorn --preload, in the master, before the workers fork.
get_client()

fastapi_app = FastAPI(telemetry={"tracing": False})


@fastapi_app.post("/orders/{order_id}")
def create_order(order_id: int) -> dict[str, str]:
    record_generation(f"llm {order_id}")
    return {"task_id": tasks.add.delay(order_id, 1).id}


fastapi_app.add_middleware(LangfuseASGIMiddleware)

flask_app = Flask(__name__)


@flask_app.post("/orders/<int:order_id>")
def flask_create_order(order_id: int) -> dict[str, str]:
    record_generation(f"llm {order_id}")
    return {"task_id": tasks.add.delay(order_id, 1).id}


trace_flask(flask_app)
