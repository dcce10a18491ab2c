"""The Django example's one-command demo: Django under uvicorn (ASGI), a prefork worker
and beat with the DatabaseScheduler as real subprocesses, traced into a capture server."""

from __future__ import annotations

import io

from example_project import demo as fastapi_demo
from example_project import django_demo as demo

from tests.conftest import REDIS_URL, require_redis


def test_django_demo_traces_each_request_through_its_tasks_with_user_and_session() -> None:
    require_redis()
    out = io.StringIO()

    result = demo.run(redis_url=REDIS_URL, real_langfuse=False, out=out)

    assert result.ok, result.problems
    by_id = {trace.id: trace for trace in result.traces}
    requests = [by_id[trace_id] for trace_id in result.request_trace_ids]
    for trace, document in zip(requests, fastapi_demo.DOCUMENTS):
        # The user is the Django user the bearer token logged in; the session comes
        # from the CELERY_LANGFUSE_DJANGO["session_id"] callable.
        assert (trace.name, trace.user_id, trace.session_id) == (
            "POST /summaries",
            document.user,
            document.session,
        )
        request = trace.find("POST /summaries")
        publish = trace.find("publish summaries.summarise_document")
        assert publish.parent_id == request.id  # sent by delay_on_commit
        assert trace.find("summaries.store_summary").level == "DEFAULT"
        assert trace.orphans() == [], trace.tree()
    beat = [t for t in result.traces if "celery-beat" in t.tags]
    assert {t.name for t in beat} >= {"purge-stale-summaries"}
    assert all(t.find(f"cron {t.name}").metadata["scheduler"] == "DatabaseScheduler" for t in beat)
    text = out.getvalue()
    assert "GET /summaries/<str:summary_id>" in text
    assert "WARNING - HTTP 404" in text and "WARNING - HTTP 422" in text
    assert " 0 orphans" in text
