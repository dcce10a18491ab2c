"""Tasks for the configuration, sampling and privacy tests, on tests/support/tasks.py's app.

A worker subprocess started with ``module="tests.support.config_tasks"`` runs these
and every task of tasks.py; the app (and its ``install``) is the one tasks.py makes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from langfuse import get_client

from celery_langfuse import Installation, install, uninstall
from tests.support.tasks import app

__all__ = ["app", "generate", "issue_token", "keep_private", "record_and_fail", "reinstalled"]


@contextmanager
def reinstalled(**options: Any) -> Iterator[Installation]:
    """The app installed with ``options`` inside the block, as tasks.py installs it after.

    A task's result is stored before ``task_postrun`` runs, so leaving the block waits
    (up to 10 s) for every open run to close: uninstalling earlier would lose it.
    """
    uninstall(app)
    installation = install(app, **options)
    try:
        yield installation
    finally:
        deadline = time.monotonic() + 10
        while len(installation.worker.runs) and time.monotonic() < deadline:
            time.sleep(0.01)
        uninstall(app)
        install(app)


@app.task
def issue_token(user: str) -> dict[str, str]:
    """Returns a secret its input never held: only the result can leak it."""
    return {"user": user, "access_token": f"tok-{user}-hunter2-result"}


@app.task(langfuse_capture=False)
def keep_private(document: str) -> str:
    return document.upper()


@app.task
def generate(prompt: str) -> str:
    """The user's own observation inside a task run, as an LLM call would make."""
    with get_client().start_as_current_observation(name="llm", as_type="generation") as llm:
        llm.update(output=f"echo: {prompt}")
    return prompt


@app.task
def record_and_fail(prompt: str) -> None:
    generate(prompt)
    time.sleep(0.005)  # a run of a few milliseconds: Langfuse keeps milliseconds
    raise RuntimeError(f"model refused {prompt}")
