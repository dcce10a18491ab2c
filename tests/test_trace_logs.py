"""Trace ids in logs: a log line names its trace and observation in Langfuse.

Real Redis, in-thread and real prefork workers, the real SDK exporting to the capture
server; python-json-logger and structlog as users configure them.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from langfuse import get_client

from celery_langfuse import ConfigurationError, TracingConfig, add_trace_ids, trace_logs
from celery_langfuse.testing import CaptureServer
from celery_langfuse.web import LangfuseASGIMiddleware
from tests.conftest import flush_in_process, in_thread_worker, worker_process
from tests.support.installed import support_app

pytestmark = pytest.mark.timeout(180)

IDS_FORMAT = "%(langfuse_trace_id)s %(langfuse_observation_id)s %(message)s"
LOGGED = "tests.support.log_app.logged"


class Lines(logging.Handler):
    """Keeps each formatted line."""

    def __init__(self, fmt: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(fmt)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines(logging.Formatter(IDS_FORMAT))
    logger = logging.getLogger("tests.support.log_app")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture
def log_app(capture: CaptureServer) -> Iterator[Any]:
    with support_app("log_app") as module:
        module.app.control.purge()
        yield module


def test_records_logged_in_a_run_carry_its_trace_and_observation_ids(
    log_app: Any, lines: Lines, capture: CaptureServer
) -> None:
    with in_thread_worker(log_app.app):
        returned = log_app.logged.delay(3).get(timeout=30)
    flush_in_process()
    capture.wait_for_observations(1, name=LOGGED, timeout=15)
    (run,) = [o for o in capture.observations if o.name == LOGGED]

    # Its own logger's lines and Celery's task logger's (the same logger name here).
    assert lines.lines == [
        f"{run.trace_id} {run.id} {kind}step {i}" for i in range(3) for kind in ("", "task ")
    ]
    assert returned == {
        "trace_id": run.trace_id,
        "trace_url": f"{capture.base_url}/project/{log_app.PROJECT_ID}/traces/{run.trace_id}",
    }


def test_records_outside_a_trace_have_empty_ids(lines: Lines) -> None:
    logging.getLogger("tests.support.log_app").info("no trace")
    assert lines.lines == ["  no trace"]


def test_a_sampled_out_trace_gives_the_trace_id_but_no_observation_id() -> None:
    from opentelemetry import context as otel_context

    from celery_langfuse.headers import TraceParent

    parent = TraceParent("ab" * 16, "cd" * 8, sampled=False)
    token = otel_context.attach(parent.context())
    try:
        assert trace_logs.current_ids() == ("ab" * 16, "")
    finally:
        otel_context.detach(token)


def test_python_json_logger_writes_the_ids(log_app: Any, capture: CaptureServer) -> None:
    from pythonjsonlogger.json import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("%(message)s"))
    logger = logging.getLogger("tests.fanout.json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with get_client().start_as_current_observation(name="json-logs") as span:
            logger.info("inside")
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["langfuse_trace_id"] == span.trace_id
    assert inside["langfuse_observation_id"] == span.id
    assert (outside["langfuse_trace_id"], outside["langfuse_observation_id"]) == ("", "")


def test_structlog_gets_the_ids_from_the_processor(capture: CaptureServer) -> None:
    import structlog

    rendered: list[dict[str, Any]] = []

    def keep(logger: Any, method: str, event: dict[str, Any]) -> str:
        rendered.append(dict(event))
        return ""

    structlog.configure(
        processors=[add_trace_ids, keep], logger_factory=structlog.ReturnLoggerFactory()
    )
    try:
        with get_client().start_as_current_observation(name="structlog") as span:
            structlog.get_logger().info("inside")
    finally:
        structlog.reset_defaults()
    assert rendered == [
        {"event": "inside", "langfuse_trace_id": span.trace_id, "langfuse_observation_id": span.id}
    ]


def test_a_traced_web_request_logs_with_its_trace(capture: CaptureServer) -> None:
    app = FastAPI(telemetry={"tracing": False})  # type: ignore[arg-type]
    handler = Lines(logging.Formatter(IDS_FORMAT))
    logger = logging.getLogger("tests.fanout.web")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    @app.get("/logs")
    def logs() -> dict[str, str]:
        logger.info("handling")
        return {}

    app.add_middleware(LangfuseASGIMiddleware)
    try:
        with TestClient(app) as client:
            assert client.get("/logs").status_code == 200
    finally:
        logger.removeHandler(handler)
    flush_in_process()
    capture.wait_for_observations(1, name="GET /logs", timeout=15)
    (request,) = [o for o in capture.observations if o.name == "GET /logs"]
    assert handler.lines == [f"{request.trace_id} {request.id} handling"]


def test_a_factory_that_drops_the_ids_is_wrapped_again_with_one_warning(
    log_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    before = logging.getLogRecordFactory()
    logging.setLogRecordFactory(logging.LogRecord)  # a setup that ignores the previous one
    try:
        with caplog.at_level(logging.WARNING, logger="celery_langfuse.trace_logs"):
            trace_logs.ensure_record_factory()
            trace_logs.ensure_record_factory()
        record = logging.getLogRecordFactory()("x", logging.INFO, "", 0, "m", (), None)
        assert (record.langfuse_trace_id, record.langfuse_observation_id) == ("", "")
        warnings = [r for r in caplog.records if "record factory" in r.getMessage()]
        assert len(warnings) <= 1  # once per process: an earlier test may have used it
    finally:
        logging.setLogRecordFactory(before)
        trace_logs.install_record_factory()


def test_a_record_without_the_ids_never_fails_the_task(
    log_app: Any, capture: CaptureServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with in_thread_worker(log_app.app):
        assert log_app.logs_a_bare_record.delay().get(timeout=30) == "done"
    flush_in_process()
    capture.wait_for_observations(1, name="tests.support.log_app.logs_a_bare_record")
    (run,) = [
        o for o in capture.observations if o.name == "tests.support.log_app.logs_a_bare_record"
    ]
    assert run.level != "ERROR"


def test_uninstalled_factory_passes_records_through() -> None:
    trace_logs.uninstall_record_factory()
    try:
        record = logging.getLogRecordFactory()("x", logging.INFO, "", 0, "m", (), None)
        assert not hasattr(record, "langfuse_trace_id")
    finally:
        trace_logs.install_record_factory()
    record = logging.getLogRecordFactory()("x", logging.INFO, "", 0, "m", (), None)
    assert record.langfuse_trace_id == ""


def test_project_id_is_validated() -> None:
    with pytest.raises(ConfigurationError, match=r"project_id='no spaces'.*project id"):
        TracingConfig(project_id="no spaces")
    assert TracingConfig.resolve({}, {"CELERY_LANGFUSE_PROJECT_ID": "abc-1"}).project_id == "abc-1"
    assert TracingConfig.resolve({}, {"CELERY_LANGFUSE_LOG_TRACE_IDS": "no"}).log_trace_ids is False


def test_a_prefork_worker_logs_each_task_line_with_its_trace(
    log_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    count = 20
    with worker_process(
        capture.env, "-P", "prefork", "-c", "2", tmp_path=tmp_path, module="tests.support.log_app"
    ) as worker:
        results = [log_app.logged.apply_async((1,), queue=worker.queue) for _ in range(count)]
        returned = [r.get(timeout=60) for r in results]
        log_text = worker.log()
    capture.wait_for_observations(count, name=LOGGED, timeout=30)
    runs = {o.metadata["task_id"]: o for o in capture.observations if o.name == LOGGED}
    pattern = re.compile(
        rf"{LOGGED}\[([0-9a-f-]+)\] trace=([0-9a-f]{{32}}) observation=([0-9a-f]{{16}}): "
        r"task step 0"
    )
    found = {m.group(1): (m.group(2), m.group(3)) for m in pattern.finditer(log_text)}
    assert len(found) == count, log_text[-3000:]
    for result, value in zip(results, returned):
        run = runs[result.id]
        assert found[result.id] == (run.trace_id, run.id)
        assert value["trace_id"] == run.trace_id
    print(f"\nprefork worker: {len(found)}/{count} task log lines carry their trace ids")
