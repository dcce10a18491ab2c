"""The example project's one-command demo: real uvicorn, worker and beat subprocesses,
traced into a capture server, with the checks a user would make in Langfuse."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from example_project import demo

from tests.conftest import REDIS_URL, ROOT, require_redis


def test_demo_traces_each_request_through_its_tasks_and_model_calls() -> None:
    require_redis()
    out = io.StringIO()

    result = demo.run(redis_url=REDIS_URL, real_langfuse=False, out=out)

    assert result.ok, result.problems
    assert result.broker == REDIS_URL
    by_id = {trace.id: trace for trace in result.traces}
    alice, bob, carol = (by_id[trace_id] for trace_id in result.request_trace_ids)
    for trace, document in zip((alice, bob, carol), demo.DOCUMENTS):
        assert (trace.name, trace.user_id, trace.session_id) == (
            "POST /summaries",
            document.user,
            document.session,
        )
        assert trace.orphans() == [], trace.tree()
        assert trace.find("summaries.store_summary").level == "DEFAULT"
    generations = alice.find_all("summarise chunk")
    assert len(generations) == 3
    assert {g.type for g in generations} == {"generation"}
    assert generations[0].attributes["langfuse.observation.model.name"] == "fake-summariser-1"
    usage = json.loads(generations[0].attributes["langfuse.observation.usage_details"])
    assert usage["input"] > 0 and usage["output"] > 0
    # bob's first model call fails; the retry stays in his trace.
    assert [g.level for g in bob.find_all("summarise chunk")].count("ERROR") == 1
    assert any(
        run.level == "WARNING" and "retry" in (run.status_message or "")
        for run in bob.find_all("summaries.summarise_chunk")
    )
    text = out.getvalue()
    assert "=== 6 request traces ===" in text
    assert "WARNING - HTTP 404" in text and "WARNING - HTTP 422" in text
    assert " 0 orphans" in text


def test_demo_command_runs_without_redis() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    for key in demo.LANGFUSE_KEYS:  # the local capture server, not a real Langfuse
        env.pop(key, None)

    finished = subprocess.run(
        [sys.executable, "-m", "example_project.demo", "--no-redis"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "broker: filesystem://" in finished.stdout
    assert "user='bob' session='s-bob-7'" in finished.stdout
    assert "every request trace is complete" in finished.stdout
