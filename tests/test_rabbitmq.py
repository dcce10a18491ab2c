"""The same trace semantics over a real RabbitMQ broker: AMQP message headers carry
the wire format as well as Redis does."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery
from langfuse import get_client, propagate_attributes

from celery_langfuse import install, uninstall
from celery_langfuse.testing import CaptureServer
from tests.conftest import in_thread_worker

AMQP_URL = os.environ.get("CELERY_LANGFUSE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def amqp_app() -> Iterator[Celery]:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
    except OSError as exc:  # a missing service fails the test, it never skips it
        pytest.fail(f"RabbitMQ must answer on 127.0.0.1:5672 for this test: {exc}")
    app = Celery("amqp_tests", broker=AMQP_URL, backend="rpc://")
    app.conf.broker_heartbeat = 0
    app.conf.update(
        task_default_queue=f"celery-langfuse-{uuid.uuid4().hex[:8]}",
        worker_hijack_root_logger=False,
    )

    @app.task(name="amqp.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="amqp.spawn")
    def spawn(x: int) -> str:
        return str(add.delay(x, 1).id)

    @app.task(name="amqp.fail")
    def fail() -> None:
        raise RuntimeError("over amqp")

    install(app)
    try:
        with in_thread_worker(app, pool="solo"):
            yield app
    finally:
        uninstall(app)


def test_trace_and_user_cross_rabbitmq(amqp_app: Celery, capture: CaptureServer) -> None:
    with get_client().start_as_current_observation(name="request") as root:
        with propagate_attributes(user_id="amqp-user", session_id="amqp-session", tags=["amqp"]):
            amqp_app.tasks["amqp.spawn"].delay(1).get(timeout=15)

    capture.wait_for(
        lambda s: s.trace(root.trace_id).find("amqp.add") and s.trace(root.trace_id).find("request")
    )
    trace = capture.trace(root.trace_id)
    assert trace.orphans() == []
    spawn, add = trace.find("amqp.spawn"), trace.find("amqp.add")
    assert next(o for o in trace.observations if o.id == add.parent_id).parent_id == spawn.id
    assert (trace.user_id, trace.session_id, trace.tags) == ("amqp-user", "amqp-session", ["amqp"])
    assert add.attributes["user.id"] == "amqp-user"


def test_failure_over_rabbitmq_is_an_error(amqp_app: Celery, capture: CaptureServer) -> None:
    with get_client().start_as_current_observation(name="request") as root:
        result = amqp_app.tasks["amqp.fail"].delay()
    with pytest.raises(RuntimeError):
        result.get(timeout=15)
    capture.wait_for(lambda s: s.trace(root.trace_id).find("amqp.fail"))
    run = capture.trace(root.trace_id).find("amqp.fail")
    assert (run.level, run.status_message) == ("ERROR", "RuntimeError: over amqp")


def test_garbage_trace_headers_over_rabbitmq_still_run_the_task(
    amqp_app: Celery, capture: CaptureServer
) -> None:
    result = amqp_app.tasks["amqp.add"].apply_async(
        (1, 1),
        headers={
            "traceparent": "00-zz",
            "x-langfuse-trace-id": "1" * 500,
            "x-langfuse-user-id": "u" * 999,
        },
    )
    assert result.get(timeout=15) == 2
    capture.wait_for(lambda s: any(o.metadata.get("task_id") == result.id for o in s.observations))
    run = next(o for o in capture.observations if o.metadata.get("task_id") == result.id)
    assert run.parent_id is None
    assert "user.id" not in run.attributes
