"""The ``celery-langfuse`` command line. Subcommands:

- ``doctor -A proj.celery``: load the app the way ``celery -A`` does and report what
  tracing would do in this environment: each effective setting and where it came
  from (secrets masked), the signal handlers connected, and whether Langfuse answers
  and accepts the keys. Exits 0 when nothing is wrong, 1 otherwise.
- ``forward --url redis://...`` (or ``amqp://...``): send the spans that workers in durable mode
  queued in Redis to Langfuse (see docs/reliability.md). Langfuse's address and keys
  come from the variables the SDK reads, so secrets never appear in a process list.

A subcommand is one ``_add_<name>(subparsers)`` function that registers its parser
and sets ``run``; ``main`` dispatches to it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional
from urllib.parse import urlsplit, urlunsplit

from . import _sdk, client
from .config import ENV_PREFIX, ENV_VARIABLES, SETTING_NAMES, TracingConfig, app_settings

_SECRET_MASK = "****"
_SHOWN_SDK_VARIABLES = (
    "LANGFUSE_TRACING_ENVIRONMENT",
    "LANGFUSE_RELEASE",
    "LANGFUSE_TRACING_ENABLED",
)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``celery-langfuse`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celery-langfuse",
        description="Tools for celery-langfuse: Langfuse tracing for Celery.",
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(subcommands)
    return parser


# -- doctor ---------------------------------------------------------------------------


def _add_doctor(subcommands: Any) -> None:
    parser = subcommands.add_parser(
        "doctor",
        help="check one app's tracing setup",
        description=(
            "Load the Celery app (as `celery -A` does) and print the effective tracing "
            "settings and where each came from, the signal handlers connected, and whether "
            "Langfuse answers and accepts the keys. Exit status 1 when something is wrong."
        ),
    )
    parser.add_argument(
        "-A", "--app", required=True, help="the Celery app: module, module:attribute, or package"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds to wait for Langfuse to answer (default: %(default)s)",
    )
    parser.set_defaults(run=doctor)


class _Report:
    """Lines for the terminal, and the problems found on the way."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def section(self, title: str) -> None:
        print(f"\n{title}")

    def line(self, text: str) -> None:
        print(f"  {text}")

    def problem(self, text: str) -> None:
        self.problems.append(text)
        print(f"  PROBLEM: {text}")

    def note(self, text: str) -> None:
        print(f"  note: {text}")


def doctor(args: argparse.Namespace) -> int:
    """Print what tracing would do for ``args.app``; 0 when nothing is wrong."""
    report = _Report()
    print(f"celery-langfuse doctor: {args.app}")
    _report_sdk_version(report)
    app = _load_app(args.app, report)
    if app is None:
        return _summary(report)
    from ._install import installation_for

    installation = installation_for(app)
    report.section("Installation")
    if installation is None:
        report.problem(
            f"install(app) was not called when {args.app} was imported; settings below are "
            "what install(app) would use with no arguments"
        )
        config = TracingConfig.resolve({}, app_config=app_settings(app))
    else:
        config = installation.config
        if installation.enabled:
            report.line(f"tracing: on for app {app.main!r}")
        else:
            report.problem(f"tracing: off for app {app.main!r}: {installation.off_reason}")

    _report_settings(config, report)
    _report_sdk_environment(report)
    if installation is not None:
        _report_signals(installation, report)
    _report_server(args.timeout, report)
    return _summary(report)


def _load_app(name: str, report: _Report) -> Any:
    from celery.app.utils import find_app

    # As `celery -A`: the current directory is importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return find_app(name)
    except Exception as exc:
        report.section("App")
        report.problem(f"cannot load {name!r}: {type(exc).__name__}: {exc}")
        return None


def _report_settings(config: TracingConfig, report: _Report) -> None:
    report.section("Settings (value, then where it came from)")
    width = max(len(name) for name in SETTING_NAMES)
    for name in SETTING_NAMES:
        value = _display(name, getattr(config, name))
        report.line(f"{name:<{width}}  {value:<28}  {config.source_of(name)}")
    known = set(ENV_VARIABLES.values())
    for variable in sorted(os.environ):
        if variable.startswith(ENV_PREFIX) and variable not in known:
            report.note(f"{variable} is not a celery-langfuse setting; it is ignored")


def _report_sdk_version(report: _Report) -> None:
    """First, so that it shows even when the app cannot load (``install()`` refuses an
    unsupported SDK)."""
    report.section("Langfuse SDK version")
    sdk = _sdk.installed()
    if sdk.version is None:
        report.problem(f"not installed (supported: langfuse{_sdk.SUPPORTED_RANGE})")
    elif sdk.supported:
        report.line(f"langfuse {sdk.version}: supported (langfuse{_sdk.SUPPORTED_RANGE})")
        report.line(f"needs server: {sdk.minimum_server}")
    else:
        report.problem(
            f"langfuse {sdk.version}: not supported (supported: "
            f"langfuse{_sdk.SUPPORTED_RANGE}); install() refuses it"
        )


def _report_sdk_environment(report: _Report) -> None:
    env = os.environ
    report.section("Langfuse SDK (its own LANGFUSE_* variables)")
    if env.get("LANGFUSE_BASE_URL"):
        report.line(f"base URL     {_mask_url(env['LANGFUSE_BASE_URL'])}  LANGFUSE_BASE_URL")
    elif env.get("LANGFUSE_HOST"):
        report.line(f"base URL     {_mask_url(env['LANGFUSE_HOST'])}  LANGFUSE_HOST")
    else:
        report.line("base URL     https://cloud.langfuse.com  default")
    public, secret = env.get("LANGFUSE_PUBLIC_KEY"), env.get("LANGFUSE_SECRET_KEY")
    report.line(f"public key   {_mask_key(public, visible=4) if public else '(not set)'}")
    report.line(f"secret key   {_mask_key(secret, visible=0) if secret else '(not set)'}")
    if not (public and secret) and not client.sdk_client_exists():
        report.problem("LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY must both be set")
    if client.sdk_client_exists() and not client.created_with_settings:
        report.note(
            "a Langfuse client existed before celery-langfuse needed one: its own flush "
            "settings apply, not flush_at / flush_interval above"
        )
    for variable in _SHOWN_SDK_VARIABLES:
        if env.get(variable):
            report.line(f"{variable}={env[variable]}")
    if env.get("LANGFUSE_TRACING_ENABLED", "true").strip().lower() == "false":
        report.problem("LANGFUSE_TRACING_ENABLED=false: the SDK sends nothing")
    rate = env.get("LANGFUSE_SAMPLE_RATE")
    if rate is not None and rate.strip() not in ("", "1", "1.0"):
        report.note(
            f"LANGFUSE_SAMPLE_RATE={rate}: the SDK samples spans itself and drops failures "
            "too; prefer CELERY_LANGFUSE_SAMPLE_RATE, which keeps failed tasks"
        )


def _report_signals(installation: Any, report: _Report) -> None:
    report.section("Signal handlers")
    connected = installation.connected_signals()
    if not connected:
        report.line("none connected (tracing is off)")
    for name, ok in connected:
        if ok:
            report.line(f"{name}: connected")
        else:
            report.problem(f"{name}: not connected (uninstalled or disconnected)")


def _report_server(timeout: float, report: _Report) -> None:
    report.section("Langfuse server")
    if not client.langfuse_keys_configured():
        report.line("not checked: no keys")
        return
    outcome: dict[str, Any] = {}

    def check() -> None:
        try:
            outcome["ok"] = client.get_langfuse().auth_check()
        except Exception as exc:
            outcome["error"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=check, name="celery-langfuse-doctor", daemon=True)
    thread.start()
    thread.join(timeout)
    elapsed = time.monotonic() - started
    if thread.is_alive():
        report.problem(f"no answer within {timeout:g} s")
    elif outcome.get("ok"):
        report.line(f"answered and accepted the keys in {elapsed:.2f} s")
    elif "error" in outcome:
        report.problem(_describe_server_error(outcome["error"]))
    else:
        report.problem("the client could not check the keys (see the SDK's warning above)")


def _describe_server_error(error: Exception) -> str:
    status = getattr(error, "status_code", None)
    if status in (401, 403):
        return f"Langfuse rejected the keys (HTTP {status})"
    if status is not None:
        return f"Langfuse answered HTTP {status}: {str(error)[:200]}"
    return f"cannot reach Langfuse: {type(error).__name__}: {str(error)[:200]}"


def _summary(report: _Report) -> int:
    if report.problems:
        print(f"\n{len(report.problems)} problem(s) found.")
        return 1
    print("\nNo problems found.")
    return 0


def _display(name: str, value: Any) -> str:
    if value is None:
        return "(SDK default)" if name.startswith("flush_") else "(none)"
    if callable(value):
        return f"<{getattr(value, '__qualname__', type(value).__name__)}>"
    if isinstance(value, tuple):
        return ", ".join(value) if value else "(none)"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v:g}" for k, v in value.items()) if value else "(none)"
    if name == "durable_url":
        return _mask_url(str(value))  # a Redis URL may carry a password
    if name == "producer_secret":
        return "(set)"
    return str(value)


def _mask_key(key: str, *, visible: int) -> str:
    prefix = next((p for p in ("pk-lf-", "sk-lf-") if key.startswith(p)), "")
    tail = key[-visible:] if visible and len(key) > len(prefix) + visible else ""
    return f"{prefix}{_SECRET_MASK}{tail}"


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{_SECRET_MASK}@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


# -- forward --------------------------------------------------------------------------

#: Also the environment variable of the ``durable_url`` setting: one value serves both.
DURABLE_URL_ENV = ENV_PREFIX + "DURABLE_URL"


def _add_forward(subcommands: Any) -> None:
    parser = subcommands.add_parser(
        "forward",
        help="send the durable queue to Langfuse",
        description=(
            "Send the spans that workers in durable mode queued in Redis or RabbitMQ to "
            "Langfuse, removing each batch once Langfuse answered it (docs/reliability.md "
            "says which answers remove a batch). Run several for throughput "
            "and availability; each batch goes to one of them. Langfuse's address and "
            "keys come from LANGFUSE_BASE_URL, LANGFUSE_PUBLIC_KEY, LANGFUSE_SECRET_KEY."
        ),
    )
    parser.add_argument(
        "--url",
        "--redis-url",
        dest="url",
        default=os.environ.get(DURABLE_URL_ENV),
        help="the Redis, Redis Cluster or RabbitMQ holding the queue (install's durable_url: "
        f"redis://, rediss://, unix://, redis+cluster://, amqp://, amqps://); default "
        f"${DURABLE_URL_ENV}",
    )
    parser.add_argument(
        "--queue",
        default=os.environ.get(ENV_PREFIX + "DURABLE_QUEUE", "celery-langfuse"),
        help="queue name (install's durable_queue; default: %(default)s)",
    )
    parser.add_argument(
        "--consumer",
        help="this forwarder's name in the consumer group; default host-pid. A stable name "
        "lets a restarted forwarder resume its own pending batches at once",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=4,
        help="batches taken from Redis at a time (default: %(default)s)",
    )
    parser.add_argument(
        "--claim-timeout",
        type=_positive_float,
        default=60.0,
        help="seconds after which a batch pending with a silent forwarder is taken over "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-backoff",
        type=_positive_float,
        default=30.0,
        help="longest wait between two attempts to send a batch, seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=10.0,
        help="HTTP request timeout, seconds (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.set_defaults(run=forward)


def forward(args: argparse.Namespace) -> int:
    """Run one forwarder until SIGTERM or SIGINT. Exit status 2 for a usage error."""
    from .durable import QueueUnavailable, open_queue
    from .forwarder import Forwarder, LangfuseEndpoint

    def usage_error(message: str) -> int:
        print(f"celery-langfuse forward: error: {message}", file=sys.stderr)
        return 2

    if not args.url:
        return usage_error(f"needs --url (or --redis-url) or ${DURABLE_URL_ENV}")
    if args.claim_timeout <= 2 * args.timeout:
        return usage_error(
            f"--claim-timeout {args.claim_timeout:g} must exceed twice --timeout "
            f"{args.timeout:g}: a batch in flight must not look abandoned"
        )
    try:
        endpoint = LangfuseEndpoint.from_env(timeout=args.timeout)
    except KeyError as missing:
        return usage_error(f"needs the environment variable {missing}")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        queue = open_queue(args.url, args.queue)
    except (ValueError, QueueUnavailable) as error:
        return usage_error(f"--url: {error}")
    forwarder = Forwarder(
        queue,
        endpoint,
        consumer=args.consumer,
        batch_size=args.batch_size,
        claim_timeout=args.claim_timeout,
        max_backoff=args.max_backoff,
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: forwarder.stop())
    try:
        forwarder.run()
    finally:
        endpoint.close()
        forwarder.queue.close()
    return 0


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{raw!r}: must be a whole number of at least 1")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{raw!r}: must be a number above 0")
    return value


_SUBCOMMANDS: list[Callable[[Any], None]] = [_add_doctor, _add_forward]


if __name__ == "__main__":  # python -m celery_langfuse.cli
    sys.exit(main())
