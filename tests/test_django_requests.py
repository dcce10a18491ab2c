"""LangfuseMiddleware in a real Django project: what Langfuse shows for a request.

Real Django (5.2) with sessions and auth in the real PostgreSQL, the real Langfuse SDK
exporting to the capture server, and a real in-thread Celery worker for the tasks
the views publish. ``Client`` drives Django's WSGI handler, ``AsyncClient`` its ASGI
handler (the middleware then runs in async mode).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest

from celery_langfuse import logs
from celery_langfuse.config import ConfigurationError
from celery_langfuse.testing import CaptureServer
from tests.conftest import flush_in_process, request_trace
from tests.support.django_harness.fixtures import django_site, django_worker

__all__ = ["django_site", "django_worker"]  # fixtures used by name below

RECORD = "shop.record"


def new_user(password: str | None = None) -> Any:
    from django.contrib.auth.models import User

    return User.objects.create_user(username=f"user-{uuid.uuid4().hex[:8]}", password=password)


@pytest.fixture
def client(django_site: Any) -> Any:
    from django.test import Client

    return Client(raise_request_exception=False)


def test_path_converter_route_names_the_trace_and_the_task_joins_it(
    django_worker: Any, client: Any, capture: CaptureServer
) -> None:
    response = client.get("/orders/7/?color=red")
    assert response.status_code == 200

    trace = request_trace(capture, "GET /orders/<int:pk>/", f"publish {RECORD}", RECORD)

    request = trace.find("GET /orders/<int:pk>/")
    assert trace.name == "GET /orders/<int:pk>/"
    assert request.metadata["route"] == "/orders/<int:pk>/"
    assert request.metadata["view"] == "order-detail"
    assert request.metadata["path"] == "/orders/7/"
    assert request.metadata["query_keys"] == ["color"]
    assert request.output == {"status_code": 200}
    assert request.level == "DEFAULT"
    publish = trace.find(f"publish {RECORD}")
    assert publish.parent_id == request.id
    assert trace.find(RECORD).parent_id == publish.id
    assert trace.orphans() == [], trace.tree()


@pytest.mark.parametrize(
    ("path", "name", "view"),
    [
        ("/articles/2024/", "GET /articles/<year>/", "article"),
        ("/api/v1/orders/3/", "GET /api/v1/orders/<int:pk>/", "v1:order-detail"),
        ("/api/v1/legacy/ABC-12/", "GET /api/v1/legacy/<code>-<var>/", "v1:legacy"),
        ("/shop/items/blue-shoe/", "GET /shop/items/<slug:slug>/", "items:detail"),
        ("/", "GET /", "home"),
    ],
    ids=["regex", "namespaced-include", "regex-in-include", "path-under-regex-include", "root"],
)
def test_route_names_for_regexes_includes_and_namespaces(
    client: Any, capture: CaptureServer, path: str, name: str, view: str
) -> None:
    assert client.get(path).status_code == 200

    request = request_trace(capture, name).find(name)

    assert request.metadata["view"] == view
    assert request.metadata["path"] == path


def test_unmatched_path_is_a_warning_named_after_the_method_only(
    client: Any, capture: CaptureServer
) -> None:
    assert client.get("/no/such/page/").status_code == 404

    request = request_trace(capture, "GET").find("GET")

    assert (request.level, request.status_message) == ("WARNING", "HTTP 404")
    assert request.metadata.get("route") is None
    assert request.metadata["path"] == "/no/such/page/"


def test_404_from_a_view_keeps_the_route(client: Any, capture: CaptureServer) -> None:
    assert client.get("/orders/404/").status_code == 404

    request = request_trace(capture, "GET /orders/<int:pk>/").find("GET /orders/<int:pk>/")

    assert (request.level, request.status_message) == ("WARNING", "HTTP 404")


def test_unhandled_exception_is_an_error_with_the_exception(
    client: Any, capture: CaptureServer
) -> None:
    assert client.get("/boom/").status_code == 500

    request = request_trace(capture, "GET /boom/").find("GET /boom/")

    assert request.level == "ERROR"
    assert request.status_message == "ZeroDivisionError: the view divided by zero"
    assert request.output == {"status_code": 500}


def test_permission_denied_is_a_client_error_not_an_exception(
    client: Any, capture: CaptureServer
) -> None:
    assert client.get("/forbidden/").status_code == 403

    request = request_trace(capture, "GET /forbidden/").find("GET /forbidden/")

    assert (request.level, request.status_message) == ("WARNING", "HTTP 403")


def test_anonymous_request_has_no_user_and_no_session(
    django_worker: Any, client: Any, capture: CaptureServer
) -> None:
    client.get("/orders/1/")

    trace = request_trace(capture, "GET /orders/<int:pk>/", f"publish {RECORD}", RECORD)

    assert [(o.user_id, o.session_id) for o in trace.observations] == [
        (None, None) for _ in trace.observations
    ]


def test_logged_in_user_and_session_are_on_every_observation(
    django_worker: Any, client: Any, capture: CaptureServer
) -> None:
    user = new_user()
    client.force_login(user)
    session_key = client.session.session_key

    client.get("/orders/2/")

    trace = request_trace(capture, "GET /orders/<int:pk>/", f"publish {RECORD}", RECORD)
    assert trace.user_id == user.username  # CELERY_LANGFUSE_DJANGO["user_id"] = "username"
    session_id = trace.session_id
    assert session_id and len(session_id) == 32
    assert session_key not in session_id  # the key logs a user in: only a digest leaves
    assert [(o.name, o.user_id, o.session_id) for o in trace.observations] == [
        (o.name, user.username, session_id) for o in trace.observations
    ]

    capture.clear()
    client.get("/articles/1999/")
    again = request_trace(capture, "GET /articles/<year>/")
    assert again.session_id == session_id  # one Django session, one Langfuse session


def test_user_id_attribute_or_callable_is_a_setting(
    django_site: Any, capture: CaptureServer
) -> None:
    from django.test import Client, override_settings

    user = new_user()
    with override_settings(CELERY_LANGFUSE_DJANGO={"user_id": lambda u: f"u{u.pk}"}):
        client = Client()
        client.force_login(user)
        client.get("/articles/2001/")
    assert request_trace(capture, "GET /articles/<year>/").user_id == f"u{user.pk}"

    capture.clear()
    with override_settings(CELERY_LANGFUSE_DJANGO={"user_id": "pk", "session_id": False}):
        client = Client()
        client.force_login(user)
        client.get("/articles/2002/")
    trace = request_trace(capture, "GET /articles/<year>/")
    assert (trace.user_id, trace.session_id) == (str(user.pk), None)


def test_async_view_under_asgi_is_traced_with_user_and_task(
    django_worker: Any, django_site: Any, capture: CaptureServer
) -> None:
    from asgiref.sync import sync_to_async
    from django.test import AsyncClient

    user = new_user()

    async def run() -> int:
        client = AsyncClient()
        await sync_to_async(client.force_login)(user)
        response = await client.get("/async-orders/5/")
        return int(response.status_code)

    assert asyncio.run(run()) == 200

    trace = request_trace(capture, "GET /async-orders/<int:pk>/", f"publish {RECORD}", RECORD)
    request = trace.find("GET /async-orders/<int:pk>/")
    assert trace.find(f"publish {RECORD}").parent_id == request.id
    assert trace.find(RECORD).user_id == user.username
    assert trace.orphans() == []


def test_sync_view_under_asgi(django_site: Any, capture: CaptureServer) -> None:
    from django.test import AsyncClient

    async def run() -> int:
        client = AsyncClient(raise_request_exception=False)
        return int((await client.get("/boom/")).status_code)

    assert asyncio.run(run()) == 500

    request = request_trace(capture, "GET /boom/").find("GET /boom/")
    assert request.status_message == "ZeroDivisionError: the view divided by zero"


def test_incoming_traceparent_is_continued(client: Any, capture: CaptureServer) -> None:
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]

    client.get("/articles/2020/", headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})

    flush_in_process()
    capture.wait_for(lambda server: server.trace(trace_id).find("GET /articles/<year>/"))
    request = capture.trace(trace_id).find("GET /articles/<year>/")
    assert request.parent_id == parent_id  # a child of the caller's span, not a new root


def test_excluded_paths_are_not_traced(
    django_worker: Any, client: Any, capture: CaptureServer
) -> None:
    assert client.get("/healthz").status_code == 200
    client.get("/static/app.css")  # 404 here, but never traced either
    client.get("/articles/2021/")

    request_trace(capture, "GET /articles/<year>/")
    capture.wait_for(
        lambda server: server.traces() and any(o.name == RECORD for o in server.observations),
        timeout=20,
    )
    names = {o.name for o in capture.observations}
    assert not {n for n in names if n.startswith("GET") and n != "GET /articles/<year>/"}, names


def test_broken_request_user_never_breaks_the_request(
    client: Any, capture: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    logs._last_logged.pop("django-user", None)
    caplog.set_level(logging.DEBUG, logger="celery_langfuse")

    responses = [client.get("/articles/2022/", headers={"X-Break-User": "1"}) for _ in range(3)]

    assert [r.status_code for r in responses] == [200, 200, 200]
    flush_in_process()
    capture.wait_for(
        lambda server: len([o for o in server.observations if o.name.startswith("GET")]) == 3,
        timeout=20,
    )
    assert {o.user_id for o in capture.observations} == {None}
    about_user = [r for r in caplog.records if "request.user raised" in r.getMessage()]
    assert [r.levelno for r in about_user] == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_misconfigured_middleware_setting_raises_when_django_loads_it(
    django_site: Any,
) -> None:
    from django.test import Client, override_settings

    with override_settings(CELERY_LANGFUSE_DJANGO={"user_id": 5}):
        with pytest.raises(ConfigurationError, match=r"CELERY_LANGFUSE_DJANGO\['user_id'\]=5"):
            Client().get("/")
    with override_settings(CELERY_LANGFUSE_DJANGO={"exclude_paths": "healthz"}):
        with pytest.raises(ConfigurationError, match="exclude_paths='healthz'"):
            Client().get("/")
    with override_settings(CELERY_LANGFUSE_DJANGO={"user": "pk"}):
        with pytest.raises(ConfigurationError, match=r"unknown key.*'user'"):
            Client().get("/")
    # Trust settings are checked by the one web core, through Django too.
    with override_settings(CELERY_LANGFUSE_DJANGO={"trusted_networks": ["10.0.0.0/33"]}):
        with pytest.raises(ConfigurationError, match=r"10\.0\.0\.0/33"):
            Client().get("/")
    with override_settings(CELERY_LANGFUSE_DJANGO={"trust_secret": ""}):
        with pytest.raises(ConfigurationError, match="trust_secret"):
            Client().get("/")


def test_broken_request_user_under_asgi_never_breaks_the_request(
    django_site: Any, capture: CaptureServer
) -> None:
    from django.test import AsyncClient

    async def run() -> int:
        response = await AsyncClient().get("/articles/2023/", headers={"X-Break-User": "1"})
        return int(response.status_code)

    assert asyncio.run(run()) == 200

    trace = request_trace(capture, "GET /articles/<year>/")
    assert trace.user_id is None


def test_static_and_media_urls_of_the_site_are_excluded_by_default(django_site: Any) -> None:
    from django.test import override_settings

    from celery_langfuse.django import DjangoTracingSettings

    with override_settings(
        CELERY_LANGFUSE_DJANGO={}, STATIC_URL="static/", MEDIA_URL="https://cdn.example/m/"
    ):
        web = DjangoTracingSettings.from_django(identify=lambda request: None).web
    assert web.excludes("/static/app.css") and web.excludes("/healthz")
    assert not web.excludes("/m/photo.jpg")  # served by another host: nothing to exclude
    assert not web.excludes("/orders/1/")


def test_placed_before_authentication_it_warns_at_start_up(
    django_site: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from django.conf import settings
    from django.test import Client, override_settings

    ours = "celery_langfuse.django.LangfuseMiddleware"
    reordered = [ours, *(m for m in settings.MIDDLEWARE if m != ours)]
    with override_settings(MIDDLEWARE=reordered):
        assert Client().get("/articles/2024/").status_code == 200
    assert "comes before django.contrib.sessions.middleware.SessionMiddleware" in caplog.text


def test_django_wsgi_handler_is_traced(django_site: Any, capture: CaptureServer) -> None:
    """Django's own WSGI handler (what gunicorn or uWSGI call), with a PEP 3333 environ."""
    from io import BytesIO
    from wsgiref.util import setup_testing_defaults

    from django.core.wsgi import get_wsgi_application

    environ: dict[str, Any] = {"PATH_INFO": "/articles/1984/", "wsgi.input": BytesIO()}
    setup_testing_defaults(environ)
    statuses: list[str] = []
    body = get_wsgi_application()(environ, lambda status, headers: statuses.append(status))
    b"".join(body)
    body.close()

    assert statuses == ["200 OK"]
    request = request_trace(capture, "GET /articles/<year>/").find("GET /articles/<year>/")
    assert request.metadata["path"] == "/articles/1984/"


@pytest.mark.parametrize(
    ("pattern", "readable"),
    [
        (r"^articles/(?P<year>[0-9]{4})/$", "articles/<year>/"),
        (r"^(\d+)/export\.json$", "<var>/export.json"),
        (r"^blog/(?:page-(?P<page>\d+)/)?$", "blog/page-<page>/"),
        (r"^files/(?P<path>.*)\Z", "files/<path>"),
        (r"^v[12]/items/$", "v<var>/items/"),
        (r"^api/orders/<int:pk>/", "api/orders/<int:pk>/"),  # a path() route below a re_path
    ],
)
def test_regex_routes_read_as_templates(pattern: str, readable: str) -> None:
    from celery_langfuse.django import simplify_regex

    assert simplify_regex(pattern) == readable
