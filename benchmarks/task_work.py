"""What the benchmark's tasks are handed and do, beyond a no-op.

Shared by the ``large-arg`` and ``generation`` workloads and the hot-path budget test
(tests/test_hot_path_budget.py), so that both measure the same argument and the same
LLM call; no side effects on import (unlike ``benchmarks/app.py``).
"""

from __future__ import annotations

import json
from typing import Any, Callable

#: Bytes of JSON in the large argument.
LARGE_ARGUMENT_BYTES = 100_000
#: The model name the LLM call reports.
MODEL = "bench-model"
PROMPT = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "Which queue should a nightly report task use?"},
]
_ANSWER = "Put it on a low-priority queue of its own so it never delays interactive tasks."

Messages = list[dict[str, str]]


def large_document(size: int = LARGE_ARGUMENT_BYTES) -> dict[str, Any]:
    """A JSON document of about ``size`` bytes, shaped like a batch of records a task
    might be handed: a few top-level fields and a list of small objects."""
    items: list[dict[str, Any]] = []
    document: dict[str, Any] = {"id": "doc-1", "source": "bench", "items": items}
    text = "lorem ipsum dolor sit amet consectetur adipiscing elit " * 2
    while len(json.dumps(document)) < size:
        i = len(items)
        items.extend(
            {
                "id": j,
                "title": f"record {j}",
                "text": text,
                "score": j / 7,
                "tags": ["alpha", "beta"],
                "done": j % 2 == 0,
            }
            for j in range(i, i + 10)
        )
    return document


def llm_call(messages: Messages) -> dict[str, Any]:
    """A stand-in for an LLM client's call: the reply an OpenAI-style API returns,
    made without a network round trip, so that only its recording differs."""
    prompt_tokens = sum(len(message["content"].split()) for message in messages)
    completion_tokens = len(_ANSWER.split())
    return {
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": _ANSWER},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "input": prompt_tokens,
            "output": completion_tokens,
            "total": prompt_tokens + completion_tokens,
        },
    }


def record_generation(
    langfuse_client: Any, call: Callable[[Messages], dict[str, Any]], messages: Messages
) -> dict[str, Any]:
    """``call(messages)`` recorded as the Langfuse SDK's documentation records an LLM
    call: a generation with its model, input, output and usage, nested in whatever
    span is current."""
    with langfuse_client.start_as_current_observation(
        name="llm", as_type="generation", model=MODEL, input=messages
    ) as observation:
        reply = call(messages)
        observation.update(output=reply["choices"][0]["message"], usage_details=reply["usage"])
    return reply
