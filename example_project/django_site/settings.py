"""Settings of the Django example: SQLite, a bearer-token login, the middleware, Celery
and celery-langfuse settings, schedules in the database (django-celery-beat) and
results in it too (django-celery-results).

The broker and the database file come from the environment, as in the FastAPI
example (``python -m example_project.django_demo`` sets them).
"""

from __future__ import annotations

import os
from pathlib import Path

from example_project.django_site.identity import session_from_header

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
ROOT_URLCONF = "example_project.django_site.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django_celery_beat",
    "django_celery_results",
    "example_project.django_site.summaries",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "example_project.django_site.auth.BearerTokenMiddleware",
    # After authentication: the trace gets request.user.
    "celery_langfuse.django.LangfuseMiddleware",
]
AUTHENTICATION_BACKENDS = ["example_project.django_site.auth.BearerTokenBackend"]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("SUMMARIES_DATABASE", str(Path.cwd() / "summaries.sqlite3")),
        # The web server, the worker's processes and beat all write to it.
        "OPTIONS": {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL;",
        },
    }
}

# -- Celery (namespace="CELERY" in celery.py) ----------------------------------------
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_RESULT_BACKEND = "django-db"
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_QUEUE", "summaries")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
if CELERY_BROKER_URL.startswith("filesystem"):
    # One folder every process reads and writes: a broker without a server.
    _folder = Path(os.environ["CELERY_BROKER_FOLDER"])
    for _name in ("queue", "processed", "control"):
        (_folder / _name).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_folder / "queue"),
        "data_folder_out": str(_folder / "queue"),
        "processed_folder": str(_folder / "processed"),
        "control_folder": str(_folder / "control"),
    }

# -- celery-langfuse -------------------------------------------------------------------
# Any install() option, as CELERY_LANGFUSE_<OPTION>; the environment still wins.
CELERY_LANGFUSE_PRESET = "development"
CELERY_LANGFUSE_REDACT_KEYS = ["card_number"]
# The Django middleware.
CELERY_LANGFUSE_DJANGO = {
    "user_id": "username",
    "session_id": session_from_header,
    "exclude_paths": ["/health", "/static/*"],
}
