from __future__ import annotations

from django.urls import path

from .summaries import views

urlpatterns = [
    path("summaries", views.create_summary, name="create-summary"),
    path("summaries/<str:summary_id>", views.read_summary, name="summary"),
    path("health", views.health, name="health"),
]
