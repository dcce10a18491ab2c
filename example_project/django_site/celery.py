"""``proj/celery.py``: Celery's Django layout, plus one line: ``install(app)``."""

from __future__ import annotations

import os

from celery import Celery

from celery_langfuse import install

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.django_site.settings")

app = Celery("django_site")
# Every CELERY_* Django setting configures Celery, CELERY_LANGFUSE_* configures tracing.
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
install(app)  # after config_from_object: it reads CELERY_LANGFUSE_* from settings.py
