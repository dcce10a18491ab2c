"""Settings from the Celery app's configuration: ``CELERY_LANGFUSE_*`` in Django's
settings.py (through ``config_from_object("django.conf:settings", namespace="CELERY")``)
and ``langfuse_*`` in any app's ``app.conf``.

Order: argument, environment, app config, preset, default. The Django project is the
real one of tests/support/django_site, on the real PostgreSQL.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_langfuse import ConfigurationError, install, uninstall
from celery_langfuse._install import installation_for
from celery_langfuse.config import ENV_VARIABLES
from tests.support.django_harness.fixtures import django_site
from tests.test_cli import doctor, setting_line

__all__ = ["django_site"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name in ENV_VARIABLES.values() or name == "LANGFUSE_TRACING_ENVIRONMENT":
            monkeypatch.delenv(name)


@pytest.fixture
def fresh_app() -> Iterator[Celery]:
    app = Celery(f"settings-{os.getpid()}")
    yield app
    uninstall(app)


def django_app() -> Celery:
    """A new app reading the (real, loaded) Django settings, as proj/celery.py does."""
    app = Celery("django-settings")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    return app


def test_settings_py_overrides_the_preset(django_site: Any) -> None:
    config = installation_for(django_site).config  # installed when proj/celery.py loaded

    assert (config.preset, config.source_of("preset")) == (
        "production",
        "app config CELERY_LANGFUSE_PRESET",
    )
    assert (config.sample_rate, config.source_of("sample_rate")) == (
        1.0,
        "app config CELERY_LANGFUSE_SAMPLE_RATE",
    )  # the production preset alone would keep 10%
    assert (config.flush_at, config.source_of("flush_at")) == (25, "preset production")
    assert config.redact_keys == ("card_number",)
    assert config.source_of("max_open_runs") == "default"


def test_environment_and_arguments_win_over_settings_py(
    django_site: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.test import override_settings

    monkeypatch.setenv("CELERY_LANGFUSE_SAMPLE_RATE", "0.5")
    with override_settings(CELERY_LANGFUSE_SAMPLE_RATE=0.2, CELERY_LANGFUSE_FLUSH_TIMEOUT=7):
        app = django_app()
        try:
            config = install(app, flush_timeout=9).config
        finally:
            uninstall(app)
    assert (config.sample_rate, config.source_of("sample_rate")) == (
        0.5,
        "CELERY_LANGFUSE_SAMPLE_RATE",
    )
    assert (config.flush_timeout, config.source_of("flush_timeout")) == (9, "install()")


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("SAMPLE_RATE", 1.5, "CELERY_LANGFUSE_SAMPLE_RATE=1.5: must be a number from 0 to 1"),
        ("SAMPLE_RATE", "lots", "CELERY_LANGFUSE_SAMPLE_RATE='lots': must be a number"),
        ("PRESET", "prd", "CELERY_LANGFUSE_PRESET='prd': must be one of development"),
        ("EXCLUDE_TASKS", 5, "CELERY_LANGFUSE_EXCLUDE_TASKS=5: must be a list of task"),
        ("SAMPLE_RATIO", 0.1, "CELERY_LANGFUSE_SAMPLE_RATIO in the app's configuration is unknown"),
    ],
)
def test_misconfigured_settings_py_raises_at_install(
    django_site: Any, setting: str, value: Any, expected: str
) -> None:
    from django.test import override_settings

    with override_settings(**{f"CELERY_LANGFUSE_{setting}": value}):
        app = django_app()
        with pytest.raises(ConfigurationError) as excinfo:
            install(app)
        uninstall(app)
    assert expected in str(excinfo.value)


def test_other_langfuse_names_in_settings_py_are_not_ours(django_site: Any) -> None:
    """settings.py may hold the SDK's own LANGFUSE_* values; they are no install option."""
    from django.test import override_settings

    with override_settings(LANGFUSE_PUBLIC_KEY="pk-lf-elsewhere", LANGFUSE_SAMPLE_RATE=0.3):
        app = django_app()
        try:
            config = install(app).config
        finally:
            uninstall(app)
    assert config.source_of("sample_rate") == "app config CELERY_LANGFUSE_SAMPLE_RATE"


def test_strings_from_settings_py_are_parsed_like_the_environment(django_site: Any) -> None:
    from django.test import override_settings

    with override_settings(
        CELERY_LANGFUSE_SAMPLE_RATE="0.25", CELERY_LANGFUSE_EXCLUDE_TASKS="celery.*, health.*"
    ):
        app = django_app()
        try:
            config = install(app).config
        finally:
            uninstall(app)
    assert config.sample_rate == 0.25
    assert config.exclude_tasks == ("celery.*", "health.*")


def test_any_app_conf_sets_langfuse_settings(fresh_app: Celery) -> None:
    fresh_app.conf.update(langfuse_sample_rate=0.3, langfuse_preset="staging")

    config = install(fresh_app).config

    assert (config.sample_rate, config.source_of("sample_rate")) == (
        0.3,
        "app config langfuse_sample_rate",
    )
    assert (config.flush_at, config.source_of("flush_at")) == (15, "preset staging")


def test_app_conf_is_below_the_environment(
    fresh_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CELERY_LANGFUSE_PRESET", "development")
    fresh_app.conf.langfuse_preset = "production"

    config = install(fresh_app).config

    assert (config.preset, config.source_of("preset")) == ("development", "CELERY_LANGFUSE_PRESET")


def test_app_conf_wins_over_langfuse_tracing_environment(
    fresh_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LANGFUSE_TRACING_ENVIRONMENT", "production")
    fresh_app.conf.langfuse_preset = "development"

    assert install(fresh_app).config.preset == "development"


def test_unknown_app_conf_key_raises(fresh_app: Celery) -> None:
    fresh_app.conf.langfuse_sample_raet = 0.3

    with pytest.raises(ConfigurationError, match="langfuse_sample_raet in the app's config"):
        install(fresh_app)


def test_an_unloadable_app_configuration_is_a_warning_not_a_crash(
    fresh_app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    fresh_app.config_from_object("no_such_module_for_celery_langfuse")

    installation = install(fresh_app)

    assert installation.config.source_of("sample_rate") == "default"
    assert "could not read the configuration of app" in caplog.text


def test_doctor_shows_settings_from_settings_py(langfuse_capture: Any) -> None:
    done = doctor(
        langfuse_capture.env,
        "--timeout",
        "5",
        app="tests.support.django_site",
    )

    assert setting_line(done.stdout, "sample_rate") == [
        "1.0",
        "app config CELERY_LANGFUSE_SAMPLE_RATE",
    ], done.stdout + done.stderr
    assert setting_line(done.stdout, "preset") == [
        "production",
        "app config CELERY_LANGFUSE_PRESET",
    ]
    assert setting_line(done.stdout, "flush_at") == ["25", "preset production"]
