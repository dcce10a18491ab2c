"""Settings of one installation, validated at ``install()`` with errors for people."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any, Optional

_QUEUE_NAME_RE = re.compile(r"[A-Za-z0-9._:-]{1,100}")


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
    export:
        ``"direct"``: the SDK sends spans to Langfuse itself. ``"durable"``: spans go
        to a bounded queue in Redis, and ``celery-langfuse forward`` sends them on,
        deleting each batch only once Langfuse accepted it (docs/reliability.md).
    durable_url:
        The Redis that holds the durable queue (``redis://``, ``rediss://`` or
        ``unix://``); required with ``export="durable"``.
    durable_queue:
        Name of the durable queue, so several apps or projects can share one Redis.
    durable_max_bytes:
        Upper bound on the span data the durable queue holds; past it the oldest
        batches are dropped, counted and logged.
    """

    capture_input: bool = True
    capture_output: bool = True
    max_payload_chars: int = 10_000
    flush_timeout: float = 3.0
    max_open_runs: int = 10_000
    export: str = "direct"
    durable_url: Optional[str] = None
    durable_queue: str = "celery-langfuse"
    durable_max_bytes: int = 256 * 1024 * 1024

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
        self._validate_export()

    def _validate_export(self) -> None:
        _require(
            "export", self.export, self.export in ("direct", "durable"), '"direct" or "durable"'
        )
        if self.export == "durable":
            _require(
                "durable_url",
                self.durable_url,
                isinstance(self.durable_url, str)
                and self.durable_url.startswith(("redis://", "rediss://", "unix://")),
                'a redis://, rediss:// or unix:// URL when export="durable"',
            )
        else:
            _require(
                "durable_url",
                self.durable_url,
                self.durable_url is None,
                'unset unless export="durable"',
            )
        _require(
            "durable_queue",
            self.durable_queue,
            isinstance(self.durable_queue, str)
            and _QUEUE_NAME_RE.fullmatch(self.durable_queue) is not None,
            "1 to 100 letters, digits, '.', '_', ':' or '-'",
        )
        _require(
            "durable_max_bytes",
            self.durable_max_bytes,
            _is_int(self.durable_max_bytes) and self.durable_max_bytes >= 1024 * 1024,
            "a whole number of bytes, at least 1048576 (1 MiB)",
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
