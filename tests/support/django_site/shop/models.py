from __future__ import annotations

from django.db import models


class Order(models.Model):
    reference = models.CharField(max_length=100, unique=True)
    quantity = models.IntegerField(default=1)
    # Saving an order with notify=True publishes a task from a post_save handler.
    notify = models.BooleanField(default=False)

    class Meta:
        app_label = "shop"
