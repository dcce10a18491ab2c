"""Tasks published on commit join the trace of the request that scheduled them.

Real Django on the real PostgreSQL (each transaction really commits or rolls back),
the real in-thread worker, the real SDK into the capture server. The Django behaviour
the on_commit patch relies on is pinned by the contract tests at the end.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celery_langfuse.testing import CaptureServer, Observation, Trace
from tests.conftest import flush_in_process
from tests.support.django_harness.fixtures import django_site, django_worker

__all__ = ["django_site", "django_worker"]

RECORD = "shop.record"
BUY = "POST /orders/<int:pk>/buy/"


@pytest.fixture
def user_client(django_site: Any) -> Any:
    """A test client logged in as a new user, so user and session ids are known."""
    from django.contrib.auth.models import User
    from django.test import Client

    client = Client(raise_request_exception=False)
    client.user = User.objects.create_user(username=f"buyer-{uuid.uuid4().hex[:8]}")
    client.force_login(client.user)
    return client


def reference() -> str:
    return f"ref-{uuid.uuid4().hex[:10]}"


def runs_for(trace: Trace, ref: str) -> list[Observation]:
    return [o for o in trace.find_all(RECORD) if (o.input or {}).get("args", [None])[0] == ref]


def buy_trace(capture: CaptureServer, runs: int, task: str = RECORD) -> Trace:
    """The request's trace once ``runs`` runs of ``task`` arrived in it."""
    flush_in_process()

    def ready(server: CaptureServer) -> bool:
        (trace,) = [t for t in server.traces() if t.name == BUY]
        return len(trace.find_all(task)) >= runs

    capture.wait_for(ready, timeout=20)
    (trace,) = [t for t in capture.traces() if t.name == BUY]
    return trace


def assert_joined(trace: Trace, run: Observation, user: str) -> None:
    """``run`` is in the request's trace, below its publish, below the request, and
    carries the user and the session in effect when it was scheduled."""
    request = trace.find(BUY)
    by_id = {o.id: o for o in trace.observations}
    publish = by_id[run.parent_id or ""]
    assert publish.name == f"publish {RECORD}"
    assert publish.parent_id == request.id
    assert (run.user_id, run.session_id) == (user, request.session_id)
    assert (publish.user_id, publish.session_id) == (user, request.session_id)
    assert request.session_id


@pytest.mark.parametrize("mode", ["delay_on_commit", "on_commit", "signal"])
def test_published_on_commit_joins_the_request_trace(
    django_worker: Any, user_client: Any, capture: CaptureServer, mode: str
) -> None:
    ref = reference()
    assert user_client.post(f"/orders/3/buy/?mode={mode}&ref={ref}").status_code == 200

    name = "shop.notify" if mode == "signal" else RECORD
    trace = buy_trace(capture, runs=1, task=name)

    if mode == "signal":  # a post_save handler registered the publish
        run = trace.find(name)
        assert run.input == {"args": [ref], "kwargs": {}}
        request = trace.find(BUY)
        assert trace.find(f"publish {name}").parent_id == request.id
        assert run.user_id == user_client.user.username
    else:
        (run,) = runs_for(trace, ref)
        assert_joined(trace, run, user_client.user.username)
    assert trace.orphans() == [], trace.tree()


def test_nested_atomic_blocks_publish_once_the_outer_one_commits(
    django_worker: Any, user_client: Any, capture: CaptureServer
) -> None:
    ref = reference()
    user_client.post(f"/orders/3/buy/?mode=nested&ref={ref}")

    trace = buy_trace(capture, runs=2)

    runs = runs_for(trace, ref)
    assert sorted(run.input["args"][1] for run in runs) == ["nested-inner", "nested-outer"]
    for run in runs:
        assert_joined(trace, run, user_client.user.username)


def test_rollback_publishes_nothing_and_leaves_no_observation(
    django_worker: Any, user_client: Any, capture: CaptureServer
) -> None:
    from tests.support.django_site.shop.models import Order

    ref = reference()
    assert user_client.post(f"/orders/3/buy/?mode=rollback&ref={ref}").status_code == 409

    flush_in_process()
    capture.wait_for(lambda server: [t for t in server.traces() if t.name == BUY])
    time.sleep(2)  # a publish would have reached the worker and come back by now
    flush_in_process()
    (trace,) = capture.traces()
    assert [o.name for o in trace.observations] == [BUY]
    assert trace.find(BUY).level == "WARNING"  # the 409
    assert not Order.objects.filter(reference=ref).exists()


def test_savepoint_rollback_drops_only_its_own_callbacks(
    django_worker: Any, user_client: Any, capture: CaptureServer
) -> None:
    ref = reference()
    user_client.post(f"/orders/3/buy/?mode=savepoint-rollback&ref={ref}")

    trace = buy_trace(capture, runs=1)
    time.sleep(1)
    flush_in_process()
    (trace,) = [t for t in capture.traces() if t.name == BUY]

    assert [run.input["args"][1] for run in runs_for(trace, ref)] == ["kept"]
    assert len(trace.find_all(f"publish {RECORD}")) == 1


@pytest.fixture
def outer_transaction(django_site: Any) -> Iterator[None]:
    """The request runs in a transaction opened by a middleware placed before
    LangfuseMiddleware: it commits after the request's observation has ended."""
    from django.conf import settings
    from django.test import override_settings

    outer = "tests.support.django_site.shop.middleware.OuterAtomicMiddleware"
    with override_settings(MIDDLEWARE=[outer, *settings.MIDDLEWARE]):
        yield


def test_publish_after_the_request_span_ended_still_joins_its_trace(
    django_worker: Any, outer_transaction: None, user_client: Any, capture: CaptureServer
) -> None:
    ref = reference()
    assert user_client.post(f"/orders/3/buy/?mode=outer&ref={ref}").status_code == 200

    trace = buy_trace(capture, runs=1)

    (run,) = runs_for(trace, ref)
    assert_joined(trace, run, user_client.user.username)
    publish = trace.find(f"publish {RECORD}")
    assert publish.start_time >= trace.find(BUY).end_time  # sent after the request ended


# -- the Django behaviour the patch relies on (celery_langfuse/django/_on_commit.py) --


def test_contract_transaction_on_commit_goes_through_the_patched_connection_method(
    django_site: Any,
) -> None:
    from django.db import connections, transaction
    from django.db.backends.base.base import BaseDatabaseWrapper

    from celery_langfuse.django import trace_on_commit

    trace_on_commit()
    patched = BaseDatabaseWrapper.on_commit
    assert getattr(patched, "__celery_langfuse_original__", None) is not None
    # The backend in use does not override it, so every on_commit goes through it.
    connection = connections["default"]
    assert type(connection).on_commit is patched
    seen: list[str] = []
    with transaction.atomic():
        transaction.on_commit(lambda: seen.append("committed"))
        assert seen == []
        assert len(connection.run_on_commit) == 1
    assert seen == ["committed"]


def test_contract_rollback_drops_registered_callbacks(django_site: Any) -> None:
    from django.db import connection, transaction

    seen: list[str] = []
    with pytest.raises(RuntimeError), transaction.atomic():
        transaction.on_commit(lambda: seen.append("committed"))
        raise RuntimeError("roll back")
    assert seen == [] and connection.run_on_commit == []


def test_callbacks_outside_any_trace_are_passed_through_untouched(django_site: Any) -> None:
    from django.db import connection, transaction

    def callback() -> None:
        pass

    with transaction.atomic():
        transaction.on_commit(callback)
        (_, registered, _) = connection.run_on_commit[-1]
        assert registered is callback
