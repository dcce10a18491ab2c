"""A real Django project for the tests: ``proj`` in Celery's Django layout.

Its Celery app is imported here, as Celery's Django guide does in ``proj/__init__.py``,
so importing the settings imports the app and runs ``install(app)``, which reads
``CELERY_LANGFUSE_*`` from these very settings (tests/test_django_settings.py).
"""

from .celery import app as celery_app

__all__ = ["celery_app"]
