"""``proj/celery.py`` as in Celery's "First steps with Django", plus one line: install."""

from __future__ import annotations

import os

from celery import Celery

from celery_langfuse import install

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.support.django_site.settings")

app = Celery("django_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
install(app)
