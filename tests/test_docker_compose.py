"""docker-compose.yml: valid, Langfuse's own v4 stack, the example wired to it, and the
example's services' commands working, run here as plain processes.

No Docker engine runs here, but ``docker-compose config`` validates the file (and the
v3 variant, docker-compose.langfuse-v3.yml) without one. CI installs the binary
(apt-get install -y --no-install-recommends docker-compose); elsewhere the tests skip
when it is missing, and fail under CI. What no test here can show (the images pull,
Langfuse starts and ingests) is listed in example_project/README.md.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from celery_langfuse.testing import CaptureServer
from tests.conftest import REDIS_URL, ROOT, require_redis

COMPOSE_FILE = ROOT / "docker-compose.yml"
V3_OVERRIDE = ROOT / "docker-compose.langfuse-v3.yml"

#: Langfuse's own docker-compose.yml for v4 (langfuse/langfuse, main, August 2026):
#: its services' images, checked against the file and Langfuse's self-hosting docs.
LANGFUSE_V4_IMAGES = {
    "langfuse-web": "docker.langfuse.com/langfuse/langfuse:4",
    "langfuse-worker": "docker.langfuse.com/langfuse/langfuse-worker:4",
    "clickhouse": "docker.io/clickhouse/clickhouse-server:25.12",
    "minio": "cgr.dev/chainguard/minio",
    "langfuse-redis": "docker.io/redis:7",
    "postgres": "docker.io/postgres:17",
}
#: The environment Langfuse's file gives langfuse-worker (and langfuse-web) without
#: its optional AI and in-app agent features, which are empty by default there.
LANGFUSE_V4_WORKER_ENV = {
    "NEXTAUTH_URL",
    "DATABASE_URL",
    "SALT",
    "ENCRYPTION_KEY",
    "TELEMETRY_ENABLED",
    "LANGFUSE_ENABLE_EXPERIMENTAL_FEATURES",
    "CLICKHOUSE_MIGRATION_URL",
    "CLICKHOUSE_URL",
    "CLICKHOUSE_USER",
    "CLICKHOUSE_PASSWORD",
    "CLICKHOUSE_CLUSTER_ENABLED",
    "LANGFUSE_S3_EVENT_UPLOAD_BUCKET",
    "LANGFUSE_S3_EVENT_UPLOAD_REGION",
    "LANGFUSE_S3_EVENT_UPLOAD_ACCESS_KEY_ID",
    "LANGFUSE_S3_EVENT_UPLOAD_SECRET_ACCESS_KEY",
    "LANGFUSE_S3_EVENT_UPLOAD_ENDPOINT",
    "LANGFUSE_S3_EVENT_UPLOAD_FORCE_PATH_STYLE",
    "LANGFUSE_S3_EVENT_UPLOAD_PREFIX",
    "LANGFUSE_S3_MEDIA_UPLOAD_BUCKET",
    "LANGFUSE_S3_MEDIA_UPLOAD_REGION",
    "LANGFUSE_S3_MEDIA_UPLOAD_ACCESS_KEY_ID",
    "LANGFUSE_S3_MEDIA_UPLOAD_SECRET_ACCESS_KEY",
    "LANGFUSE_S3_MEDIA_UPLOAD_ENDPOINT",
    "LANGFUSE_S3_MEDIA_UPLOAD_FORCE_PATH_STYLE",
    "LANGFUSE_S3_MEDIA_UPLOAD_PREFIX",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_AUTH",
}


def compose(*args: str, files: tuple[Path, ...] = (COMPOSE_FILE,)) -> str:
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
        [binary, *(arg for f in files for arg in ("-f", str(f))), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={key: value for key, value in os.environ.items() if not key.startswith("LANGFUSE_")},
    )
    assert finished.returncode == 0, finished.stderr
    return finished.stdout


def service(resolved: str, name: str) -> dict[str, object]:
    """``image``, ``command`` (a list) and ``environment`` (a dict) of one service in
    ``docker-compose config`` output (block style, two spaces a level)."""
    block = re.search(rf"^  {re.escape(name)}:\n((?:    .*\n|  *- .*\n|\n)*)", resolved, re.M)
    assert block is not None, name
    text = block.group(1)
    image = re.search(r"^    image: (\S+)$", text, re.M)
    command = re.search(r"^    command:\n((?:    - .*\n)+)", text, re.M)
    environment = re.search(r"^    environment:\n((?:      .*\n)+)", text, re.M)
    return {
        "image": image.group(1) if image else None,
        "command": [item.strip()[2:].strip("'") for item in command.group(1).splitlines()]
        if command
        else [],
        "environment": dict(
            (key.strip(), value.strip().strip("'"))
            for key, _, value in (line.partition(":") for line in environment.group(1).splitlines())
        )
        if environment
        else {},
    }


def test_compose_file_is_valid() -> None:
    compose("config", "-q")


def test_compose_runs_langfuse_and_the_example() -> None:
    assert set(compose("config", "--services").split()) == {
        *LANGFUSE_V4_IMAGES,
        "broker",
        "api",
        "worker",
        "beat",
    }


def test_langfuse_services_are_langfuses_own_v4_stack() -> None:
    resolved = compose("config")
    for name, image in LANGFUSE_V4_IMAGES.items():
        assert service(resolved, name)["image"] == image, name
    for name in ("langfuse-web", "langfuse-worker"):
        environment = service(resolved, name)["environment"]
        assert isinstance(environment, dict)
        missing = LANGFUSE_V4_WORKER_ENV - set(environment)
        assert missing == set(), (name, missing)
    web = service(resolved, "langfuse-web")["environment"]
    assert isinstance(web, dict)
    assert web["REDIS_HOST"] == "langfuse-redis"
    assert web["NEXTAUTH_SECRET"] and web["LANGFUSE_INIT_PROJECT_ID"] == "celery-demo"
    # the browser uploads media through the host's port; the worker inside the network
    worker = service(resolved, "langfuse-worker")["environment"]
    assert isinstance(worker, dict)
    assert web["LANGFUSE_S3_MEDIA_UPLOAD_ENDPOINT"] == "http://localhost:9090"
    assert worker["LANGFUSE_S3_MEDIA_UPLOAD_ENDPOINT"] == "http://minio:9000"


def test_example_services_use_the_keys_langfuse_creates_at_start() -> None:
    resolved = compose("config")

    def values(name: str) -> set[str]:
        return set(re.findall(rf"^\s+{name}: (\S+)$", resolved, flags=re.MULTILINE))

    assert values("LANGFUSE_PUBLIC_KEY") == values("LANGFUSE_INIT_PROJECT_PUBLIC_KEY") != set()
    assert values("LANGFUSE_SECRET_KEY") == values("LANGFUSE_INIT_PROJECT_SECRET_KEY") != set()
    assert values("LANGFUSE_BASE_URL") == {"http://langfuse-web:3000"}
    assert values("CELERY_BROKER_URL") == {"redis://broker:6379/0"}


def test_the_example_image_installs_sdk_5_for_v4_and_sdk_4_for_v3() -> None:
    v4 = compose("config")
    v3 = compose("config", files=(COMPOSE_FILE, V3_OVERRIDE))
    assert set(re.findall(r"LANGFUSE_SDK: (\S+)", v4)) == {"langfuse>=5,<6"}
    assert set(re.findall(r"LANGFUSE_SDK: (\S+)", v3)) == {"langfuse>=4.7,<5"}
    assert service(v3, "langfuse-web")["image"] == "docker.io/langfuse/langfuse:3"
    assert service(v3, "langfuse-worker")["image"] == "docker.io/langfuse/langfuse-worker:3"
    assert {service(v3, name)["image"] for name in ("api", "worker", "beat")} == {
        "celery-langfuse-example:sdk4"
    }
    dockerfile = (ROOT / "example_project" / "Dockerfile").read_text()
    assert 'ARG LANGFUSE_SDK="langfuse>=5,<6"' in dockerfile
    assert "pip install '.[demo]' \"$LANGFUSE_SDK\"" in dockerfile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_example_services_commands_trace_a_request_here(
    langfuse_capture: CaptureServer, tmp_path: Path
) -> None:
    """api, worker and beat as compose runs them, as plain processes on this machine:
    the local Redis for the broker, the capture server for Langfuse, a free port."""
    require_redis()
    resolved = compose("config")
    port = str(_free_port())
    queue = f"summaries-sdk-{uuid.uuid4().hex[:8]}"
    processes = []
    try:
        for name in ("api", "worker", "beat"):
            spec = service(resolved, name)
            env = {
                **os.environ,
                **spec["environment"],  # type: ignore[dict-item]
                **langfuse_capture.env,
                "CELERY_BROKER_URL": REDIS_URL,
                "CELERY_QUEUE": queue,
                "SUMMARIES_DATABASE": str(tmp_path / "summaries.sqlite3"),
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
                ),
            }
            command = [
                {
                    "0.0.0.0": "127.0.0.1",
                    "8000": port,
                    "/data/beat-schedule": str(tmp_path / "beat"),
                }.get(arg, arg)
                for arg in spec["command"]  # type: ignore[union-attr]
            ]
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", *command],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + 30
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            while True:
                try:
                    answer = http.post(
                        "/summaries",
                        headers={"Authorization": "Bearer alice", "X-Session-Id": "s-compose"},
                        json={"title": "Notes", "text": "Revenue grew in every region."},
                    )
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the api did not start"
                    time.sleep(0.3)
        assert answer.status_code < 300, answer.text
        langfuse_capture.wait_for(
            lambda s: any(
                o.name == "summaries.store_summary" and o.session_id == "s-compose"
                for o in s.observations
            ),
            timeout=45,
        )
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
    run = next(o for o in langfuse_capture.observations if o.name == "summaries.store_summary")
    assert run.user_id == "alice"
