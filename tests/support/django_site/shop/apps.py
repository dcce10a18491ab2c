from __future__ import annotations

from django.apps import AppConfig


class ShopConfig(AppConfig):
    name = "tests.support.django_site.shop"
    label = "shop"

    def ready(self) -> None:
        from . import signals  # noqa: F401  (connects the post_save handler)
