"""Rate-limited warnings: a tracing fault is logged, never raised, and never floods."""

from __future__ import annotations

import logging
import sys
import threading
import time

INTERVAL_SECONDS = 60.0

_last_logged: dict[str, float] = {}
_lock = threading.Lock()


def warn_rate_limited(logger: logging.Logger, key: str, message: str, *args: object) -> None:
    """Log ``message`` as a warning (with the exception being handled, if any) at most
    once per interval for each ``key``; repeats in between go to debug."""
    now = time.monotonic()
    with _lock:
        last = _last_logged.get(key)
        loud = last is None or now - last >= INTERVAL_SECONDS
        if loud:
            _last_logged[key] = now
    handling = sys.exc_info()[0] is not None
    logger.log(logging.WARNING if loud else logging.DEBUG, message, *args, exc_info=handling)
