"""Captured input/output: JSON-safe, bounded, and never able to raise into a task."""

from __future__ import annotations

import json
from typing import Any

from celery_langfuse.payload import TRUNCATED, capture


def test_json_values_are_kept_as_they_are() -> None:
    value = {"a": [1, 2.5, None, True, "x"], "b": {"c": "d"}}
    assert capture(value, 10_000) == value


def test_tuples_and_sets_become_lists_and_keys_become_strings() -> None:
    assert capture((1, 2), 100) == [1, 2]
    assert capture({1: "a"}, 100) == {"1": "a"}


def test_huge_values_are_cut_with_a_visible_marker() -> None:
    captured = capture({"blob": "x" * 1_000_000, "items": list(range(100_000))}, 1_000)
    encoded = json.dumps(captured)
    assert len(encoded) < 1_500
    assert TRUNCATED in encoded


def test_long_lists_say_how_much_was_left_out() -> None:
    captured = capture(list(range(10_000)), 200)
    assert captured[-1].startswith(TRUNCATED)
    assert "more items" in captured[-1]


def test_unserialisable_objects_are_captured_by_a_bounded_repr() -> None:
    class Thing:
        def __repr__(self) -> str:
            return "Thing(" + "y" * 10_000 + ")"

    captured = capture({"thing": Thing(), "raw": b"\x00\x01"}, 10_000)
    assert captured["thing"].startswith("Thing(")
    assert len(captured["thing"]) < 300
    assert captured["raw"] == "<2 bytes>"


def test_a_hostile_object_cannot_raise() -> None:
    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no repr for you")

    class HostileMapping(dict[str, Any]):
        def items(self) -> Any:
            raise RuntimeError("no items")

    assert "Hostile" in json.dumps(capture([Hostile()], 1_000))
    assert "HostileMapping" in capture(HostileMapping(a=1), 1_000)


def test_deep_nesting_is_bounded() -> None:
    value: Any = "bottom"
    for _ in range(1_000):
        value = [value]
    json.dumps(capture(value, 10_000))  # no RecursionError, still JSON
