"""``celery-langfuse doctor -A app``: settings and their sources, signals, and whether
Langfuse answers, run as a real command against the capture server and a closed port."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from typing import Optional

import pytest

from celery_langfuse.testing import SECRET_KEY, CaptureServer
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(60)


def doctor(
    env: dict[str, str], *args: str, app: str = "tests.support.tasks"
) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("LANGFUSE_", "CELERY_LANGFUSE_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "celery_langfuse.cli", "doctor", "-A", app, *args],
        env={**clean, "PYTHONPATH": os.pathsep.join(sys.path), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )


def setting_line(output: str, name: str) -> Optional[list[str]]:
    """``[value, source]`` of one setting in doctor's table."""
    match = re.search(rf"^  {name} +(\S.*?)  +(\S.*)$", output, re.MULTILINE)
    return [match.group(1).strip(), match.group(2).strip()] if match else None


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_doctor_reports_settings_sources_signals_and_a_langfuse_that_accepts_the_keys(
    langfuse_capture: CaptureServer,
) -> None:
    done = doctor(
        {
            **langfuse_capture.env,
            "CELERY_LANGFUSE_PRESET": "production",
            "CELERY_LANGFUSE_SAMPLE_RATE": "0.3",
            "CELERY_LANGFUSE_SAMPLE_RAET": "0.5",
        }
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert setting_line(out, "preset") == ["production", "CELERY_LANGFUSE_PRESET"]
    assert setting_line(out, "sample_rate") == ["0.3", "CELERY_LANGFUSE_SAMPLE_RATE"]
    assert setting_line(out, "flush_at") == ["25", "preset production"]
    assert setting_line(out, "flush_interval") == ["0.1", "LANGFUSE_FLUSH_INTERVAL"]
    assert setting_line(out, "flush_timeout") == ["3.0", "install()"]
    assert setting_line(out, "exclude_tasks") == ["celery.*", "default"]
    assert "CELERY_LANGFUSE_SAMPLE_RAET is not a celery-langfuse setting" in out
    assert "before_task_publish: connected" in out
    assert "task_prerun: connected" in out
    assert "task_postrun: connected" in out
    assert "answered and accepted the keys" in out
    assert "sk-lf-****" in out
    assert SECRET_KEY not in out + done.stderr
    assert out.rstrip().endswith("No problems found.")


def test_doctor_reports_an_unreachable_langfuse_within_the_timeout(
    langfuse_capture: CaptureServer,
) -> None:
    env = {**langfuse_capture.env, "LANGFUSE_BASE_URL": f"http://127.0.0.1:{closed_port()}"}
    started = time.monotonic()
    done = doctor(env, "--timeout", "3")
    assert time.monotonic() - started < 30
    assert done.returncode == 1
    assert "PROBLEM: cannot reach Langfuse" in done.stdout
    assert "1 problem(s) found." in done.stdout


def test_doctor_reports_missing_keys_and_tracing_off(langfuse_capture: CaptureServer) -> None:
    env = {"LANGFUSE_BASE_URL": langfuse_capture.base_url}
    done = doctor(env)
    assert done.returncode == 1
    assert "PROBLEM: tracing: off for app 'support'" in done.stdout
    assert "PROBLEM: LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY must both be set" in done.stdout
    assert "none connected (tracing is off)" in done.stdout
    assert "not checked: no keys" in done.stdout


def test_doctor_shows_a_configuration_error_as_it_would_happen(
    langfuse_capture: CaptureServer,
) -> None:
    done = doctor({**langfuse_capture.env, "CELERY_LANGFUSE_SAMPLE_RATE": "1.5"})
    assert done.returncode == 1
    assert (
        "cannot load 'tests.support.tasks': ConfigurationError: celery-langfuse setting "
        "CELERY_LANGFUSE_SAMPLE_RATE='1.5': must be a number from 0 to 1"
    ) in done.stdout


def test_doctor_says_when_the_app_never_called_install(langfuse_capture: CaptureServer) -> None:
    done = doctor(
        {**langfuse_capture.env, "CELERY_LANGFUSE_TEST_INSTALL": "0"}, app="tests.support.tasks:app"
    )
    assert done.returncode == 1
    assert "PROBLEM: install(app) was not called when tests.support.tasks:app was imported" in (
        done.stdout
    )
    assert setting_line(done.stdout, "sample_rate") == ["1.0", "default"]


def test_doctor_is_the_celery_langfuse_console_script() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    scripts = pyproject.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    assert 'celery-langfuse = "celery_langfuse.cli:main"' in scripts
    done = subprocess.run(
        [sys.executable, "-m", "celery_langfuse.cli", "--help"],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0
    assert "doctor" in done.stdout
