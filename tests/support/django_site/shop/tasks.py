"""Tasks of the tests' Django project, found by ``app.autodiscover_tasks()``."""

from __future__ import annotations

from celery import shared_task


@shared_task(name="shop.record")
def record(reference: str, how: str) -> str:
    return f"{how}:{reference}"


@shared_task(name="shop.notify")
def notify(reference: str) -> str:
    return f"notified:{reference}"


@shared_task(name="shop.tick")
def tick(label: str) -> str:
    return f"tick:{label}"
