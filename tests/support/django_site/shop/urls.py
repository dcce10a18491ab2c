"""Included under a regex prefix, with a nested namespaced include."""

from __future__ import annotations

from django.urls import include, path

from . import views

item_patterns = [path("<slug:slug>/", views.item, name="detail")]

urlpatterns = [
    path("items/", include((item_patterns, "items"), namespace="items")),
]
