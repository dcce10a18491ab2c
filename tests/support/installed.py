"""The support apps that a worker subprocess installs at import, installed in the test
process only while a test uses them: publishing follows the first installed app's
settings (process-wide), so an app left installed would change other tests' traces."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from celery_langfuse import install, uninstall
from tests.conftest import require_redis


@contextmanager
def support_app(name: str) -> Iterator[ModuleType]:
    """``tests.support.<name>``, its app installed with its ``INSTALL_OPTIONS``."""
    require_redis()
    module = importlib.import_module(f"tests.support.{name}")
    install(module.app, **module.INSTALL_OPTIONS)
    try:
        yield module
    finally:
        uninstall(module.app)
