"""Producer side: every message Celery publishes carries the trace context.

``before_task_publish`` fires for ``delay``, ``apply_async``, ``send_task``, canvas
primitives, retries and beat alike, so one handler covers them all. Inside an active
observation it records a short ``publish <task>`` observation, which becomes the
parent of the worker's run; with none, the message carries only the trace attributes
and the worker starts a new trace named after the task.

Inside a sampled-out trace, or for a task excluded by name, no observation is
recorded: the message carries the current context as it is (sampled flag included),
so the worker, and everything the task publishes in turn, stays in the same trace.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any, Optional

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace

from . import client, headers
from .logs import warn_rate_limited
from .sampling import TaskPolicy

log = logging.getLogger(__name__)

#: The task-name rules publishing follows. Celery's publish signal does not say which
#: app sends a message, so a process follows the first installed app's settings.
policy: Optional[TaskPolicy] = None
#: The first installed app's ``producer_secret``: messages are signed with it, so that
#: workers that require it take their trace attributes.
signing_key: Optional[bytes] = None


def on_before_task_publish(
    sender: Optional[str] = None,
    body: Any = None,
    exchange: Optional[str] = None,
    routing_key: Optional[str] = None,
    headers: Optional[MutableMapping[str, Any]] = None,
    properties: Optional[MutableMapping[str, Any]] = None,
    **_: Any,
) -> None:
    """Write the wire format into the outgoing message's headers."""
    if headers is None:  # protocol 1 messages have no headers to carry context
        return
    try:
        _inject_trace(sender or headers.get("task") or "task", headers, exchange, routing_key)
    except Exception:
        warn_rate_limited(
            log, "publish", "celery-langfuse: could not add trace headers to a message"
        )


def _inject_trace(
    task_name: str,
    message_headers: MutableMapping[str, Any],
    exchange: Optional[str],
    routing_key: Optional[str],
) -> None:
    ctx = otel_context.get_current()
    attributes = client.current_trace_attributes(ctx)
    cron = client.current_cron_run(ctx)
    current = otel_trace.get_current_span(ctx).get_span_context()
    if not current.is_valid:
        headers.inject(
            message_headers, parent=None, attributes=attributes, cron=cron, signing_key=signing_key
        )
        return
    excluded = policy is not None and not policy.traces_task(task_name)
    if excluded or not current.trace_flags.sampled:
        headers.inject(
            message_headers,
            parent=headers.TraceParent(
                format(current.trace_id, "032x"),
                format(current.span_id, "016x"),
                sampled=current.trace_flags.sampled,
            ),
            attributes=attributes,
            cron=cron,
            signing_key=signing_key,
        )
        return

    metadata: dict[str, Any] = {"task_id": message_headers.get("id"), "queue": routing_key}
    if exchange:
        metadata["exchange"] = exchange
    for key in _OPTIONAL_METADATA:
        value = message_headers.get(key)
        if value not in (None, 0, ""):
            metadata[key] = value

    span = client.start_observation(f"publish {task_name}", context=ctx, metadata=metadata)
    span.end()
    headers.inject(
        message_headers,
        parent=headers.TraceParent(span.trace_id, span.id, sampled=current.trace_flags.sampled),
        attributes=attributes,
        cron=cron,
        signing_key=signing_key,
    )


_OPTIONAL_METADATA = ("eta", "expires", "retries", "group", "parent_id", "root_id")
