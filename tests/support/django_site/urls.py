"""Routes of every shape the trace names must handle: path converters, regexes,
includes with and without namespaces, nested includes."""

from __future__ import annotations

from django.urls import include, path, re_path

from .shop import views

api_patterns = [
    path("orders/<int:pk>/", views.order_detail, name="order-detail"),
    re_path(r"^legacy/(?P<code>[A-Z]{3})-(\d+)/$", views.legacy, name="legacy"),
]

urlpatterns = [
    path("orders/<int:pk>/", views.order_detail, name="order-detail"),
    path("orders/<int:pk>/buy/", views.buy, name="buy"),
    path("async-orders/<int:pk>/", views.async_order, name="async-order"),
    re_path(r"^articles/(?P<year>[0-9]{4})/$", views.article, name="article"),
    path("api/v1/", include((api_patterns, "api"), namespace="v1")),
    re_path(r"^shop/", include("tests.support.django_site.shop.urls")),
    path("boom/", views.boom, name="boom"),
    path("forbidden/", views.forbidden, name="forbidden"),
    path("healthz", views.health, name="health"),
    path("", views.home, name="home"),
]
