"""A deterministic stand-in for an LLM, so the example runs offline and tests can
assert on its output. Each call is recorded as a Langfuse *generation*, with the
model name, parameters, input messages, output and token usage, exactly as a real
model call would be.
"""

from __future__ import annotations

from dataclasses import dataclass

from langfuse import get_client

MODEL = "fake-summariser-1"
SYSTEM_PROMPT = "Summarise the user's text in one short sentence."
#: A chunk containing this marker makes the first call fail, as an overloaded API would.
BUSY_MARKER = "[busy]"


class ModelOverloaded(RuntimeError):
    """The model asked us to come back later (HTTP 529 from a real provider)."""


@dataclass(frozen=True)
class Completion:
    text: str
    input_tokens: int
    output_tokens: int


def summarise(text: str, *, attempt: int = 0) -> str:
    """Summarise ``text``; the call appears in Langfuse as a generation."""
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": text},
    ]
    with get_client().start_as_current_observation(
        name="summarise chunk",
        as_type="generation",
        model=MODEL,
        model_parameters={"temperature": 0, "max_tokens": 32},
        input=messages,
    ) as generation:
        if BUSY_MARKER in text and attempt == 0:
            generation.update(level="ERROR", status_message="model overloaded (529)")
            raise ModelOverloaded("the model is overloaded; retry later")
        completion = _complete(messages)
        generation.update(
            output=completion.text,
            usage_details={"input": completion.input_tokens, "output": completion.output_tokens},
        )
        return completion.text


def _complete(messages: list[dict[str, str]]) -> Completion:
    """The "model": the first eight words of the user's text, as one sentence."""
    words = messages[-1]["content"].replace(BUSY_MARKER, "").split()
    summary = " ".join(words[:8]).rstrip(".,;:") + ("..." if len(words) > 8 else ".")
    prompt_tokens = sum(len(message["content"].split()) for message in messages)
    return Completion(summary, prompt_tokens, len(summary.split()))
