"""RunScope: what a task run made current or opened is undone, in reverse, always."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from opentelemetry import context as otel_context

from celery_langfuse.worker import RunScope

_KEY = otel_context.create_key("run-scope-test")


def test_steps_are_undone_in_reverse_and_contexts_restored() -> None:
    done: list[str] = []

    @contextmanager
    def manager() -> Iterator[None]:
        done.append("enter")
        yield
        done.append("exit")

    before = otel_context.get_current()
    scope = RunScope()
    scope.callback(done.append, "first")
    scope.enter(manager())
    scope.attach(otel_context.set_value(_KEY, "run"))
    assert otel_context.get_value(_KEY) == "run"
    scope.callback(done.append, "last")
    scope.close()
    assert done == ["enter", "last", "exit", "first"]
    assert otel_context.get_current() == before


def test_a_failing_step_does_not_stop_the_others_and_its_error_is_raised() -> None:
    done: list[str] = []

    def fail(message: str) -> None:
        raise RuntimeError(message)

    before = otel_context.get_current()
    scope = RunScope()
    scope.attach(otel_context.set_value(_KEY, "run"))
    scope.callback(fail, "first failure")
    scope.callback(done.append, "ran")
    scope.callback(fail, "second failure")
    with pytest.raises(RuntimeError, match="second failure"):
        scope.close()
    assert done == ["ran"]
    assert otel_context.get_current() == before
    scope.close()  # closing again undoes nothing twice
    assert done == ["ran"]
