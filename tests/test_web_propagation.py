"""Trace context across HTTP: real clients (httpx, requests) calling a real uvicorn
server, and the header helpers on their own."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import requests
import uvicorn
from langfuse import propagate_attributes

from celery_langfuse import client as langfuse_client
from celery_langfuse.testing import CaptureServer
from celery_langfuse.web import (
    async_httpx_request_hook,
    extract_context,
    httpx_hooks,
    inject_headers,
    trace_session,
)
from tests.conftest import flush_in_process, request_trace


@contextmanager
def uvicorn_server(app: Any) -> Iterator[str]:
    """``app`` served by a real uvicorn server on 127.0.0.1; yields its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def api(langfuse_capture: CaptureServer) -> Iterator[str]:
    from tests.support.web_apps import fastapi_app

    with uvicorn_server(fastapi_app) as base_url:
        yield base_url


@contextmanager
def calling_service() -> Iterator[Any]:
    """An observation of a service that calls the API, with its own user and session."""
    langfuse = langfuse_client.get_langfuse()
    ids = {"user_id": "caller-user", "session_id": "caller-session"}
    with propagate_attributes(**ids), langfuse.start_as_current_observation(name="caller") as obs:
        yield obs


def test_httpx_call_to_uvicorn_continues_through_the_worker(
    api: str, running_worker: Any, capture: CaptureServer
) -> None:
    from tests.support.web_apps import TRUST_SECRET

    http = httpx.Client(event_hooks=httpx_hooks(trust_secret=TRUST_SECRET))
    with calling_service() as caller, http:
        assert http.post(f"{api}/orders/8").status_code == 200

    trace = request_trace(
        capture,
        "caller",
        "POST /orders/{order_id}",
        "publish tests.support.tasks.spawn_child",
        "tests.support.tasks.spawn_child",
        "publish tests.support.tasks.add",
        "tests.support.tasks.add",
    )
    assert trace.id == caller.trace_id
    request = trace.find("POST /orders/{order_id}")
    assert request.parent_id == caller.id
    assert trace.find("publish tests.support.tasks.spawn_child").parent_id == request.id
    assert trace.find("tests.support.tasks.add").output == 9
    assert trace.orphans() == [], trace.tree()
    assert trace.name == "caller"  # the caller's service owns the trace's name
    assert {(o.user_id, o.session_id) for o in trace.observations} == {
        ("caller-user", "caller-session")
    }


def test_async_httpx_hook_adds_the_same_headers(api: str, capture: CaptureServer) -> None:
    async def call() -> dict[str, str]:
        async with httpx.AsyncClient(event_hooks={"request": [async_httpx_request_hook]}) as http:
            return (await http.get(f"{api}/echo-headers")).json()

    with calling_service() as caller:
        received = asyncio.run(call())

    assert received["x-langfuse-trace-id"] == caller.trace_id
    assert received["x-langfuse-parent-id"] == caller.id
    assert received["traceparent"] == f"00-{caller.trace_id}-{caller.id}-01"
    assert received["x-langfuse-user-id"] == "caller-user"


def test_requests_session_carries_the_trace(api: str, capture: CaptureServer) -> None:
    from tests.support.web_apps import TRUST_SECRET

    session = trace_session(requests.Session(), trust_secret=TRUST_SECRET)
    with calling_service() as caller:
        assert session.get(f"{api}/v1/items/z").status_code == 200

    flush_in_process()
    capture.wait_for(lambda s: s.trace(caller.trace_id).find("GET /v1/items/{item_id}"))
    request = capture.trace(caller.trace_id).find("GET /v1/items/{item_id}")
    assert request.parent_id == caller.id
    assert request.session_id == "caller-session"


def test_trace_session_keeps_mounted_adapters_and_is_idempotent() -> None:
    session = requests.Session()
    custom = requests.adapters.HTTPAdapter(max_retries=3)
    session.mount("https://", custom)

    trace_session(trace_session(session))

    adapter = session.get_adapter("https://example.invalid/")
    assert adapter.inner is custom  # type: ignore[attr-defined]


def test_inject_outside_a_trace_adds_nothing() -> None:
    assert inject_headers({"accept": "*/*"}) == {"accept": "*/*"}


def test_extract_reads_header_names_in_any_case() -> None:
    extracted = extract_context(
        [
            ("TraceParent", "00-7bf92f3577b34da6a3ce929d0e0e4736-30f067aa0ba902b7-01"),
            ("X-LANGFUSE-USER-ID", "u-1"),
        ]
    )

    assert extracted.parent is not None
    assert (extracted.parent.trace_id, extracted.parent.parent_id) == (
        "7bf92f3577b34da6a3ce929d0e0e4736",
        "30f067aa0ba902b7",
    )
    assert extracted.attributes.user_id == "u-1"


def test_untrusted_caller_keeps_its_w3c_parent_but_not_its_user(capture: CaptureServer) -> None:
    from fastapi.testclient import TestClient

    from celery_langfuse.web import LangfuseASGIMiddleware
    from tests.support.web_apps import v1

    edge = LangfuseASGIMiddleware(v1, trust_incoming_headers=False)
    trace_id = "8bf92f3577b34da6a3ce929d0e0e4736"
    with TestClient(edge) as http:
        http.get(
            "/items/q",
            headers={
                "traceparent": f"00-{trace_id}-40f067aa0ba902b7-01",
                "x-langfuse-user-id": "spoof",
            },
        )

    flush_in_process()
    capture.wait_for(lambda s: any(o.name == "GET /items/{item_id}" for o in s.observations))
    (request,) = [o for o in capture.observations if o.name == "GET /items/{item_id}"]
    assert request.trace_id == trace_id  # W3C trace context is continued from anyone
    assert request.parent_id == "40f067aa0ba902b7"
    assert request.user_id is None
