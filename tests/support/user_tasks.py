"""Tasks whose bodies observe with the Langfuse SDK, the way users' tasks do.

Same app, broker and queue as :mod:`tests.support.tasks`. Every task records one
observation of its own, named ``<kind> <n>``, so a test can count them per run:

- ``llm_call``: ``get_client().start_as_current_observation(as_type="generation")``;
- ``observed``: a function decorated with ``@observe``;
- ``openai_call``: ``langfuse.openai`` against a local fake OpenAI-compatible server at
  ``CELERY_LANGFUSE_TEST_OPENAI_URL`` (the real ``openai`` package, 127.0.0.1 only);
- ``llm_then_sleep``: a generation, then a sleep that a soft time limit interrupts;
- ``llm_then_hang``: a generation, then a sleep nothing interrupts but the end of its
  process (a hard time limit, a cold shutdown, a SIGKILL).
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

from celery.exceptions import SoftTimeLimitExceeded
from langfuse import get_client, observe
from redis import Redis

from tests.support.tasks import BROKER, app

__all__ = ["app"]

_retained: list[bytes] = []


def record_generation(name: str, metadata: Optional[dict[str, Any]] = None) -> None:
    with get_client().start_as_current_observation(
        name=name,
        as_type="generation",
        model="fake-model",
        input={"prompt": name},
        metadata=metadata,
    ) as generation:
        generation.update(output=f"answer to {name}", usage_details={"input": 3, "output": 5})


@app.task
def llm_call(n: int, hold_mb: int = 0) -> int:
    """Returns ``n``; with ``hold_mb``, keeps that much memory resident in the child
    (past ``--max-memory-per-child``) and returns the child's pid instead."""
    record_generation(f"llm {n}")
    if hold_mb:
        _retained.append(b"x" * (hold_mb * 1024 * 1024))  # touched pages: resident
        return os.getpid()
    return n


@observe(name="observed step")
def observed_step(n: int) -> dict[str, int]:
    return {"n": n, "double": 2 * n}


@app.task
def observed(n: int) -> dict[str, int]:
    return observed_step(n)


@app.task
def openai_call(n: int) -> str:
    from langfuse.openai import OpenAI

    client = OpenAI(base_url=os.environ["CELERY_LANGFUSE_TEST_OPENAI_URL"], api_key="sk-fake")
    completion: Any = client.chat.completions.create(
        model="gpt-fake",
        messages=[{"role": "user", "content": f"question {n}"}],
        name=f"openai {n}",
    )
    return str(completion.choices[0].message.content)


@app.task
def llm_then_sleep(n: int, seconds: float) -> str:
    """A generation, then a sleep: a soft time limit (``soft_time_limit`` of the call)
    ends the sleep with an exception the task handles."""
    record_generation(f"llm {n}")
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "soft limit"
    return "slept"


@app.task
def llm_then_hang(n: int, seconds: float, pid_key: Optional[str] = None) -> str:
    """A generation, then a sleep with no soft time limit: a hard time limit or a cold
    shutdown ends the child during it, a soft or warm shutdown waits for it. With
    ``pid_key``, the child's pid is written to Redis under it once the generation ended
    (for a test that kills the child)."""
    record_generation(f"llm {n}")
    if pid_key is not None:
        Redis.from_url(BROKER).set(pid_key, os.getpid(), ex=60)
    time.sleep(seconds)
    return "slept"
