"""Wrong configuration fails at install() with the setting, the value and what is allowed."""

from __future__ import annotations

import pytest
from celery import Celery

from celery_langfuse import ConfigurationError, install, uninstall


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"flush_timeout": 0}, "flush_timeout=0: must be a number of seconds above 0"),
        ({"flush_timeout": "3"}, "flush_timeout='3'"),
        ({"max_payload_chars": 10}, "max_payload_chars=10: must be a whole number from 64"),
        ({"capture_input": "yes"}, "capture_input='yes': must be true or false"),
        ({"max_open_runs": 0}, "max_open_runs=0"),
        ({"flush_timout": 1}, "unknown option(s) flush_timout"),
    ],
)
def test_bad_option_raises_a_clear_error(options: dict[str, object], expected: str) -> None:
    app = Celery("bad-config")
    with pytest.raises(ConfigurationError) as excinfo:
        install(app, **options)
    assert expected in str(excinfo.value)
    uninstall(app)


def test_install_needs_a_celery_app() -> None:
    with pytest.raises(TypeError, match=r"celery\.Celery"):
        install(object())  # type: ignore[arg-type]
