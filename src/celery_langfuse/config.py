"""Settings of one installation, validated at ``install()`` with errors for people."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any


class ConfigurationError(ValueError):
    """A setting has a value that is not allowed; the message names both."""


@dataclass(frozen=True)
class TracingConfig:
    """What ``install(app, **options)`` accepts.

    capture_input / capture_output:
        Record task args/kwargs and return values on the run observation.
    max_payload_chars:
        Upper bound on the JSON size of one captured input or output; larger values
        are cut with a visible ``...[truncated]`` marker.
    flush_timeout:
        Seconds a process may spend sending buffered observations when it shuts down
        (prefork child exit, worker shutdown, interpreter exit).
    max_open_runs:
        Upper bound on task runs tracked at once in one process; past it the oldest
        run is closed (level WARNING) so the registry can never grow without bound.
    """

    capture_input: bool = True
    capture_output: bool = True
    max_payload_chars: int = 10_000
    flush_timeout: float = 3.0
    max_open_runs: int = 10_000

    def __post_init__(self) -> None:
        for name in ("capture_input", "capture_output"):
            _require(name, getattr(self, name), isinstance(getattr(self, name), bool), "true or false")
        _require(
            "max_payload_chars",
            self.max_payload_chars,
            _is_int(self.max_payload_chars) and 64 <= self.max_payload_chars <= 10_000_000,
            "a whole number from 64 to 10000000",
        )
        _require(
            "flush_timeout",
            self.flush_timeout,
            _is_number(self.flush_timeout) and 0 < self.flush_timeout <= 300,
            "a number of seconds above 0 and at most 300",
        )
        _require(
            "max_open_runs",
            self.max_open_runs,
            _is_int(self.max_open_runs) and self.max_open_runs >= 1,
            "a whole number of at least 1",
        )

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TracingConfig:
        """Build from ``install()`` keyword arguments, rejecting unknown names."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigurationError(
                f"install() got unknown option(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(known))}"
            )
        return cls(**options)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _require(name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigurationError(f"celery-langfuse setting {name}={value!r}: must be {allowed}")
