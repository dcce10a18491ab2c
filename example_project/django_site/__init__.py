"""The example project as a Django site: same summarise tasks, Django's way.

``proj/__init__.py`` of Celery's Django guide: the Celery app loads with Django, so
``delay_on_commit`` in a view uses it. Run the whole thing with
``python -m example_project.django_demo`` (docs/django.md).
"""

from .celery import app as celery_app

__all__ = ["celery_app"]
