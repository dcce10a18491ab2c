"""The work: summarise a document chunk by chunk (fan-out), combine, store (a chain).

summaries.summarise_document          one run per POST /summaries
  └─ chord(                           fan-out: one task per chunk, in parallel
       summaries.summarise_chunk x N  each records a "summarise chunk" generation
     ) → summaries.combine_summaries  the chord callback, chained with
         → summaries.store_summary
"""

from __future__ import annotations

from typing import Any

from celery import chord, group

from . import llm, settings, store
from .celery_app import app


@app.task(name="summaries.summarise_document")
def summarise_document(summary_id: str, text: str) -> dict[str, Any]:
    chunks = split(text, settings.CHUNK_WORDS)
    store.update(summary_id, status="summarising", chunks=len(chunks))
    chord(
        group(summarise_chunk.s(chunk) for chunk in chunks),
        combine_summaries.s() | store_summary.s(summary_id),
    ).apply_async()
    return {"summary_id": summary_id, "chunks": len(chunks)}


@app.task(
    name="summaries.summarise_chunk",
    bind=True,
    autoretry_for=(llm.ModelOverloaded,),
    max_retries=3,
    default_retry_delay=0.5,
)
def summarise_chunk(self: Any, chunk: str) -> str:
    return llm.summarise(chunk, attempt=self.request.retries)


@app.task(name="summaries.combine_summaries")
def combine_summaries(parts: list[str]) -> str:
    return " ".join(parts)


@app.task(name="summaries.store_summary")
def store_summary(summary: str, summary_id: str) -> str:
    store.update(summary_id, status="done", summary=summary)
    return summary_id


@app.task(name="maintenance.purge_stale_summaries")
def purge_stale_summaries(max_age_seconds: float) -> int:
    return store.purge_older_than(max_age_seconds)


@app.task(name="maintenance.summary_stats")
def summary_stats() -> dict[str, int]:
    return store.count_by_status()


def split(text: str, words_per_chunk: int) -> list[str]:
    words = text.split()
    return [
        " ".join(words[start : start + words_per_chunk])
        for start in range(0, len(words), words_per_chunk)
    ] or [""]
