"""Bearer-token authentication, stateless, as an API's would be.

A real app verifies a token here; this one trusts ``Authorization: Bearer <name>`` and
sets ``request.user`` to that Django user (created on first sight by Django's
``RemoteUserBackend``), so the trace gets a real ``request.user``. It works in both of
Django's modes, so under ASGI the whole chain stays async.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.contrib import auth
from django.contrib.auth.backends import RemoteUserBackend
from django.http import HttpRequest


class BearerTokenBackend(RemoteUserBackend):
    """Creates the user named by the token the first time it is seen."""


class BearerTokenMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        name = _bearer(request)
        if name:
            user = auth.authenticate(request, remote_user=name)
            if user is not None:
                request.user = user
        return self.get_response(request)

    async def __acall__(self, request: HttpRequest) -> Any:
        name = _bearer(request)
        if name:
            user = await auth.aauthenticate(request, remote_user=name)
            if user is not None:
                request.user = user
        return await self.get_response(request)


def _bearer(request: HttpRequest) -> Optional[str]:
    header = request.headers.get("Authorization", "")
    token = header.removeprefix("Bearer ").strip()
    return token or None
