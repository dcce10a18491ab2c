"""Pytest fixtures that point the Langfuse SDK at a :class:`~celery_langfuse.testing.CaptureServer`.

Registered as the ``celery_langfuse`` pytest plugin, so installing the package makes
the fixtures available:

- ``langfuse_capture`` (session): one capture server for the whole run. It sets the
  ``LANGFUSE_*`` variables of ``server.env`` in ``os.environ`` for the session, so
  ``langfuse.get_client()`` and every subprocess started with ``os.environ`` export
  to it. Session scope is forced by the SDK: ``get_client()`` builds one client per
  process from the environment on first use and installs the global OTel tracer
  provider once, so a client cannot be re-pointed at a second server later. For the
  same reason the fixture must run before anything creates a Langfuse client; it
  fails with an explanation when a client already exports elsewhere.
- ``langfuse_capture_clean`` (function): the same server, emptied for the test. It
  flushes spans still buffered from earlier tests first (the SDK's and
  celery-langfuse's own), and restores normal responses (undoing ``set_response``)
  before and after the test.

This module is imported by every pytest run in an environment where the package is
installed, so it imports nothing heavy until a fixture is used.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from celery_langfuse.testing import CaptureServer


@pytest.fixture(scope="session")
def langfuse_capture() -> Iterator[CaptureServer]:
    """A capture server that the Langfuse SDK of this session exports to."""
    from celery_langfuse.testing import CaptureServer

    with CaptureServer() as server, pytest.MonkeyPatch.context() as patch:
        elsewhere = [
            client.base_url for client in _langfuse_clients() if client.base_url != server.base_url
        ]
        if elsewhere:
            pytest.fail(
                f"a Langfuse client exporting to {elsewhere} exists before the "
                "langfuse_capture fixture ran; the SDK keeps one client per process, "
                "so it cannot be pointed at the capture server. Request langfuse_capture "
                "before code that calls langfuse.get_client() or Langfuse().",
                pytrace=False,
            )
        for name, value in server.env.items():
            patch.setenv(name, value)
        yield server


@pytest.fixture
def langfuse_capture_clean(langfuse_capture: CaptureServer) -> Iterator[CaptureServer]:
    """The session's capture server with nothing captured and normal responses."""
    langfuse_capture.set_response()
    for client in _langfuse_clients():
        client.flush()
    tracing_client = sys.modules.get("celery_langfuse.client")
    if tracing_client is not None:  # observations sent without the SDK (lean spans)
        tracing_client.flush(10)
    langfuse_capture.clear()
    yield langfuse_capture
    langfuse_capture.set_response()


def _langfuse_clients() -> list[Any]:
    """The Langfuse clients (resource managers) alive in this process.

    The SDK has no public way to ask whether, or where to, a client exists without
    creating one; this reads its private registry. Kept in this one function, and
    covered by a test, so an SDK change breaks loudly here.
    """
    if "langfuse" not in sys.modules:  # nothing imported langfuse: no client exists
        return []
    from langfuse._client.resource_manager import LangfuseResourceManager

    with LangfuseResourceManager._lock:
        return list(LangfuseResourceManager._instances.values())
