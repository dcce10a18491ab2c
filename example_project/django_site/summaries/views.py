"""``POST /summaries`` saves a summary and enqueues the work when that commits;
``GET /summaries/<id>`` reads it. Each request is a Langfuse trace (the middleware);
the tasks join it, with the logged-in user and the session on every observation."""

from __future__ import annotations

import json
import uuid

from django.db import transaction
from django.forms.models import model_to_dict
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST
from langfuse import get_client

from .models import Summary
from .tasks import summarise_document


@csrf_exempt  # a JSON API authenticated by bearer token, not a cookie form
@require_POST
def create_summary(request: HttpRequest) -> HttpResponse:
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        return JsonResponse({"detail": "body must be JSON"}, status=400)
    text = str(body.get("text") or "")
    if not text:
        return JsonResponse({"detail": "text must not be empty"}, status=422)
    summary_id = uuid.uuid4().hex
    with transaction.atomic():
        Summary.objects.create(
            id=summary_id,
            user_id=request.user.get_username() if request.user.is_authenticated else None,
            title=str(body.get("title") or "untitled")[:200],
        )
        # Sent once the row is committed, so the worker always finds it; still in
        # this request's trace.
        summarise_document.delay_on_commit(summary_id, text)
    return JsonResponse(
        {"id": summary_id, "status": "queued", "trace_id": get_client().get_current_trace_id()},
        status=202,
    )


@require_GET
def read_summary(request: HttpRequest, summary_id: str) -> HttpResponse:
    summary = Summary.objects.filter(id=summary_id).first()
    if summary is None:
        return JsonResponse({"detail": f"no summary {summary_id}"}, status=404)
    return JsonResponse(model_to_dict(summary))


def health(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"status": "ok"})
