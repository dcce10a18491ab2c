"""The Django middleware's settings: ``CELERY_LANGFUSE_DJANGO`` in settings.py.

One dict, read when Django loads the middleware (at start-up for WSGI/ASGI handlers);
a wrong key or value raises :class:`~celery_langfuse.config.ConfigurationError` then,
naming the key, the value and what is allowed::

    CELERY_LANGFUSE_DJANGO = {
        "user_id": "pk",              # attribute of request.user, a callable, or None
        "session_id": True,           # True, False, or a callable taking the request
        "exclude_paths": ["/healthz", "/static/*"],
        "trust_secret": os.environ["LANGFUSE_TRUST_SECRET"],  # trusted callers only
    }

Keys other than ``user_id`` and ``session_id`` are the options of the other web
middlewares (:class:`celery_langfuse.web.WebTracingConfig`) and are handed to it as
they are, so the one shared request core validates them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from ..config import ConfigurationError
from ..web import DEFAULT_EXCLUDED_PATHS, WebTracingConfig

SETTING = "CELERY_LANGFUSE_DJANGO"

UserId = Union[str, Callable[[Any], object], None]
SessionId = Union[bool, Callable[[Any], object]]

_OWN_KEYS = ("user_id", "session_id")
#: WebTracingConfig options a Django user may set; identify is this layer's job.
_WEB_KEYS = tuple(f.name for f in dataclasses.fields(WebTracingConfig) if f.name != "identify")


@dataclass(frozen=True)
class DjangoTracingSettings:
    """What the middleware does with a request, besides what every web layer does.

    user_id:
        Which attribute of an authenticated ``request.user`` is the Langfuse user id
        (default ``"pk"``), or a callable taking the user and returning the id; None
        records no user. Anonymous users never have one.
    session_id:
        True (default): a digest of the Django session key (HMAC with SECRET_KEY; the
        key itself logs a user in, so it never leaves the process). False: none. A
        callable taking the request and returning the id: yours.
    web:
        The shared request core's settings (excluded paths, trusting incoming headers).
    """

    user_id: UserId = "pk"
    session_id: SessionId = True
    web: WebTracingConfig = dataclasses.field(default_factory=WebTracingConfig)

    @classmethod
    def from_django(cls, identify: Callable[..., Any]) -> DjangoTracingSettings:
        """Read ``settings.CELERY_LANGFUSE_DJANGO``; ``identify`` goes to the web core."""
        from django.conf import settings

        given = getattr(settings, SETTING, None)
        if given is None:
            given = {}
        if not isinstance(given, Mapping):
            raise ConfigurationError(
                f"celery-langfuse setting {SETTING}={given!r}: must be a dict with keys "
                f"{', '.join(_OWN_KEYS + _WEB_KEYS)}"
            )
        unknown = sorted(set(given) - set(_OWN_KEYS + _WEB_KEYS), key=str)
        if unknown:
            raise ConfigurationError(
                f"celery-langfuse setting {SETTING} has unknown key(s) "
                f"{', '.join(map(repr, unknown))}; allowed: {', '.join(_OWN_KEYS + _WEB_KEYS)}"
            )
        user_id = given.get("user_id", "pk")
        if not (user_id is None or callable(user_id) or (isinstance(user_id, str) and user_id)):
            raise ConfigurationError(
                f"celery-langfuse setting {SETTING}['user_id']={user_id!r}: must be the name "
                "of an attribute of request.user, a callable taking the user, or None"
            )
        session_id = given.get("session_id", True)
        if not (isinstance(session_id, bool) or callable(session_id)):
            raise ConfigurationError(
                f"celery-langfuse setting {SETTING}['session_id']={session_id!r}: must be "
                "true, false, or a callable taking the request"
            )
        web_options = {key: given[key] for key in _WEB_KEYS if key in given}
        web_options.setdefault("exclude_paths", default_excluded_paths(settings))
        return cls(user_id, session_id, WebTracingConfig(identify=identify, **web_options))


def default_excluded_paths(settings: Any) -> frozenset[str]:
    """Health checks, and the static and media files Django (or a helper) serves."""
    paths = set(DEFAULT_EXCLUDED_PATHS)
    for name in ("STATIC_URL", "MEDIA_URL"):
        url = _url_path(getattr(settings, name, None))
        if url:
            paths.add(url.rstrip("/") + "/*")
    return frozenset(paths)


def _url_path(url: Optional[str]) -> Optional[str]:
    """The path of a ``STATIC_URL``-like setting served by this site, if it is one."""
    if not isinstance(url, str) or not url or "://" in url or url.startswith("//"):
        return None  # unset, or served from another host (a CDN)
    path = "/" + url.lstrip("/")
    return path if path != "/" else None
