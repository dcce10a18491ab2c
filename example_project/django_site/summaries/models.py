from __future__ import annotations

from django.db import models


class Summary(models.Model):
    id = models.CharField(max_length=32, primary_key=True)
    user_id = models.CharField(max_length=150, null=True)
    title = models.CharField(max_length=200)
    status = models.CharField(max_length=20, default="queued")
    chunks = models.IntegerField(null=True)
    summary = models.TextField(null=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        app_label = "summaries"
        db_table = "summaries"  # the FastAPI example's table name: its demo checks read it
