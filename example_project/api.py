"""The HTTP API: ``POST /summaries`` enqueues the work, ``GET /summaries/{id}`` reads it.

Each request is a Langfuse trace (``LangfuseASGIMiddleware``); the tasks it enqueues
join that trace, with the caller's user id and session id on every observation.
"""

from __future__ import annotations

import inspect
import uuid
from typing import Any, Optional

from fastapi import FastAPI, Header, HTTPException
from langfuse import get_client
from pydantic import BaseModel, Field

from celery_langfuse import TraceAttributes
from celery_langfuse.web import IncomingRequest, LangfuseASGIMiddleware

from . import store
from .tasks import summarise_document


def user_from(authorization: Optional[str]) -> Optional[str]:
    """Who is calling. A real app verifies a token here; this one trusts the bearer
    value as the user id."""
    token = (authorization or "").removeprefix("Bearer ").strip()
    return token or None


def identify(request: IncomingRequest) -> TraceAttributes:
    """The trace attributes of a request: user, session (``X-Session-Id``) and a tag."""
    return TraceAttributes(
        user_id=user_from(request.headers.get("authorization")),
        session_id=request.headers.get("x-session-id"),
        tags=("summaries-api",),
    )


def create_app() -> FastAPI:
    options: dict[str, Any] = {"title": "Summaries"}
    if "telemetry" in inspect.signature(FastAPI).parameters:
        # FastAPI's own OpenTelemetry spans are not exported to Langfuse; left on, they
        # would sit between the request and its tasks (see docs/web.md).
        options["telemetry"] = {"tracing": False}
    api = FastAPI(**options)
    api.add_middleware(LangfuseASGIMiddleware, identify=identify, exclude_paths={"/health"})
    return api


app = create_app()


class SummaryRequest(BaseModel):
    text: str = Field(min_length=1, max_length=100_000)
    title: str = Field(default="untitled", max_length=200)


class SummaryAccepted(BaseModel):
    id: str
    status: str
    trace_id: Optional[str]


@app.post("/summaries", status_code=202)
def create_summary(
    body: SummaryRequest, authorization: Optional[str] = Header(default=None)
) -> SummaryAccepted:
    summary_id = uuid.uuid4().hex
    store.create(summary_id, user_id=user_from(authorization), title=body.title)
    summarise_document.delay(summary_id, body.text)
    return SummaryAccepted(
        id=summary_id, status="queued", trace_id=get_client().get_current_trace_id()
    )


@app.get("/summaries/{summary_id}")
def read_summary(summary_id: str) -> dict[str, Any]:
    summary = store.get(summary_id)
    if summary is None:
        raise HTTPException(status_code=404, detail=f"no summary {summary_id}")
    return summary


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}
