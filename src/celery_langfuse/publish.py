"""Producer side: every message Celery publishes carries the trace context.

``before_task_publish`` fires for ``delay``, ``apply_async``, ``send_task``, canvas
primitives, retries and beat alike, so one handler covers them all. Inside an active
observation it records a short ``publish <task>`` observation, which becomes the
parent of the worker's run; with none, the message carries only the trace attributes
and the worker starts a new trace named after the task.

Inside a sampled-out trace, or for a task excluded by name, no observation is
recorded: the message carries the current context as it is (sampled flag included),
so the worker, and everything the task publishes in turn, stays in the same trace.

Linked traces (fan-out): a task matching ``linked_trace_tasks``, a message whose caller
set ``x-langfuse-linked-trace: 1``, or any task published from a trace that has passed
``max_trace_observations`` in this process, starts a trace of its own. The publish
observation stays in the caller's trace and names the new one (``linked_trace_id``,
``linked_trace_url``); the message carries the new trace's id instead of a parent, the
caller's user, session and tags, and, as trace metadata, the caller's trace id,
publish observation id and trace URL. A retry never starts a new one: it stays in the
trace of the run it repeats.
"""

from __future__ import annotations

import json
import logging
from collections.abc import MutableMapping
from dataclasses import replace
from typing import Any, Optional

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace

from . import _policy, beat, client, headers
from ._policy import TaskPolicy
from .logs import warn_rate_limited

log = logging.getLogger(__name__)

#: The task-name rules publishing follows. Celery's publish signal does not say which
#: app sends a message, so a process follows the first installed app's settings.
policy: Optional[TaskPolicy] = None
#: The first installed app's ``producer_secret``: messages are signed with it, so that
#: workers that require it take their trace attributes.
signing_key: Optional[bytes] = None
#: ``{base URL}/project/{project_id}/traces/`` from the first installed app's
#: ``project_id``; None without one (links then carry ids only).
trace_url_prefix: Optional[str] = None


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
    cron = beat.current_cron_run(ctx)
    current = otel_trace.get_current_span(ctx).get_span_context()
    link_requested = (
        None
        if message_headers.get(headers.LINKED_TRACE) is None
        else _link_requested(message_headers, task_name)
    )
    if not current.is_valid:
        headers.inject(
            message_headers, parent=None, attributes=attributes, cron=cron, signing_key=signing_key
        )
        return
    rules = policy.rules(task_name) if policy is not None else None
    if (rules is not None and not rules.traced) or not current.trace_flags.sampled:
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
    trace_id = span.trace_id
    # The guard counts every publish; a retry stays in the trace of the run it repeats.
    over_limit = _policy.trace_guard.over(trace_id)
    if message_headers.get("retries"):
        linked = False
    elif link_requested is not None:
        linked = link_requested
    else:
        linked = over_limit or (rules is not None and rules.linked)
    if linked:
        _publish_linked(message_headers, span, trace_id, attributes, cron)
        return
    span.end()
    headers.inject(
        message_headers,
        parent=headers.TraceParent(trace_id, span.id, sampled=current.trace_flags.sampled),
        attributes=attributes,
        cron=cron,
        signing_key=signing_key,
    )


def _publish_linked(
    message_headers: MutableMapping[str, Any],
    span: client.Observation,
    trace_id: str,
    attributes: headers.TraceAttributes,
    cron: Optional[headers.CronRun],
) -> None:
    """End the publish observation (in the caller's trace) naming the new trace the
    message starts, and write that trace's id and its link to the caller's."""
    linked_trace_id = _policy.new_trace_id()
    prefix = trace_url_prefix
    named: dict[str, Any] = {"linked_trace_id": linked_trace_id}
    if prefix:
        named["linked_trace_url"] = f"{prefix}{linked_trace_id}"
    span.update(metadata=named)
    span.end()
    parent = {headers.LINKED_FROM_TRACE_ID: trace_id, headers.LINKED_FROM_OBSERVATION_ID: span.id}
    if prefix:
        parent["parent_trace_url"] = f"{prefix}{trace_id}"
    linked_attributes = replace(
        attributes,
        trace_name=None,  # the new trace is named after its task, as any new trace
        # Trace metadata values travel JSON-encoded, as propagate_attributes keeps them.
        metadata={
            **{key: json.dumps(value) for key, value in parent.items()},
            **{k: v for k, v in attributes.metadata.items() if k not in parent},
        },
    ).bounded()
    headers.inject(
        message_headers,
        parent=None,
        attributes=linked_attributes,
        cron=cron,
        signing_key=signing_key,
        link_trace_id=linked_trace_id,
    )


def _link_requested(message_headers: MutableMapping[str, Any], task_name: str) -> Optional[bool]:
    """The caller's ``x-langfuse-linked-trace`` (removed from the message, so a retry
    does not repeat it): True, False, or None for a value that means neither."""
    value = message_headers.pop(headers.LINKED_TRACE, None)
    if isinstance(value, str) and value.strip().lower() in _YES:
        return True
    if isinstance(value, str) and value.strip().lower() in _NO:
        return False
    warn_rate_limited(
        log,
        "linked-trace-header",
        "celery-langfuse: ignoring header %s=%.40r on task %s: must be the string '1' "
        "(start a linked trace) or '0' (stay in the caller's trace)",
        headers.LINKED_TRACE,
        value,
        task_name,
    )
    return None


_YES = frozenset({"1", "true", "yes"})
_NO = frozenset({"0", "false", "no"})
_OPTIONAL_METADATA = ("eta", "expires", "retries", "group", "parent_id", "root_id")
