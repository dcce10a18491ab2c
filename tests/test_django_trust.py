"""Trust boundaries in the Django middleware (docs/web.md "Trust"): what a caller's
``x-langfuse-*`` headers can and cannot do, through Django's real request handler.

Real Django with sessions and auth in the real PostgreSQL, the real SDK exporting to
the capture server. The test client's peer address (``REMOTE_ADDR``) is 127.0.0.1.
"""

from __future__ import annotations

from typing import Any

from celery_langfuse.testing import CaptureServer
from tests.support.django_harness.fixtures import django_site
from tests.test_django_requests import request_trace

__all__ = ["django_site"]

SECRET = "django-trust-secret-0123456789"
NAME = "GET /articles/<year>/"
SPOOFED = {
    "x-langfuse-user-id": "admin",
    "x-langfuse-session-id": "victim-session",
    "x-langfuse-tags": '["spoofed"]',
}


def get(path: str, headers: dict[str, str], **settings: Any) -> None:
    from django.test import Client, override_settings

    with override_settings(CELERY_LANGFUSE_DJANGO={"user_id": "username", **settings}):
        assert Client().get(path, headers=headers).status_code == 200


def test_an_anonymous_caller_cannot_name_the_user_or_the_session(
    django_site: Any, capture: CaptureServer
) -> None:
    get("/articles/2011/", SPOOFED)
    trace = request_trace(capture, NAME)
    assert trace.user_id is None
    assert trace.session_id != "victim-session"
    assert "spoofed" not in trace.tags


def test_a_claimed_langfuse_parent_starts_a_fresh_trace_that_records_the_claim(
    django_site: Any, capture: CaptureServer
) -> None:
    get(
        "/articles/2012/",
        {"x-langfuse-trace-id": "a" * 32, "x-langfuse-parent-id": "b" * 16},
    )
    trace = request_trace(capture, NAME)
    request = trace.find(NAME)
    assert trace.id != "a" * 32
    assert request.parent_id is None
    assert trace.name == NAME
    assert (request.metadata["claimed_trace_id"], request.metadata["claimed_parent_id"]) == (
        "a" * 32,
        "b" * 16,
    )


def test_a_caller_with_the_shared_secret_brings_its_identity(
    django_site: Any, capture: CaptureServer
) -> None:
    get(
        "/articles/2013/",
        {**SPOOFED, "x-langfuse-trust-secret": SECRET},
        trust_secret=SECRET,
    )
    trace = request_trace(capture, NAME)
    assert (trace.user_id, trace.session_id) == ("admin", "victim-session")


def test_a_wrong_secret_is_not_trusted(django_site: Any, capture: CaptureServer) -> None:
    get(
        "/articles/2014/",
        {**SPOOFED, "x-langfuse-trust-secret": SECRET[:-1] + "X"},
        trust_secret=SECRET,
    )
    assert request_trace(capture, NAME).user_id is None


def test_callers_from_a_trusted_network_bring_their_identity_others_do_not(
    django_site: Any, capture: CaptureServer
) -> None:
    get("/articles/2015/", SPOOFED, trusted_networks=["127.0.0.0/8"])
    assert request_trace(capture, NAME).user_id == "admin"

    capture.clear()
    get("/articles/2016/", SPOOFED, trusted_networks=["10.0.0.0/8"])
    assert request_trace(capture, NAME).user_id is None


def test_service_to_service_with_the_secret_continues_the_callers_trace_with_its_identity(
    django_site: Any, capture: CaptureServer
) -> None:
    """The seed architecture's internal call: the caller's headers (``inject_headers``
    with the shared secret) continue its trace, user and session through Django."""
    from django.test import Client, override_settings
    from langfuse import propagate_attributes

    from celery_langfuse import client as langfuse_client
    from celery_langfuse.web import inject_headers
    from tests.conftest import flush_in_process

    settings = {"user_id": "username", "trust_secret": SECRET}
    with (
        override_settings(CELERY_LANGFUSE_DJANGO=settings),
        propagate_attributes(user_id="caller-user", session_id="caller-session"),
        langfuse_client.get_langfuse().start_as_current_observation(
            name="internal caller"
        ) as caller,
    ):
        headers = inject_headers({}, trust_secret=SECRET)
        assert Client().get("/articles/2017/", headers=headers).status_code == 200
    flush_in_process()
    capture.wait_for(lambda s: any(o.name == NAME for o in s.observations), timeout=20)
    [request] = [o for o in capture.observations if o.name == NAME]
    assert (request.trace_id, request.parent_id) == (caller.trace_id, caller.id)
    assert (request.user_id, request.session_id) == ("caller-user", "caller-session")
    trace = capture.trace(caller.trace_id)
    assert trace.orphans() == [] and trace.name == "internal caller"
