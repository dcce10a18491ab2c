"""The WSGI middleware with a real Flask app (``trace_flask``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient

from celery_langfuse.testing import CaptureServer
from tests.conftest import flush_in_process, request_trace

USER = {"Authorization": "Bearer user-9"}


@pytest.fixture
def client(capture: CaptureServer) -> Iterator[FlaskClient]:
    from tests.support.web_apps import flask_app

    test_client = flask_app.test_client()
    test_client.set_cookie("session_id", "flask-session")
    yield test_client


def test_request_task_and_nested_task_are_one_trace(
    running_worker: Any, client: FlaskClient, capture: CaptureServer
) -> None:
    assert client.post("/orders/4", headers=USER).get_json()["task_id"]

    trace = request_trace(
        capture,
        "POST /orders/<int:order_id>",
        "publish tests.support.tasks.spawn_child",
        "tests.support.tasks.spawn_child",
        "publish tests.support.tasks.add",
        "tests.support.tasks.add",
    )

    request = trace.find("POST /orders/<int:order_id>")
    publish = trace.find("publish tests.support.tasks.spawn_child")
    assert publish.parent_id == request.id
    assert trace.find("tests.support.tasks.spawn_child").parent_id == publish.id
    assert trace.find("tests.support.tasks.add").output == 5
    assert trace.orphans() == [], trace.tree()
    assert {(o.user_id, o.session_id) for o in trace.observations} == {("user-9", "flask-session")}
    assert request.output == {"status_code": 200}
    assert request.metadata["route"] == "/orders/<int:order_id>"


def test_client_error_is_a_warning(client: FlaskClient, capture: CaptureServer) -> None:
    with client.get("/orders/4?verbose=1") as response:
        assert response.status_code == 404

    request = request_trace(capture, "GET /orders/<int:order_id>").find(
        "GET /orders/<int:order_id>"
    )

    assert (request.level, request.status_message) == ("WARNING", "HTTP 404")
    assert request.metadata["query_keys"] == ["verbose"]


def test_handled_exception_is_an_error_with_its_message(
    client: FlaskClient, capture: CaptureServer
) -> None:
    from tests.support.web_apps import flask_app

    flask_app.testing = False  # Flask answers 500 itself instead of raising into the test
    try:
        with client.get("/crash") as response:
            assert response.status_code == 500
    finally:
        flask_app.testing = True

    request = request_trace(capture, "GET /crash").find("GET /crash")
    assert (request.level, request.status_message) == ("ERROR", "RuntimeError: kaboom")
    assert request.output == {"status_code": 500}


def test_excluded_path_sends_nothing(client: FlaskClient, capture: CaptureServer) -> None:
    assert client.get("/health").get_json() == {"status": "ok"}
    client.get("/orders/1").close()  # a marker that arrives after anything /health sent

    request_trace(capture, "GET /orders/<int:order_id>")
    assert not [o.name for o in capture.observations if "health" in o.name or o.name == "GET"]


def test_incoming_traceparent_is_continued(client: FlaskClient, capture: CaptureServer) -> None:
    trace_id, parent_id = "6bf92f3577b34da6a3ce929d0e0e4736", "20f067aa0ba902b7"
    client.get("/orders/3", headers={"TraceParent": f"00-{trace_id}-{parent_id}-01"}).close()

    flush_in_process()
    capture.wait_for(lambda s: s.trace(trace_id).find("GET /orders/<int:order_id>"))
    assert capture.trace(trace_id).find("GET /orders/<int:order_id>").parent_id == parent_id
