"""The ASGI middleware with a real FastAPI app: what Langfuse shows for a request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from celery_langfuse.testing import CaptureServer, format_traces
from tests.conftest import flush_in_process, request_trace

USER = {"Authorization": "Bearer user-7"}
SESSION = {"session_id": "sess-42"}
#: What POST /orders/{order_id} makes below its request observation, all waited for.
ORDER_TRACE = (
    "publish tests.support.tasks.spawn_child",
    "tests.support.tasks.spawn_child",
    "publish tests.support.tasks.add",
    "tests.support.tasks.add",
)


@pytest.fixture
def client(capture: CaptureServer) -> Iterator[TestClient]:
    from tests.support.web_apps import fastapi_app

    with TestClient(fastapi_app, cookies=SESSION, raise_server_exceptions=False) as test_client:
        yield test_client


def test_request_task_and_nested_task_are_one_trace(
    running_worker: Any, client: TestClient, capture: CaptureServer
) -> None:
    response = client.post("/orders/5", headers=USER)
    assert response.status_code == 200

    trace = request_trace(capture, "POST /orders/{order_id}", *ORDER_TRACE)

    assert trace.name == "POST /orders/{order_id}"
    request = trace.find("POST /orders/{order_id}")
    publish = trace.find("publish tests.support.tasks.spawn_child")
    run = trace.find("tests.support.tasks.spawn_child")
    nested = trace.find("tests.support.tasks.add")
    assert publish.parent_id == request.id
    assert run.parent_id == publish.id
    assert trace.find("publish tests.support.tasks.add").parent_id == run.id
    assert nested.output == 6
    assert trace.orphans() == [], trace.tree()


def test_user_and_session_are_on_every_observation(
    running_worker: Any, client: TestClient, capture: CaptureServer
) -> None:
    client.post("/orders/1", headers=USER)

    trace = request_trace(capture, "POST /orders/{order_id}", *ORDER_TRACE)

    assert (trace.user_id, trace.session_id) == ("user-7", "sess-42")
    assert [(o.name, o.user_id, o.session_id) for o in trace.observations] == [
        (o.name, "user-7", "sess-42") for o in trace.observations
    ]


def test_async_endpoint_tasks_join_the_request_trace(
    running_worker: Any, client: TestClient, capture: CaptureServer
) -> None:
    client.post("/async-orders/3", headers=USER)

    trace = request_trace(
        capture,
        "POST /async-orders/{order_id}",
        "publish tests.support.tasks.add",
        "tests.support.tasks.add",
    )

    assert trace.find("tests.support.tasks.add").user_id == "user-7"
    assert trace.orphans() == []


def test_request_records_method_route_query_keys_and_status(
    client: TestClient, capture: CaptureServer
) -> None:
    client.get("/v1/items/abc?color=red&size=9", headers={"User-Agent": "spec/1.0"})

    request = request_trace(capture, "GET /v1/items/{item_id}").find("GET /v1/items/{item_id}")

    assert request.output == {"status_code": 200}
    assert request.level == "DEFAULT"
    assert request.metadata["method"] == "GET"
    assert request.metadata["route"] == "/v1/items/{item_id}"
    assert request.metadata["path"] == "/v1/items/abc"
    assert request.metadata["query_keys"] == ["color", "size"]
    assert request.metadata["user_agent"] == "spec/1.0"
    assert "red" not in str(request.metadata)


def test_client_error_is_a_warning(client: TestClient, capture: CaptureServer) -> None:
    assert client.get("/orders/9").status_code == 404

    request = request_trace(capture, "GET /orders/{order_id}").find("GET /orders/{order_id}")

    assert (request.level, request.status_message) == ("WARNING", "HTTP 404")
    assert request.output == {"status_code": 404}


def test_unmatched_path_is_named_after_the_method_only(
    client: TestClient, capture: CaptureServer
) -> None:
    assert client.get("/no/such/page").status_code == 404

    request = request_trace(capture, "GET").find("GET")

    assert request.level == "WARNING"
    assert request.metadata["path"] == "/no/such/page"


def test_unhandled_exception_is_an_error(client: TestClient, capture: CaptureServer) -> None:
    assert client.get("/crash").status_code == 500

    request = request_trace(capture, "GET /crash").find("GET /crash")

    assert request.level == "ERROR"
    assert request.status_message == "RuntimeError: kaboom"
    assert request.output == {"status_code": 500}


def test_excluded_path_sends_nothing(
    client: TestClient, capture: CaptureServer, running_worker: Any
) -> None:
    assert client.get("/health").status_code == 200
    client.get("/v1/items/after-health")  # a marker that arrives after anything /health sent

    request_trace(capture, "GET /v1/items/{item_id}")
    names = {o.name for o in capture.observations}
    assert not {n for n in names if n.startswith("GET /health") or n == "GET"}, format_traces(
        capture.traces()
    )
    assert "publish tests.support.tasks.add" not in names


def test_incoming_traceparent_is_continued(client: TestClient, capture: CaptureServer) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    client.get("/v1/items/x", headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})

    flush_in_process()
    capture.wait_for(lambda s: s.trace(trace_id).find("GET /v1/items/{item_id}"))
    request = capture.trace(trace_id).find("GET /v1/items/{item_id}")
    assert request.parent_id == parent_id


def test_incoming_langfuse_headers_bring_user_and_session(capture: CaptureServer) -> None:
    from tests.support.web_apps import TRUST_SECRET, fastapi_app

    trace_id, parent_id = "5bf92f3577b34da6a3ce929d0e0e4736", "10f067aa0ba902b7"
    with TestClient(fastapi_app) as internal:  # no cookie, no token: ids come from headers
        internal.get(
            "/v1/items/y",
            headers={
                "X-Langfuse-Trust-Secret": TRUST_SECRET,  # a trusted internal caller
                "X-Langfuse-Trace-Id": trace_id,
                "X-Langfuse-Parent-Id": parent_id,
                "X-Langfuse-User-Id": "upstream-user",
                "X-Langfuse-Session-Id": "upstream-session",
            },
        )

    flush_in_process()
    capture.wait_for(lambda s: s.trace(trace_id).find("GET /v1/items/{item_id}"))
    request = capture.trace(trace_id).find("GET /v1/items/{item_id}")
    assert request.parent_id == parent_id
    assert (request.user_id, request.session_id) == ("upstream-user", "upstream-session")


def test_fastapi_own_tracing_is_reported_and_never_parents_the_request(
    client: TestClient, capture: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    from celery_langfuse.web import _asgi
    from tests.support.web_apps import fastapi_traced_app

    _asgi._warned_about_framework_spans = False
    # FastAPI traces only once a tracer provider exists: the Langfuse client makes one
    # (requests alone no longer do: their observations need no client).
    from langfuse import get_client

    get_client()
    with TestClient(fastapi_traced_app) as traced:
        traced.post("/orders/2", headers=USER)

    trace = request_trace(capture, "POST /orders/{order_id}")
    assert trace.find("POST /orders/{order_id}").parent_id is None
    assert "FastAPI(telemetry={'tracing': False})" in caplog.text


def test_identify_that_raises_still_serves_the_request(capture: CaptureServer) -> None:
    from celery_langfuse.web import LangfuseASGIMiddleware
    from tests.support.web_apps import v1

    def broken(request: Any) -> Any:
        raise LookupError("token store down")

    with TestClient(LangfuseASGIMiddleware(v1, identify=broken)) as http:
        assert http.get("/items/ok").json() == {"item": "ok"}

    request = request_trace(capture, "GET /items/{item_id}").find("GET /items/{item_id}")
    assert request.user_id is None


def test_bad_exclude_paths_fail_when_the_middleware_is_built() -> None:
    from celery_langfuse import ConfigurationError
    from celery_langfuse.web import LangfuseASGIMiddleware
    from tests.support.web_apps import v1

    with pytest.raises(ConfigurationError, match="exclude_paths='/health'"):
        LangfuseASGIMiddleware(v1, exclude_paths="/health")
