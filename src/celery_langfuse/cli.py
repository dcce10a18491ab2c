"""The ``celery-langfuse`` command: one subcommand per operational task.

``celery-langfuse forward`` runs a forwarder of the durable queue (see
``docs/reliability.md``). Langfuse's address and keys come from the variables the SDK
reads (``LANGFUSE_BASE_URL``, ``LANGFUSE_PUBLIC_KEY``, ``LANGFUSE_SECRET_KEY``), so
secrets never appear in a process list.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Optional

DURABLE_URL_ENV = "CELERY_LANGFUSE_DURABLE_URL"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.run(parser, args)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celery-langfuse", description="Operate celery-langfuse tracing."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_forward(commands)
    return parser


# -- forward ---------------------------------------------------------------------------


def _add_forward(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    forward = commands.add_parser(
        "forward",
        help="send the durable queue to Langfuse",
        description=(
            "Send the spans that workers in durable mode queued in Redis to Langfuse, "
            "removing each batch once Langfuse accepted it. Run several for throughput "
            "and availability; each batch goes to one of them. Langfuse's address and "
            "keys come from LANGFUSE_BASE_URL, LANGFUSE_PUBLIC_KEY, LANGFUSE_SECRET_KEY."
        ),
    )
    forward.add_argument(
        "--redis-url",
        default=os.environ.get(DURABLE_URL_ENV),
        help=f"the Redis holding the queue (install's durable_url); default ${DURABLE_URL_ENV}",
    )
    forward.add_argument(
        "--queue", default="celery-langfuse", help="queue name (durable_queue of install)"
    )
    forward.add_argument(
        "--consumer",
        help="this forwarder's name in the consumer group; default host-pid. A stable name "
        "lets a restarted forwarder resume its own pending batches at once",
    )
    forward.add_argument(
        "--batch-size", type=_positive_int, default=4, help="batches taken from Redis at a time"
    )
    forward.add_argument(
        "--claim-timeout",
        type=_positive_float,
        default=60.0,
        help="seconds after which a batch pending with a silent forwarder is taken over",
    )
    forward.add_argument(
        "--max-backoff",
        type=_positive_float,
        default=30.0,
        help="longest wait between two attempts to send a batch, in seconds",
    )
    forward.add_argument(
        "--timeout", type=_positive_float, default=10.0, help="HTTP request timeout, seconds"
    )
    forward.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    forward.set_defaults(run=_forward)


def _forward(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .durable import SpanQueue
    from .forwarder import Forwarder, LangfuseEndpoint

    if not args.redis_url:
        parser.error(f"forward needs --redis-url or ${DURABLE_URL_ENV}")
    if args.claim_timeout <= 2 * args.timeout:
        parser.error(
            f"--claim-timeout {args.claim_timeout:g} must exceed twice --timeout "
            f"{args.timeout:g}: a batch in flight must not look abandoned"
        )
    try:
        endpoint = LangfuseEndpoint.from_env(timeout=args.timeout)
    except KeyError as missing:
        parser.error(f"forward needs the environment variable {missing}")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    forwarder = Forwarder(
        SpanQueue.from_url(args.redis_url, args.queue),
        endpoint,
        consumer=args.consumer,
        batch_size=args.batch_size,
        claim_timeout=args.claim_timeout,
        max_backoff=args.max_backoff,
    )

    def stop(signum: int, frame: Optional[FrameType]) -> None:
        forwarder.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
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


if __name__ == "__main__":
    sys.exit(main())
