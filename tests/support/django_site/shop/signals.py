"""A post_save handler that publishes on commit, as Django projects commonly do."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models.signals import post_save
from django.dispatch import receiver

from .models import Order


@receiver(post_save, sender=Order)
def notify_on_commit(sender: Any, instance: Order, created: bool, **_: Any) -> None:
    if instance.notify:
        from .tasks import notify

        transaction.on_commit(lambda: notify.delay(instance.reference))
