"""The Celery app: broker from the environment, tracing with one line, two beat entries."""

from __future__ import annotations

from pathlib import Path

from celery import Celery

from celery_langfuse import install

from . import settings

app = Celery("example_project", broker=settings.BROKER_URL, backend=settings.RESULT_BACKEND)
app.conf.update(
    include=["example_project.tasks"],
    task_default_queue=settings.QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    beat_schedule={
        "purge-stale-summaries": {
            "task": "maintenance.purge_stale_summaries",
            "schedule": settings.BEAT_INTERVAL,
            "args": (settings.RETENTION_SECONDS,),
        },
        "summary-stats": {
            "task": "maintenance.summary_stats",
            "schedule": settings.BEAT_INTERVAL * 2,
        },
    },
)
if settings.BROKER_URL.startswith("filesystem"):
    # One folder that every process reads and writes: a broker without a server.
    folder = Path(settings.BROKER_FOLDER)
    for name in ("queue", "processed", "control", "results"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    app.conf.broker_transport_options = {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),
    }

# Every task published or run by this app becomes part of a Langfuse trace.
install(app)
