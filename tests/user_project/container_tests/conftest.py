"""pytest-celery's worker container, tracing to this session's capture server.

Needs a Docker engine. The container reaches the capture server on the host through
``host.docker.internal`` (Docker's host-gateway), so the server binds 0.0.0.0.
"""

from pathlib import Path

import pytest
from pytest_celery import (
    DEFAULT_WORKER_CONTAINER_TIMEOUT,
    DEFAULT_WORKER_VOLUME,
    CeleryWorkerContainer,
)
from pytest_docker_tools import build, container, fxtr

from container_tests import langfuse_worker_signals


@pytest.fixture(scope="session")
def langfuse_capture_host():
    return "0.0.0.0"


langfuse_worker_image = build(
    path=str(Path(__file__).parent / "worker"),
    tag="myapp/celery-langfuse-worker:test",
)

default_worker_container = container(
    image="{langfuse_worker_image.id}",
    ports=fxtr("default_worker_ports"),
    environment=fxtr("default_worker_env"),
    network="{default_pytest_celery_network.name}",
    volumes={"{default_worker_volume.name}": DEFAULT_WORKER_VOLUME},
    wrapper_class=CeleryWorkerContainer,
    timeout=DEFAULT_WORKER_CONTAINER_TIMEOUT,
    command=fxtr("default_worker_command"),
    extra_hosts={"host.docker.internal": "host-gateway"},
)


@pytest.fixture
def default_worker_env(default_worker_env, langfuse_capture):
    capture_url = f"http://host.docker.internal:{langfuse_capture.port}"
    return {**default_worker_env, **langfuse_capture.env_for(capture_url)}


@pytest.fixture
def default_worker_signals(default_worker_signals):
    return {*default_worker_signals, langfuse_worker_signals}
