"""The work, as in the FastAPI example (example_project/tasks.py), on the Django app:
summarise a document chunk by chunk (a chord), combine, store; two maintenance tasks
that django-celery-beat runs. The model call is the example's own ``llm.summarise``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery import chord, group, shared_task
from django.db.models import Count
from django.utils import timezone

from example_project import llm, settings

from .models import Summary


@shared_task(name="summaries.summarise_document")
def summarise_document(summary_id: str, text: str) -> dict[str, Any]:
    chunks = split(text, settings.CHUNK_WORDS)
    Summary.objects.filter(id=summary_id).update(status="summarising", chunks=len(chunks))
    chord(
        group(summarise_chunk.s(chunk) for chunk in chunks),
        combine_summaries.s() | store_summary.s(summary_id),
    ).apply_async()
    return {"summary_id": summary_id, "chunks": len(chunks)}


@shared_task(
    name="summaries.summarise_chunk",
    bind=True,
    autoretry_for=(llm.ModelOverloaded,),
    max_retries=3,
    default_retry_delay=0.5,
)
def summarise_chunk(self: Any, chunk: str) -> str:
    return llm.summarise(chunk, attempt=self.request.retries)


@shared_task(name="summaries.combine_summaries")
def combine_summaries(parts: list[str]) -> str:
    return " ".join(parts)


@shared_task(name="summaries.store_summary")
def store_summary(summary: str, summary_id: str) -> str:
    Summary.objects.filter(id=summary_id).update(status="done", summary=summary)
    return summary_id


@shared_task(name="maintenance.purge_stale_summaries")
def purge_stale_summaries(max_age_seconds: float) -> int:
    cutoff = timezone.now() - timedelta(seconds=max_age_seconds)
    deleted, _ = Summary.objects.filter(status="done", updated_at__lt=cutoff).delete()
    return deleted


@shared_task(name="maintenance.summary_stats")
def summary_stats() -> dict[str, int]:
    rows = Summary.objects.values("status").annotate(n=Count("id"))
    return {row["status"]: row["n"] for row in rows}


def split(text: str, words_per_chunk: int) -> list[str]:
    words = text.split()
    return [
        " ".join(words[start : start + words_per_chunk])
        for start in range(0, len(words), words_per_chunk)
    ] or [""]
