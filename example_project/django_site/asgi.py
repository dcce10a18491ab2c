"""ASGI entry point: ``uvicorn example_project.django_site.asgi:application``."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.django_site.settings")

application = get_asgi_application()
