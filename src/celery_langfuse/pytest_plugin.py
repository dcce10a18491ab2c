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
  fails with an explanation when a client already exports elsewhere. Apps whose
  ``install(app)`` ran before it set the keys (a test module importing the app at
  collection) are installed again, so they trace. It binds ``langfuse_capture_host``
  (session, ``127.0.0.1``; ``0.0.0.0`` for a container to reach it).
- ``langfuse_capture_clean`` (function): the same server, emptied for the test. It
  flushes spans still buffered from earlier tests first (the SDK's and
  celery-langfuse's own), and restores normal responses (undoing ``set_response``)
  before and after the test.
- ``langfuse_worker`` (function): the app of ``langfuse_celery_app`` (which the user
  defines) served by a worker in a thread, tracing; named apart from the
  ``celery_worker`` of ``celery.contrib.pytest`` and of pytest-celery (a container
  there), so it works beside either.
- ``langfuse_oracle`` (session): the :class:`~celery_langfuse.testing.LangfuseOracle`
  of the comparison below; skips the test when the comparison is off.

The Langfuse comparison (``--langfuse-oracle``, ini ``langfuse_oracle``): after every
test, each OTLP body the session's capture server received during it goes through
Langfuse's own server-side conversion (:class:`~celery_langfuse.testing.LangfuseOracle`,
one Node process for the session) and is compared with what the capture server
rebuilt (:func:`~celery_langfuse.testing.compare_with_langfuse`); a difference, or a
body Langfuse would reject, fails the test at teardown with the diff. Modes: ``auto``
(the default: on when the oracle is found, else skipped, said in one summary line),
``require`` (a missing oracle or node is a usage error), ``ci`` (``require`` when
``CI=true``, else ``auto``), ``off``.

This module is imported by every pytest run in an environment where the package is
installed, so it imports nothing heavy until a fixture is used, except that looking
for the oracle (every mode but ``off``) imports ``celery_langfuse.testing``.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import pytest

if TYPE_CHECKING:
    from celery_langfuse.testing import CaptureServer, LangfuseComparison, LangfuseOracle

_MODES = ("auto", "require", "ci", "off")


@dataclass
class _OracleCheck:
    """The session's Langfuse comparison: the oracle (None when off) and its tally."""

    oracle: Optional[LangfuseOracle] = None
    why_off: str = ""
    bodies: int = 0
    observations: int = 0
    traces: int = 0
    rejected: int = 0
    differences: Counter[str] = field(default_factory=Counter)
    #: Whether the session's capture server ran (the summary speaks only then).
    capture_used: bool = False
    #: Reports of comparisons that failed during the test (at ``clear()``), for its teardown.
    failures: list[str] = field(default_factory=list)

    def add(self, comparison: LangfuseComparison) -> None:
        self.bodies += comparison.bodies
        self.observations += comparison.observations
        self.traces += comparison.traces
        self.rejected += len(comparison.rejected)
        self.differences.update(difference.field for difference in comparison.differences)


_ORACLE_CHECK = pytest.StashKey[_OracleCheck]()
_SESSION_SERVER = pytest.StashKey["CaptureServer"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("celery-langfuse")
    group.addoption(
        "--langfuse-oracle",
        choices=_MODES,
        default=None,
        help="compare the capture server with Langfuse's own conversion after each test: "
        "auto (when the oracle is found), require, ci (require when CI=true), off",
    )
    parser.addini(
        "langfuse_oracle", "default for --langfuse-oracle (auto, require, ci, off)", default="auto"
    )


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    mode = config.getoption("langfuse_oracle", None) or config.getini("langfuse_oracle")
    if mode not in _MODES:
        raise pytest.UsageError(f"langfuse_oracle = {mode!r}; allowed: {', '.join(_MODES)}")
    if mode == "ci":
        mode = "require" if os.environ.get("CI", "").lower() == "true" else "auto"
    check = _OracleCheck(why_off="off (--langfuse-oracle=off)")
    config.stash[_ORACLE_CHECK] = check
    if mode == "off":
        return
    from celery_langfuse.testing import LangfuseOracle, OracleUnavailable, find_langfuse_oracle

    try:
        check.oracle = LangfuseOracle(find_langfuse_oracle(config.rootpath))
    except OracleUnavailable as error:
        if mode == "require":
            raise pytest.UsageError(f"celery-langfuse: langfuse_oracle=require: {error}") from None
        check.why_off = f"skipped: {error}"


def pytest_report_header(config: pytest.Config) -> Optional[str]:
    check = config.stash.get(_ORACLE_CHECK, None)
    if check is None or check.oracle is None:
        return None  # said once, in the summary, if the capture server was used
    return (
        f"langfuse oracle: {check.oracle.script} (Langfuse {check.oracle.commit}); "
        "the capture server is compared with it after every test"
    )


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    check = config.stash.get(_ORACLE_CHECK, None)
    if check is None or not check.capture_used:
        return
    if check.oracle is None:
        terminalreporter.write_line(f"langfuse oracle: {check.why_off}")
        return
    by_field = ", ".join(f"{name}: {count}" for name, count in check.differences.most_common())
    terminalreporter.write_line(
        f"langfuse oracle: compared {check.bodies} OTLP bodies, {check.observations} "
        f"observations, {check.traces} traces; {check.rejected} rejected, "
        f"{sum(check.differences.values())} differences" + (f" ({by_field})" if by_field else "")
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    check = config.stash.get(_ORACLE_CHECK, None)
    if check is not None and check.oracle is not None:
        check.oracle.close()


@pytest.fixture(autouse=True)
def _langfuse_oracle_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the test: what the capture server received during it, checked against
    Langfuse's own conversion (a no-op when the comparison is off)."""
    yield
    _compare_received(request.config)


def _compare_received(config: pytest.Config) -> None:
    """Compare what arrived since the last comparison; fail with every failed one."""
    check = config.stash.get(_ORACLE_CHECK, None)
    server = config.stash.get(_SESSION_SERVER, None)
    if check is None or check.oracle is None or server is None:
        return
    _flush_everything()
    _compare(check, server.take_bodies())
    failures, check.failures = check.failures, []
    if failures:
        pytest.fail(
            "the capture server does not show what Langfuse shows for what this test "
            f"sent (Langfuse {check.oracle.commit}):\n" + "\n".join(failures),
            pytrace=False,
        )


def _compare(check: _OracleCheck, bodies: list[bytes]) -> None:
    if check.oracle is None or not bodies:
        return
    from celery_langfuse.testing import compare_with_langfuse

    comparison = compare_with_langfuse(bodies, check.oracle)
    check.add(comparison)
    if not comparison.ok:
        check.failures.append(comparison.report())


@pytest.fixture(scope="session")
def langfuse_oracle(pytestconfig: pytest.Config) -> LangfuseOracle:
    """The session's :class:`~celery_langfuse.testing.LangfuseOracle`; the test is
    skipped, saying why, when the comparison is off."""
    check = pytestconfig.stash.get(_ORACLE_CHECK, None)
    if check is None or check.oracle is None:
        pytest.skip(f"langfuse oracle: {check.why_off if check else 'off'}")
    return check.oracle


@pytest.fixture(scope="session")
def langfuse_capture_host() -> str:
    """The address ``langfuse_capture`` binds: override with ``"0.0.0.0"`` when a
    container (pytest-celery's worker) must reach it."""
    return "127.0.0.1"


@pytest.fixture(scope="session")
def langfuse_capture(
    pytestconfig: pytest.Config, langfuse_capture_host: str
) -> Iterator[CaptureServer]:
    """A capture server that the Langfuse SDK of this session exports to."""
    from celery_langfuse.testing import CaptureServer

    with CaptureServer(host=langfuse_capture_host) as server, pytest.MonkeyPatch.context() as patch:
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
        _install_again_with_keys()
        check = pytestconfig.stash.get(_ORACLE_CHECK, None)
        if check is not None:
            check.capture_used = True
        if check is not None and check.oracle is not None:
            # a test that empties the server has what it received compared first
            server.on_clear(lambda bodies: _compare(check, bodies))
        pytestconfig.stash[_SESSION_SERVER] = server
        try:
            yield server
            _compare_received(pytestconfig)  # what arrived after the last test
        finally:
            server.on_clear(None)
            del pytestconfig.stash[_SESSION_SERVER]


@pytest.fixture
def langfuse_capture_clean(langfuse_capture: CaptureServer) -> Iterator[CaptureServer]:
    """The session's capture server with nothing captured and normal responses."""
    langfuse_capture.set_response()
    _flush_everything()
    langfuse_capture.clear()
    yield langfuse_capture
    langfuse_capture.set_response()


@pytest.fixture
def langfuse_celery_app() -> Any:
    """The Celery app ``langfuse_worker`` serves: override it in your conftest.py."""
    pytest.fail(
        "langfuse_worker needs your Celery app: add to conftest.py\n\n"
        "    @pytest.fixture\n"
        "    def langfuse_celery_app():\n"
        "        from myapp.celery import app\n"
        "        return app\n",
        pytrace=False,
    )


@pytest.fixture
def langfuse_worker(langfuse_capture: CaptureServer, langfuse_celery_app: Any) -> Iterator[Any]:
    """Your app (``langfuse_celery_app``) served by a worker in a thread of this process
    (solo pool), tracing to the capture server; stopped after the test.

    Independent of ``celery.contrib.pytest``'s ``celery_worker`` and of pytest-celery's
    (which starts a container), so it works with either plugin enabled or neither.
    """
    from celery.contrib.testing.worker import start_worker

    from celery_langfuse._install import installation_for

    app = langfuse_celery_app
    installation = installation_for(app)
    if installation is None:
        pytest.fail(
            f"celery_langfuse.install(app) was never called for the Celery app {app.main!r}; "
            "call it where the app is created (myapp/celery.py), so workers trace too",
            pytrace=False,
        )
    if not installation.enabled:
        pytest.fail(f"tracing is off for {app.main!r}: {installation.off_reason}", pytrace=False)
    with start_worker(
        app, pool="solo", perform_ping_check=False, shutdown_timeout=10, loglevel="WARNING"
    ) as worker:
        yield worker


def _install_again_with_keys() -> None:
    """Install again every app whose ``install(app)`` left tracing off.

    A test module that imports the user's app at collection runs ``install(app)``
    before ``langfuse_capture`` has set the keys, so tracing turned itself off; with the
    keys now set, the same options give a tracing installation. An app off for any
    other reason (``enabled=False``) stays off.
    """
    installing = sys.modules.get("celery_langfuse._install")
    if installing is None:  # nothing was installed yet
        return
    from celery_langfuse.config import SETTING_NAMES

    with installing._lock:
        off = [i for i in installing._installations.values() if not i.enabled]
    for installation in off:
        config = installation.config
        options = {
            name: getattr(config, name)
            for name in SETTING_NAMES
            if config.source_of(name) == "install()"
        }
        installing.uninstall(installation.app)
        installing.install(installation.app, **options)


def _flush_everything() -> None:
    """Send what this process still buffers: the SDK's spans and this library's own."""
    for client in _langfuse_clients():
        client.flush()
    tracing_client = sys.modules.get("celery_langfuse.client")
    if tracing_client is not None:  # observations sent without the SDK (lean spans)
        tracing_client.flush(10)


def _langfuse_clients() -> list[Any]:
    """The Langfuse clients (resource managers) alive in this process: the SDK's private
    registry, read in one place (``client.sdk_resource_managers``)."""
    if "langfuse" not in sys.modules:  # nothing imported langfuse: no client exists
        return []
    from celery_langfuse.client import sdk_resource_managers

    return sdk_resource_managers()
