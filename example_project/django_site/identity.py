"""Who is calling: read by the middleware setting in settings.py (no model imports here,
settings.py imports it before Django's apps are loaded)."""

from __future__ import annotations

from typing import Any, Optional


def session_from_header(request: Any) -> Optional[str]:
    """The Langfuse session id: the client's ``X-Session-Id`` (a chat or upload session
    in a real app), not Django's login session."""
    value = request.headers.get("X-Session-Id")
    return str(value) if value else None
