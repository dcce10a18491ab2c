"""docs/testing.md, followed as a user would: its example project (tests/user_project,
the files the page shows, byte for byte) passes in its own pytest run, with
pytest-celery enabled, without it, and with ``celery.contrib.pytest`` instead; and
pytest-celery's worker container configuration holds together without Docker."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from celery import Celery
from pytest_celery import CeleryWorkerContainer

from celery_langfuse.testing import (
    ORACLE_ENV,
    CaptureServer,
    LangfuseOracle,
    OracleUnavailable,
    compare_with_langfuse,
    find_langfuse_oracle,
)
from tests.conftest import REDIS_URL, require_redis, worker_process

ROOT = Path(__file__).resolve().parent.parent
PROJECT = Path(__file__).resolve().parent / "user_project"
DOCS = ROOT / "docs" / "testing.md"
SHOWN_FILES = [
    "pyproject.toml",
    "myapp/celery.py",
    "myapp/tasks.py",
    "tests/conftest.py",
    "tests/test_checkout.py",
    "container_tests/conftest.py",
    "container_tests/langfuse_worker_signals.py",
    "container_tests/test_in_container.py",
    "container_tests/worker/Dockerfile",
]
PING = "pytest_celery.vendors.worker.tasks.ping"


def shown_in_docs() -> dict[str, str]:
    """The code blocks of docs/testing.md, by the **`path`** line above each."""
    blocks = re.findall(
        r"^\*\*`([^`]+)`\*\*\n\n```[a-z]*\n(.*?)^```$", DOCS.read_text(), re.M | re.S
    )
    return dict(blocks)


@pytest.mark.parametrize("path", SHOWN_FILES)
def test_the_docs_show_the_example_project_as_it_is(path: str) -> None:
    assert shown_in_docs().get(path) == (PROJECT / path).read_text()


def user_env() -> dict[str, str]:
    """A user's shell: no Langfuse keys (the plugin sets them), brokers on this run's
    Redis, and this run's oracle if it has one."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LANGFUSE_")}
    env.update(CELERY_BROKER_URL=REDIS_URL, CELERY_RESULT_BACKEND=REDIS_URL)
    with contextlib.suppress(OracleUnavailable):
        env[ORACLE_ENV] = str(find_langfuse_oracle(ROOT))
    return env


def run_pytest(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=project,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    copy = tmp_path / "project"
    shutil.copytree(PROJECT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@pytest.mark.parametrize(
    "plugins",
    [
        pytest.param([], id="pytest-celery-enabled"),
        pytest.param(["-p", "no:celery"], id="without-pytest-celery"),
        pytest.param(
            ["-p", "no:celery", "-p", "celery.contrib.pytest"], id="celery-contrib-pytest"
        ),
    ],
)
def test_the_docs_example_passes_as_written(project: Path, plugins: list[str]) -> None:
    require_redis()

    # The test module imports myapp.tasks (so install(app)) at collection, before the
    # capture fixture sets the keys: the harness must trace it anyway.
    done = run_pytest(project, "-q", *plugins)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    if ORACLE_ENV in user_env():
        assert "0 rejected, 0 differences" in done.stdout, done.stdout


def test_langfuse_worker_says_how_to_name_the_app(project: Path) -> None:
    (project / "tests" / "conftest.py").write_text("")

    done = run_pytest(project, "-q")

    assert done.returncode == 1
    assert "langfuse_worker needs your Celery app: add to conftest.py" in done.stdout
    assert "def langfuse_celery_app():" in done.stdout


def test_langfuse_worker_refuses_an_app_that_does_not_trace(project: Path) -> None:
    celery_py = project / "myapp" / "celery.py"
    celery_py.write_text(
        celery_py.read_text().replace("install(app)", "install(app, enabled=False)")
    )

    done = run_pytest(project, "-q")

    assert done.returncode == 1
    assert "tracing is off for 'myapp': disabled by enabled=False" in done.stdout


def test_without_the_oracle_the_comparison_is_skipped_with_one_line(project: Path) -> None:
    env = {key: value for key, value in user_env().items() if key != ORACLE_ENV}

    require_redis()

    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    header = [line for line in done.stdout.splitlines() if line.startswith("langfuse oracle:")]
    assert header == [
        f"langfuse oracle: skipped: Langfuse oracle not found at "
        f"{project}/../shared/langfuse-oracle/langfuse-otel.cjs ({ORACLE_ENV} is not set); "
        f"set {ORACLE_ENV} to its folder"
    ]


def test_a_required_oracle_that_is_missing_stops_the_run(project: Path) -> None:
    env = {**user_env(), ORACLE_ENV: str(project / "no-such-oracle")}
    for args in (["--langfuse-oracle=require"], ["-o", "langfuse_oracle=ci"]):
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
            cwd=project,
            env={**env, "CI": "true"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

        assert done.returncode == 4, done.stdout + done.stderr  # a usage error
        assert "langfuse_oracle=require: Langfuse oracle not found at" in done.stderr


def test_a_required_oracle_without_node_stops_the_run(project: Path, tmp_path: Path) -> None:
    no_node = tmp_path / "bin"
    no_node.mkdir()
    oracle = tmp_path / "langfuse-otel.cjs"
    oracle.write_text("// found, but nothing can run it\n")

    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "langfuse_oracle=ci"],
        cwd=project,
        env={**user_env(), ORACLE_ENV: str(oracle), "PATH": str(no_node), "CI": "true"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 4, done.stdout + done.stderr
    assert "langfuse_oracle=require: node (>= 20) is not on PATH" in done.stderr


# pytest-celery's worker container: everything but the container itself.


def test_the_container_setup_collects_and_plans_without_docker(project: Path) -> None:
    done = run_pytest(project, "--setup-plan", "container_tests")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "test_a_task_in_the_worker_container_is_traced" in done.stdout
    assert "langfuse_capture_host" in done.stdout


def test_the_worker_image_installs_celery_langfuse() -> None:
    dockerfile = (PROJECT / "container_tests" / "worker" / "Dockerfile").read_text()

    assert re.search(r"^RUN pip install .*\$\{CELERY_LANGFUSE_PKG\}", dockerfile, re.M)
    assert "ARG CELERY_LANGFUSE_PKG=celery-langfuse" in dockerfile


def this_hosts_address() -> str:
    """The address other machines (a container, through Docker's bridge) reach this
    host at: the interface of the default route; 127.0.0.1 when there is none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def test_the_worker_containers_app_traces_to_a_capture_server_on_the_host(
    tmp_path: Path,
) -> None:
    """What pytest-celery would mount into the container, run here by a real ``celery
    worker``: its app module imports langfuse_worker_signals, and the worker exports to
    a capture server bound to 0.0.0.0 through a non-loopback address of this host (the
    run inside Docker cannot happen here: there is no Docker engine)."""
    require_redis()
    sys.path.insert(0, str(PROJECT))
    try:
        from container_tests import langfuse_worker_signals
    finally:
        sys.path.remove(str(PROJECT))
    content = CeleryWorkerContainer.initial_content(
        worker_signals={langfuse_worker_signals}, worker_app=Celery("celery_test_app")
    )
    app_dir = tmp_path / "app"
    for name, data in content.items():
        (app_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (app_dir / name).write_bytes(data)
    assert "from container_tests.langfuse_worker_signals import *" in content["app.py"].decode()

    queue = f"oracle-container-{uuid.uuid4().hex[:8]}"
    with CaptureServer(host="0.0.0.0") as server:
        base_url = f"http://{this_hosts_address()}:{server.port}"
        env = {"PYTHONPATH": str(app_dir), "CELERY_BROKER_URL": REDIS_URL}
        with worker_process(
            server.env_for(base_url), queue=queue, env=env, tmp_path=tmp_path, module="app"
        ):
            Celery(broker=REDIS_URL).send_task(PING, queue=queue)
            server.wait_for_observations(1, name=PING, timeout=30)
        (run,) = [obs for obs in server.observations if obs.name == PING]
        assert run.level == "DEFAULT"
        try:
            oracle = LangfuseOracle(find_langfuse_oracle(ROOT))
        except OracleUnavailable:
            return  # the session's comparison says why it is off
        with oracle:
            comparison = compare_with_langfuse(server.bodies, oracle)
        assert comparison.ok, comparison.report()
