"""Trust at the web layer: who may write user, session and parent into a request's trace.

Each test runs against real servers: the ASGI middleware on FastAPI under uvicorn, the
WSGI middleware on a plain WSGI app and ``trace_flask`` on Flask, both under the
standard library's ``wsgiref`` server; calls are real HTTP from 127.0.0.1. Assertions
are on what the capture server received, as Langfuse would show it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import httpx
import pytest
import requests
from langfuse import propagate_attributes
from opentelemetry import context as otel_context
from opentelemetry import propagate

from celery_langfuse import ConfigurationError, _sdk
from celery_langfuse import client as langfuse_client
from celery_langfuse.testing import CaptureServer, Observation, Trace
from celery_langfuse.web import (
    ROUTE_KEY,
    LangfuseASGIMiddleware,
    LangfuseWSGIMiddleware,
    WebTracingConfig,
    httpx_hooks,
    inject_headers,
    read_incoming,
    trace_flask,
    trace_session,
)
from tests.conftest import flush_in_process
from tests.test_web_propagation import uvicorn_server

SECRET = "trust-tests-secret-0123456789abcdef"
CLAIMED_TRACE, CLAIMED_PARENT = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"

#: Every identity header a spoofing caller could send.
SPOOFED_IDENTITY = {
    "x-langfuse-user-id": "admin",
    "x-langfuse-session-id": "victim-session",
    "x-langfuse-tags": '["vip"]',
    "x-langfuse-trace-name": "spoofed name",
    "x-langfuse-environment": "production",
    "x-langfuse-metadata": '{"role": "superuser"}',
}

FRAMEWORKS = ("asgi", "wsgi", "flask")
#: The request observation's name for ``GET /items/<id>`` in each framework.
REQUEST_NAME = {
    "asgi": "GET /items/{item_id}",
    "wsgi": "GET /items/{item_id}",
    "flask": "GET /items/<item_id>",
}


def identify(request: Any) -> Any:
    from tests.support.web_apps import identify as bearer_identify

    return bearer_identify(request)


def fastapi_items_app() -> Any:
    from fastapi import FastAPI

    app = FastAPI(telemetry={"tracing": False})  # type: ignore[call-arg]

    @app.get("/items/{item_id}")
    def get_item(item_id: str) -> dict[str, str]:
        return {"item": item_id}

    return app


def plain_wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    environ[ROUTE_KEY] = "/items/{item_id}"  # what a framework reports once routed
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps({"item": environ["PATH_INFO"].rsplit("/", 1)[-1]}).encode()]


def flask_items_app(**options: Any) -> Any:
    from flask import Flask

    app = Flask(f"trust-{uuid.uuid4().hex[:6]}")

    @app.get("/items/<item_id>")
    def get_item(item_id: str) -> dict[str, str]:
        return {"item": item_id}

    return trace_flask(app, **options)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def wsgi_server(app: Any) -> Iterator[str]:
    """``app`` served by the standard library's WSGI server on 127.0.0.1."""
    server = make_server("127.0.0.1", 0, app, WSGIServer, _QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="wsgiref", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextmanager
def serve(framework: str, **options: Any) -> Iterator[str]:
    """The items app of ``framework`` behind the middleware built with ``options``."""
    options.setdefault("identify", identify)
    if framework == "asgi":
        with uvicorn_server(LangfuseASGIMiddleware(fastapi_items_app(), **options)) as url:
            yield url
    elif framework == "wsgi":
        with wsgi_server(LangfuseWSGIMiddleware(plain_wsgi_app, **options)) as url:
            yield url
    else:
        with wsgi_server(flask_items_app(**options)) as url:
            yield url


def request_observation(capture: CaptureServer, item: str) -> tuple[Observation, Trace]:
    """The observation of the request for ``/items/<item>``, and its trace."""
    flush_in_process()

    def found(server: CaptureServer) -> list[Observation]:
        return [o for o in server.observations if o.metadata.get("path") == f"/items/{item}"]

    capture.wait_for(lambda s: len(found(s)) == 1, timeout=15)
    (observation,) = found(capture)
    return observation, capture.trace(observation.trace_id)


def new_item() -> str:
    return uuid.uuid4().hex[:12]


@contextmanager
def calling_service() -> Iterator[Any]:
    """An observation of an internal service, with its own user and session."""
    langfuse = langfuse_client.get_langfuse()
    with (
        propagate_attributes(user_id="caller-user", session_id="caller-session"),
        langfuse.start_as_current_observation(name="internal caller") as caller,
    ):
        yield caller


# -- the default: a public API ----------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_anonymous_spoofed_identity_is_ignored(framework: str, capture: CaptureServer) -> None:
    item = new_item()
    with serve(framework) as url:
        response = httpx.get(
            f"{url}/items/{item}",
            headers={**SPOOFED_IDENTITY, "authorization": "Bearer real-user"},
            timeout=10,
        )
    assert response.json() == {"item": item}

    request, trace = request_observation(capture, item)
    assert (request.user_id, request.session_id) == ("real-user", None)  # identify's only
    assert (trace.user_id, trace.session_id, trace.tags) == ("real-user", None, [])
    assert trace.name == REQUEST_NAME[framework]
    assert trace.environment == "default"
    assert "role" not in trace.metadata and "role" not in request.metadata
    assert request.metadata["ignored_trace_headers"] == list(SPOOFED_IDENTITY)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_trace_id_injection_starts_a_fresh_trace_recording_the_claim(
    framework: str, capture: CaptureServer
) -> None:
    item = new_item()
    with serve(framework) as url:
        httpx.get(
            f"{url}/items/{item}",
            headers={
                "x-langfuse-trace-id": CLAIMED_TRACE,
                "x-langfuse-parent-id": CLAIMED_PARENT,
                "traceparent": f"00-{CLAIMED_TRACE}-{CLAIMED_PARENT}-01",
                "x-langfuse-user-id": "admin",
            },
            timeout=10,
        )

    request, trace = request_observation(capture, item)
    assert request.trace_id != CLAIMED_TRACE
    assert request.parent_id is None
    assert trace.name == REQUEST_NAME[framework]  # the request's own trace, named
    assert trace.user_id is None
    assert (request.metadata["claimed_trace_id"], request.metadata["claimed_parent_id"]) == (
        CLAIMED_TRACE,
        CLAIMED_PARENT,
    )
    assert CLAIMED_TRACE not in {t.id for t in capture.traces()}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_untrusted_traceparent_alone_is_continued(framework: str, capture: CaptureServer) -> None:
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    item = new_item()
    with serve(framework) as url:
        httpx.get(f"{url}/items/{item}", headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})

    request, _ = request_observation(capture, item)
    assert (request.trace_id, request.parent_id) == (trace_id, parent_id)
    assert "claimed_trace_id" not in request.metadata


# -- trusted callers ----------------------------------------------------------------------


def trusting_call(url: str, item: str, **extra: str) -> None:
    httpx.get(
        f"{url}/items/{item}",
        headers={
            **SPOOFED_IDENTITY,
            "x-langfuse-trace-id": CLAIMED_TRACE,
            "x-langfuse-parent-id": CLAIMED_PARENT,
            **extra,
        },
        timeout=10,
    )


def assert_headers_believed(request: Observation, trace: Trace) -> None:
    assert (request.trace_id, request.parent_id) == (CLAIMED_TRACE, CLAIMED_PARENT)
    assert (request.user_id, request.session_id) == ("admin", "victim-session")
    assert request.tags == ["vip"]
    if "environment" in _sdk.installed().propagated_arguments:  # SDK 4.12+
        assert request.environment == "production"
    assert "ignored_trace_headers" not in request.metadata


def assert_headers_ignored(request: Observation) -> None:
    assert request.trace_id != CLAIMED_TRACE
    assert (request.user_id, request.session_id, request.tags) == (None, None, [])
    assert request.metadata["claimed_trace_id"] == CLAIMED_TRACE


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_caller_from_a_trusted_network_is_believed(framework: str, capture: CaptureServer) -> None:
    item = new_item()
    with serve(framework, trusted_networks=["10.0.0.0/8", "127.0.0.0/8"]) as url:
        trusting_call(url, item)

    assert_headers_believed(*request_observation(capture, item))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_caller_outside_the_trusted_networks_is_not(framework: str, capture: CaptureServer) -> None:
    item = new_item()
    with serve(framework, trusted_networks=["10.0.0.0/8", "::1"]) as url:
        trusting_call(url, item)

    assert_headers_ignored(request_observation(capture, item)[0])


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_caller_with_the_trust_secret_is_believed(framework: str, capture: CaptureServer) -> None:
    item = new_item()
    with serve(framework, trust_secret=SECRET) as url:
        trusting_call(url, item, **{"x-langfuse-trust-secret": SECRET})

    assert_headers_believed(*request_observation(capture, item))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_wrong_oversized_or_malformed_secret_is_rejected_and_the_request_served(
    framework: str, capture: CaptureServer
) -> None:
    wrong = {
        "wrong": SECRET[:-1] + "X",
        "prefix": SECRET[:-1],
        "oversized": SECRET * 200,  # 7 KB: past what is compared, under the servers' limits
        "not ascii": "é" * 40,
        "repeated": f"{SECRET}, {SECRET}",
    }
    items = {case: new_item() for case in wrong}
    with serve(framework, trust_secret=SECRET) as url:
        for case, secret in wrong.items():
            sent = [
                (name.encode(), value.encode())
                for name, value in {
                    **SPOOFED_IDENTITY,
                    "x-langfuse-trace-id": CLAIMED_TRACE,
                    "x-langfuse-parent-id": CLAIMED_PARENT,
                    "x-langfuse-trust-secret": secret,
                }.items()
            ]
            response = httpx.get(f"{url}/items/{items[case]}", headers=sent, timeout=10)
            assert response.status_code == 200, case

    for case, item in items.items():
        request, _ = request_observation(capture, item)
        assert request.user_id is None, case
        assert_headers_ignored(request)


def test_trust_incoming_headers_trusts_every_caller(capture: CaptureServer) -> None:
    item = new_item()
    with serve("asgi", trust_incoming_headers=True) as url:
        trusting_call(url, item)

    assert_headers_believed(*request_observation(capture, item))


# -- service to service -----------------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_service_to_service_in_trusted_mode_continues_the_trace_with_user_and_session(
    framework: str, capture: CaptureServer
) -> None:
    items = (new_item(), new_item())
    with serve(framework, trust_secret=SECRET) as url, calling_service() as caller:
        with httpx.Client(event_hooks=httpx_hooks(trust_secret=SECRET)) as http:
            assert http.get(f"{url}/items/{items[0]}").status_code == 200
        session = trace_session(requests.Session(), trust_secret=SECRET)
        assert session.get(f"{url}/items/{items[1]}", timeout=10).status_code == 200

    for item in items:
        request, trace = request_observation(capture, item)
        assert request.trace_id == caller.trace_id
        assert request.parent_id == caller.id
        assert (request.user_id, request.session_id) == ("caller-user", "caller-session")
    trace = capture.trace(caller.trace_id)
    assert trace.orphans() == []
    assert trace.name == "internal caller"


def test_service_without_the_secret_gets_a_trace_of_its_own(capture: CaptureServer) -> None:
    item = new_item()
    with serve("asgi", trust_secret=SECRET) as url, calling_service() as caller:
        with httpx.Client(event_hooks=httpx_hooks()) as http:  # no secret configured
            http.get(f"{url}/items/{item}")

    request, _ = request_observation(capture, item)
    assert request.trace_id != caller.trace_id
    assert (request.metadata["claimed_trace_id"], request.metadata["claimed_parent_id"]) == (
        caller.trace_id,
        caller.id,
    )
    assert request.user_id is None


def test_secret_is_sent_only_with_a_trace_context() -> None:
    assert inject_headers({}, trust_secret=SECRET) == {}
    with calling_service():
        sent: dict[str, str] = inject_headers({}, trust_secret=SECRET)
    assert sent["x-langfuse-trust-secret"] == SECRET
    assert sent["x-langfuse-user-id"] == "caller-user"


# -- baggage ------------------------------------------------------------------------------


def otel_server_instrumentation(app: Any) -> Any:
    """What an OpenTelemetry ASGI server instrumentation does before the app runs:
    extract the incoming context (W3C trace context and baggage) and make it current."""

    async def instrumented(scope: Any, receive: Any, send: Any) -> None:
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        token = otel_context.attach(propagate.extract(carrier))
        try:
            await app(scope, receive, send)
        finally:
            otel_context.detach(token)

    return instrumented


@pytest.mark.parametrize(
    ("options", "believed"),
    [({}, False), ({"trust_secret": SECRET}, True)],
    ids=["anonymous", "trusted"],
)
def test_langfuse_baggage_counts_only_from_a_trusted_caller(
    options: dict[str, Any], believed: bool, capture: CaptureServer
) -> None:
    item = new_item()
    app = otel_server_instrumentation(
        LangfuseASGIMiddleware(fastapi_items_app(), identify=identify, **options)
    )
    with uvicorn_server(app) as url:
        httpx.get(
            f"{url}/items/{item}",
            headers={
                "baggage": "langfuse_user_id=admin,langfuse_session_id=victim-session,other=1",
                "x-langfuse-trust-secret": SECRET,
            },
        )

    request, _ = request_observation(capture, item)
    expected = ("admin", "victim-session") if believed else (None, None)
    assert (request.user_id, request.session_id) == expected


# -- the decision, and bad configuration ----------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),  # IPv4 caller on a dual-stack socket
        ("fd00::5", True),
        ("11.0.0.1", False),
        ("testclient", False),
        ("", False),
        (None, False),
        ("10.1.2.3, 1.2.3.4", False),
    ],
)
def test_read_incoming_trusts_by_peer_address(peer: str | None, trusted: bool) -> None:
    config = WebTracingConfig(trusted_networks=["10.0.0.0/8", "fd00::/8"])
    incoming = read_incoming({"x-langfuse-user-id": "u-1"}, peer, config)

    assert incoming.trusted is trusted
    assert incoming.extracted.attributes.user_id == ("u-1" if trusted else None)


def test_forwarded_for_header_is_never_the_peer() -> None:
    config = WebTracingConfig(trusted_networks=["10.0.0.0/8"])
    spoofed = {"x-forwarded-for": "10.0.0.1", "x-real-ip": "10.0.0.1", "x-langfuse-user-id": "u"}

    assert read_incoming(spoofed, "203.0.113.9", config).trusted is False


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"trusted_networks": ["10.0.0.0/33"]}, "trusted_networks: '10.0.0.0/33' is not a network"),
        ({"trusted_networks": ["10.0.0.1/8"]}, "'10.0.0.1/8' is not a network"),
        ({"trusted_networks": ["intranet"]}, "'intranet' is not a network"),
        ({"trusted_networks": "10.0.0.0/8"}, "trusted_networks='10.0.0.0/8': must be a list"),
        ({"trust_secret": ""}, "trust_secret='': must be a string of 16 to 1024"),
        ({"trust_secret": "   "}, "trust_secret='   '"),
        ({"trust_secret": "hunter2"}, "trust_secret=<secret of 7 characters>"),
        ({"trust_secret": "has space in it 0123"}, "<secret of 20 characters>"),
        (
            {"trust_incoming_headers": True, "trust_secret": SECRET},
            "trust_incoming_headers=True trusts every caller",
        ),
    ],
)
def test_bad_trust_settings_are_refused_when_the_middleware_is_built(
    options: dict[str, Any], message: str
) -> None:
    builds: list[Callable[[], object]] = [
        lambda: LangfuseASGIMiddleware(fastapi_items_app(), **options),
        lambda: LangfuseWSGIMiddleware(plain_wsgi_app, **options),
        lambda: flask_items_app(**options),
    ]
    for build in builds:
        with pytest.raises(ConfigurationError, match=re.escape(message)) as raised:
            build()
        assert "hunter2" not in str(raised.value)


def test_bad_secret_is_refused_by_the_client_helpers() -> None:
    helpers: list[Callable[[], object]] = [
        lambda: httpx_hooks(trust_secret=""),
        lambda: trace_session(requests.Session(), trust_secret="short"),
        lambda: inject_headers({}, trust_secret="short"),
    ]
    for helper in helpers:
        with pytest.raises(ConfigurationError, match="trust_secret="):
            helper()


def test_ignored_headers_are_explained_once_per_process(
    capture: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    from celery_langfuse.web import _core

    _core._noted_distrusted = False
    caplog.set_level(logging.INFO, logger="celery_langfuse.web")
    items = (new_item(), new_item())
    with serve("asgi") as url:
        for item in items:
            httpx.get(f"{url}/items/{item}", headers={"x-langfuse-user-id": "admin"})
    for item in items:
        request_observation(capture, item)

    notes = [r for r in caplog.records if "not trusted" in r.getMessage()]
    assert len(notes) == 1
    assert "trust_secret or trusted_networks" in notes[0].getMessage()
