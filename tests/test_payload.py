"""Captured input/output: JSON-safe, bounded, and never able to raise into a task."""

from __future__ import annotations

import json
from typing import Any

import pytest

from celery_langfuse.payload import (
    DEFAULT_REDACTOR,
    REDACTED,
    TRUNCATED,
    PayloadCapture,
    Redactor,
    capture,
)


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


# -- masking --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "PASSWORD",
        "db_password",
        "passwd",
        "pwd",
        "secret",
        "client_secret",
        "token",
        "access_token",
        "refreshToken",
        "api_key",
        "apiKey",
        "X-Api-Key",
        "apikey",
        "Authorization",
        "proxy-authorization",
        "cookie",
        "Set-Cookie",
        "session_key",
        "sessionKey",
        "private_key",
        "PrivateKey",
        "credit_card",
        "card_number",
        "creditCardNumber",
        "cvv",
        "cvc",
        "ssn",
        "social_security_number",
        "pin",
        "otp",
        "credentials",
        "aws_secret_access_key",
        "jwt",
        "iban",
    ],
)
def test_keys_that_look_sensitive_are_redacted(key: str) -> None:
    assert capture({key: "s3cr3t", "ok": 1}, 1_000) == {key: REDACTED, "ok": 1}


@pytest.mark.parametrize(
    "key",
    ["max_tokens", "total_tokens", "business_name", "author", "session_id", "user", "pinned"],
)
def test_keys_that_merely_contain_a_short_sensitive_word_are_kept(key: str) -> None:
    assert capture({key: "v"}, 1_000) == {key: "v"}


def test_redaction_reaches_any_depth_and_skips_the_secret_value_entirely() -> None:
    class Exploding:
        def __repr__(self) -> str:
            raise AssertionError("a redacted value is never looked at")

    value = {"a": [{"b": ({"token": Exploding()},)}], "c": {"d": {"e": {"password": [1, 2]}}}}
    assert capture(value, 10_000) == {
        "a": [{"b": [{"token": REDACTED}]}],
        "c": {"d": {"e": {"password": REDACTED}}},
    }


def test_extra_keys_are_matched_like_the_built_in_ones() -> None:
    redactor = Redactor(["tax_id"])
    assert capture({"TaxID": "x", "tax-id-2": "y", "name": "z"}, 1_000, redactor) == {
        "TaxID": REDACTED,
        "tax-id-2": REDACTED,
        "name": "z",
    }


def test_pairs_in_a_repr_or_message_are_scrubbed() -> None:
    text = (
        "error: password='p w' user=bob Authorization: Bearer abc.def "
        "{'api_key': \"k\", 'max_tokens': 5} session_key=zz"
    )
    assert DEFAULT_REDACTOR.scrub(text) == (
        f"error: password={REDACTED} user=bob Authorization: {REDACTED} "
        f"{{'api_key': {REDACTED}, 'max_tokens': 5}} session_key={REDACTED}"
    )


def test_redaction_can_be_turned_off() -> None:
    assert capture({"password": "x"}, 1_000, None) == {"password": "x"}


def test_a_mask_runs_after_redaction_and_fails_closed() -> None:
    seen: list[Any] = []

    def mask(value: Any) -> Any:
        seen.append(value)
        return "masked"

    assert PayloadCapture(1_000, mask=mask)({"password": "x", "a": 1}) == "masked"
    assert seen == [{"password": REDACTED, "a": 1}]

    def broken(value: Any) -> Any:
        raise RuntimeError("bug")

    assert PayloadCapture(1_000, mask=broken)({"a": 1}) == "<not captured: mask failed>"


@pytest.mark.parametrize(
    "value",
    [
        *(None, True, 0, -7, 2.5, float("inf"), "", "short", "x" * 99, "x" * 101, [], {}, ()),
        *([1], {"password": "hunter2"}, ("a",), {1: 2}, b"bytes", {"nested": {"token": "t"}}),
    ],
)
def test_values_returned_at_once_are_what_a_capture_returns(value: Any) -> None:
    # PayloadCapture returns None, numbers, short strings and empty lists and dicts
    # without walking them: the same as the walk would.
    captured = PayloadCapture(max_chars=100)(value)
    assert captured == capture(value, 100)
    assert type(captured) is type(capture(value, 100))
    if isinstance(value, (list, dict)):
        assert captured is not value  # a copy, as a capture is: the task may mutate it
