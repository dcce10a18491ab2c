"""Settings of the tests' Django project: PostgreSQL, sessions, auth, the middleware,
django-celery-beat and django-celery-results, and celery-langfuse settings that
override the ``production`` preset.

The database, broker and queue come from the environment, so the test process and
the ``celery worker`` / ``celery beat`` subprocesses it starts agree.
"""

from __future__ import annotations

import os

SECRET_KEY = "celery-langfuse-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "tests.support.django_site.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGGING_CONFIG = None  # leave the test runner's logging as it is
STATIC_URL = "static/"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django_celery_beat",
    "django_celery_results",
    "tests.support.django_site.shop",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "tests.support.django_site.shop.middleware.BrokenUserMiddleware",
    "celery_langfuse.django.LangfuseMiddleware",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": "127.0.0.1",
        "PORT": "5432",
        "NAME": os.environ.get("CELERY_LANGFUSE_TEST_DJANGO_DB", "celery_langfuse_django"),
        "USER": os.environ.get("CELERY_LANGFUSE_TEST_DJANGO_DB", "celery_langfuse_django"),
        "PASSWORD": "celery-langfuse-tests",
    }
}

# Celery, read by proj/celery.py with namespace="CELERY".
CELERY_BROKER_URL = os.environ.get("CELERY_LANGFUSE_TEST_BROKER", "redis://127.0.0.1:6379/1")
CELERY_RESULT_BACKEND = "django-db"
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_LANGFUSE_TEST_QUEUE", "celery-langfuse-django")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"

# celery-langfuse, read by install(app) through the app's configuration: the
# production preset, with every new trace kept and failures recorded.
CELERY_LANGFUSE_PRESET = "production"
CELERY_LANGFUSE_SAMPLE_RATE = 1.0
CELERY_LANGFUSE_REDACT_KEYS = ["card_number"]

# The Django middleware's own settings.
CELERY_LANGFUSE_DJANGO = {
    "user_id": "username",
    "exclude_paths": ["/healthz", "/static/*"],
}
