"""docker-compose.yml: valid, the whole stack, and the example wired to its Langfuse.

No Docker engine runs here, but ``docker-compose config`` validates the file without
one. CI installs the binary (apt-get install -y --no-install-recommends docker-compose);
elsewhere the tests skip when it is missing, and fail under CI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"


def compose(*args: str) -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        message = (
            "docker-compose is not installed: "
            "apt-get install -y --no-install-recommends docker-compose"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    finished = subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={key: value for key, value in os.environ.items() if not key.startswith("LANGFUSE_")},
    )
    assert finished.returncode == 0, finished.stderr
    return finished.stdout


def test_compose_file_is_valid() -> None:
    compose("config", "-q")


def test_compose_runs_langfuse_and_the_example() -> None:
    assert set(compose("config", "--services").split()) == {
        "langfuse-web",
        "langfuse-worker",
        "postgres",
        "clickhouse",
        "minio",
        "langfuse-redis",
        "broker",
        "api",
        "worker",
        "beat",
    }


def test_example_services_use_the_keys_langfuse_creates_at_start() -> None:
    resolved = compose("config")

    def values(name: str) -> set[str]:
        return set(re.findall(rf"^\s+{name}: (\S+)$", resolved, flags=re.MULTILINE))

    assert values("LANGFUSE_PUBLIC_KEY") == values("LANGFUSE_INIT_PROJECT_PUBLIC_KEY") != set()
    assert values("LANGFUSE_SECRET_KEY") == values("LANGFUSE_INIT_PROJECT_SECRET_KEY") != set()
    assert values("LANGFUSE_BASE_URL") == {"http://langfuse-web:3000"}
    assert values("CELERY_BROKER_URL") == {"redis://broker:6379/0"}
