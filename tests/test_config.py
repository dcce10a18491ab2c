"""Settings: one source order, environment presets, and errors that name the setting,
the value and what is allowed."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from celery import Celery

from celery_langfuse import ConfigurationError, TracingConfig, install, uninstall
from celery_langfuse.config import ENV_VARIABLES, PRESETS, SETTING_NAMES
from tests.conftest import ROOT


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CELERY_LANGFUSE_* setting or preset leaks in from the machine running the tests."""
    for name in list(os.environ):
        if name in ENV_VARIABLES.values() or name == "LANGFUSE_TRACING_ENVIRONMENT":
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"flush_timeout": 0}, "flush_timeout=0: must be a number of seconds above 0"),
        ({"flush_timeout": "3"}, "flush_timeout='3'"),
        ({"max_payload_chars": 10}, "max_payload_chars=10: must be a whole number from 64"),
        ({"capture_input": "yes"}, "capture_input='yes': must be true or false"),
        ({"max_open_runs": 0}, "max_open_runs=0"),
        ({"flush_timout": 1}, "unknown option(s) flush_timout"),
        ({"sample_rate": 1.5}, "sample_rate=1.5: must be a number from 0 to 1"),
        ({"sample_rate": True}, "sample_rate=True: must be a number from 0 to 1"),
        ({"preset": "prd"}, "preset='prd': must be one of development, staging, production"),
        ({"exclude_tasks": "celery.*"}, "exclude_tasks='celery.*': must be a list of task"),
        ({"task_sample_rates": {"a.*": 2}}, "task_sample_rates={'a.*': 2}: must be a mapping"),
        ({"sampler": 0.5}, "sampler=0.5: must be a callable"),
        ({"mask": "redact"}, "mask='redact': must be a callable"),
        ({"flush_at": 0}, "flush_at=0: must be a whole number of spans from 1"),
        ({"flush_interval": -1}, "flush_interval=-1: must be a number of seconds above 0"),
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


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "CELERY_LANGFUSE_SAMPLE_RATE",
            "1.5",
            "celery-langfuse setting CELERY_LANGFUSE_SAMPLE_RATE='1.5': "
            "must be a number from 0 to 1",
        ),
        ("CELERY_LANGFUSE_SAMPLE_RATE", "ten percent", "SAMPLE_RATE='ten percent': must be"),
        ("CELERY_LANGFUSE_KEEP_FAILURES", "maybe", "KEEP_FAILURES='maybe': must be true or false"),
        ("CELERY_LANGFUSE_PRESET", "qa", "PRESET='qa': must be one of development, staging"),
        ("CELERY_LANGFUSE_TASK_SAMPLE_RATES", "a.*:0.1", "TASK_SAMPLE_RATES='a.*:0.1': must be"),
        ("CELERY_LANGFUSE_FLUSH_AT", "1e3", "CELERY_LANGFUSE_FLUSH_AT='1e3': must be a whole"),
        ("LANGFUSE_FLUSH_INTERVAL", "soon", "LANGFUSE_FLUSH_INTERVAL='soon': must be a number"),
    ],
)
def test_bad_environment_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as excinfo:
        install(Celery("bad-env"))
    assert expected in str(excinfo.value)


def test_every_setting_can_be_read_from_its_own_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "ENABLED": "off",
        "PRESET": "Staging",
        "SAMPLE_RATE": "0.25",
        "KEEP_FAILURES": "no",
        "TASK_SAMPLE_RATES": "proj.noisy.*=0.01, proj.billing.*=1",
        "EXCLUDE_TASKS": "celery.*, proj.health",
        "CAPTURE_INPUT": "false",
        "CAPTURE_OUTPUT": "0",
        "CAPTURE_EXCLUDE_TASKS": "proj.payments.*",
        "REDACT_KEYS": "tax_id,iban_hint",
        "MAX_PAYLOAD_CHARS": "2000",
        "FLUSH_AT": "10",
        "FLUSH_INTERVAL": "2.5",
        "FLUSH_TIMEOUT": "7",
        "MAX_OPEN_RUNS": "99",
        "EXPORT": "Durable",
        "DURABLE_URL": "redis://queue-host:6379/3",
        "DURABLE_QUEUE": "project-a",
        "DURABLE_MAX_BYTES": "2097152",
        "PRODUCER_SECRET": "env-producer-secret-0123",
        "DURABLE_BUFFER_BYTES": "131072",
        "DURABLE_SPILL_DIR": "/var/spool/celery-langfuse",
        "DURABLE_SPILL_MAX_BYTES": "3145728",
        "LOG_TRACE_IDS": "no",
        "PROJECT_ID": "cl-project-1",
        "LINKED_TRACE_TASKS": "proj.fan.*",
        "MAX_TRACE_OBSERVATIONS": "500",
    }
    for name, value in values.items():
        monkeypatch.setenv(f"CELERY_LANGFUSE_{name}", value)
    config = TracingConfig.resolve({})
    assert (config.enabled, config.preset, config.sample_rate, config.keep_failures) == (
        False,
        "staging",
        0.25,
        False,
    )
    assert config.task_sample_rates == {"proj.noisy.*": 0.01, "proj.billing.*": 1.0}
    assert config.exclude_tasks == ("celery.*", "proj.health")
    assert (config.capture_input, config.capture_output) == (False, False)
    assert config.capture_exclude_tasks == ("proj.payments.*",)
    assert config.redact_keys == ("tax_id", "iban_hint")
    assert (config.max_payload_chars, config.flush_at, config.flush_interval) == (2000, 10, 2.5)
    assert (config.flush_timeout, config.max_open_runs) == (7.0, 99)
    assert (config.export, config.durable_url) == ("durable", "redis://queue-host:6379/3")
    assert (config.durable_queue, config.durable_max_bytes) == ("project-a", 2 * 1024 * 1024)
    assert config.producer_secret == "env-producer-secret-0123"
    assert (
        config.durable_buffer_bytes,
        config.durable_spill_dir,
        config.durable_spill_max_bytes,
    ) == (128 * 1024, "/var/spool/celery-langfuse", 3 * 1024 * 1024)
    assert (config.log_trace_ids, config.project_id) == (False, "cl-project-1")
    assert (config.linked_trace_tasks, config.max_trace_observations) == (("proj.fan.*",), 500)
    settable = {name for name in SETTING_NAMES if name not in ("sampler", "mask")}
    assert {config.source_of(name) for name in settable} == {
        f"CELERY_LANGFUSE_{name}" for name in values
    }


def test_an_empty_list_variable_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_LANGFUSE_EXCLUDE_TASKS", "")
    monkeypatch.setenv("CELERY_LANGFUSE_SAMPLE_RATE", "")  # an empty scalar is unset
    config = TracingConfig.resolve({})
    assert config.exclude_tasks == ()
    assert config.traces_task("celery.chord_unlock")
    assert (config.sample_rate, config.source_of("sample_rate")) == (1.0, "default")


@pytest.mark.parametrize(
    ("preset", "flush_at", "flush_interval", "sample_rate"),
    [
        ("development", 1, 1.0, 1.0),
        ("staging", 15, 5.0, 0.5),
        ("production", 25, 5.0, 0.1),
    ],
)
def test_presets(preset: str, flush_at: int, flush_interval: float, sample_rate: float) -> None:
    config = TracingConfig.resolve({"preset": preset}, environ={})
    assert (config.flush_at, config.flush_interval, config.sample_rate) == (
        flush_at,
        flush_interval,
        sample_rate,
    )
    assert config.keep_failures is True
    assert config.source_of("sample_rate") == f"preset {preset}"
    assert set(PRESETS[preset]) == {"flush_at", "flush_interval", "sample_rate", "keep_failures"}


def test_without_a_preset_the_sdk_keeps_its_own_flush_settings() -> None:
    config = TracingConfig.resolve({}, environ={})
    assert (config.preset, config.flush_at, config.flush_interval) == (None, None, None)
    assert (config.sample_rate, config.keep_failures) == (1.0, True)
    assert config.source_of("flush_at") == "default"


@pytest.mark.parametrize(
    ("environment", "preset"),
    [
        ("production", "production"),
        ("prod", "production"),
        ("Staging", "staging"),
        ("dev", "development"),
        ("docker", None),
        ("", None),
    ],
)
def test_preset_defaults_from_the_langfuse_tracing_environment(
    environment: str, preset: str | None
) -> None:
    config = TracingConfig.resolve({}, environ={"LANGFUSE_TRACING_ENVIRONMENT": environment})
    assert config.preset == preset
    if preset:
        assert config.source_of("preset") == "LANGFUSE_TRACING_ENVIRONMENT"


def test_source_order_argument_then_variable_then_sdk_variable_then_preset_then_default() -> None:
    environ = {
        "LANGFUSE_TRACING_ENVIRONMENT": "production",
        "CELERY_LANGFUSE_PRESET": "staging",
        "CELERY_LANGFUSE_SAMPLE_RATE": "0.3",
        "CELERY_LANGFUSE_FLUSH_AT": "40",
        "LANGFUSE_FLUSH_AT": "50",
        "LANGFUSE_FLUSH_INTERVAL": "0.5",
        "LANGFUSE_SAMPLE_RATE": "0.01",  # the SDK's own sampler: not this setting
    }
    config = TracingConfig.resolve({"sample_rate": 0.9}, environ=environ)
    found = {
        name: (getattr(config, name), config.source_of(name))
        for name in (
            "preset",
            "sample_rate",
            "flush_at",
            "flush_interval",
            "keep_failures",
            "flush_timeout",
        )
    }
    assert found == {
        "preset": ("staging", "CELERY_LANGFUSE_PRESET"),
        "sample_rate": (0.9, "install()"),
        "flush_at": (40, "CELERY_LANGFUSE_FLUSH_AT"),
        "flush_interval": (0.5, "LANGFUSE_FLUSH_INTERVAL"),
        "keep_failures": (True, "preset staging"),
        "flush_timeout": (3.0, "default"),
    }


def test_install_applies_the_flush_settings_to_the_client_it_will_create(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from celery_langfuse import client

    monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", "pk-lf-config")
    monkeypatch.setenv("LANGFUSE_SECRET_KEY", "sk-lf-config")
    monkeypatch.setattr(client, "client_settings", client.ClientSettings())
    monkeypatch.delenv("LANGFUSE_FLUSH_AT", raising=False)
    monkeypatch.delenv("LANGFUSE_FLUSH_INTERVAL", raising=False)
    from tests.support import tasks  # installed first, so it sets the process settings

    uninstall(tasks.app)
    app = Celery("flush-settings")
    try:
        install(app, preset="production", flush_interval=2.0)
        assert client.client_settings == client.ClientSettings(flush_at=25, flush_interval=2.0)
    finally:
        uninstall(app)
        install(tasks.app)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("LANGFUSE_", "CELERY_LANGFUSE_"))
    }
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, "PYTHONPATH": os.pathsep.join(sys.path), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_missing_keys_turn_tracing_off_with_one_warning_and_tasks_still_run() -> None:
    done = run_python(
        """
from celery import Celery
from celery_langfuse import install

apps = [Celery(name, broker="memory://", backend="cache+memory://") for name in ("a", "b")]
installations = [install(app) for app in apps]
app = apps[0]
app.conf.task_always_eager = True

@app.task
def add(x, y):
    return x + y

print("result", add.delay(2, 3).get())
print("enabled", [i.enabled for i in installations], [i.connected_signals() for i in installations])
"""
    )
    assert done.returncode == 0, done.stderr
    assert "result 5" in done.stdout
    assert "enabled [False, False] [[], []]" in done.stdout
    assert done.stderr.count("LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY are not both set") == 1
    assert "tracing is off" in done.stderr


def test_enabled_false_turns_tracing_off_silently() -> None:
    done = run_python(
        """
from celery import Celery
from celery_langfuse import install

installation = install(Celery("off"))
print(installation.enabled, installation.off_reason, installation.connected_signals())
""",
        CELERY_LANGFUSE_ENABLED="false",
        LANGFUSE_PUBLIC_KEY="pk-lf-x",
        LANGFUSE_SECRET_KEY="sk-lf-x",
    )
    assert done.returncode == 0, done.stderr
    assert "False disabled by enabled=False (CELERY_LANGFUSE_ENABLED) []" in done.stdout
    assert "WARNING" not in done.stderr


def test_direct_construction_validates_and_reports_arguments_as_the_source() -> None:
    config = TracingConfig(sample_rate=0.2)
    assert (config.source_of("sample_rate"), config.source_of("flush_timeout")) == (
        "argument",
        "default",
    )
    with pytest.raises(ConfigurationError, match=r"max_open_runs=-1"):
        TracingConfig(max_open_runs=-1)


def test_options_given_as_lists_compare_equal_to_tuples() -> None:
    options: dict[str, Any] = {"exclude_tasks": ["a.*"], "redact_keys": ["x"]}
    assert TracingConfig(**options) == TracingConfig(exclude_tasks=("a.*",), redact_keys=("x",))


def test_the_sdks_tracing_switch_turns_tracing_off_too() -> None:
    done = run_python(
        """
from celery import Celery
from celery_langfuse import install

installation = install(Celery("sdk-off"))
print(installation.enabled, installation.off_reason)
""",
        LANGFUSE_TRACING_ENABLED="false",
        LANGFUSE_PUBLIC_KEY="pk-lf-x",
        LANGFUSE_SECRET_KEY="sk-lf-x",
    )
    assert done.returncode == 0, done.stderr
    assert "False disabled by LANGFUSE_TRACING_ENABLED=false" in done.stdout
