"""Test-only middlewares: a broken authentication backend, and a transaction that
outlives the request's span."""

from __future__ import annotations

from typing import Any, Callable

from django.db import transaction
from django.http import HttpRequest


class _ExplodingUser:
    """A ``request.user`` whose every attribute raises, as a broken auth backend's."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"auth backend down (reading {name})")


class BrokenUserMiddleware:
    """With header ``X-Break-User: 1``, replaces ``request.user`` with one that raises."""

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> Any:
        if request.headers.get("X-Break-User") == "1":
            request.user = _ExplodingUser()  # type: ignore[assignment]
        return self.get_response(request)


class OuterAtomicMiddleware:
    """Placed before LangfuseMiddleware: the request runs in a transaction that
    commits only after LangfuseMiddleware has ended the request's observation, so
    ``on_commit`` callbacks run after the request span ended."""

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> Any:
        with transaction.atomic():
            return self.get_response(request)
