"""Helpers of the durable-mode tests: private queue servers, forwarder and producer
subprocesses, and the exactly-once check.

The shared Redis and RabbitMQ of the machine are never stopped: an outage test starts
a ``redis-server`` of its own on a free port, in a temporary directory, and kills that.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

import httpx
from redis import Redis

from celery_langfuse.durable import DurableQueue
from celery_langfuse.forwarder import Forwarder, LangfuseEndpoint, count_spans
from celery_langfuse.testing import PUBLIC_KEY, SECRET_KEY, CaptureServer
from tests.conftest import REDIS_URL, ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A ``redis-server`` of the test's own (no persistence), stoppable and restartable
    on the same port: a real outage that no other engineer's test notices."""

    def __init__(self, directory: Path, port: Optional[int] = None, *args: str) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.args = args
        self.process: Optional[subprocess.Popen[bytes]] = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.process = subprocess.Popen(
            [
                binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.directory), *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                Redis(port=self.port, socket_connect_timeout=0.5).ping()
                return
            except Exception:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise AssertionError(
                        f"redis-server on port {self.port} did not start"
                    ) from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: what a crash, a failover or a pulled cable looks like to clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def client(self) -> Redis:
        return Redis(port=self.port, socket_connect_timeout=2)


@contextmanager
def redis_server(directory: Path, *args: str) -> Iterator[RedisServer]:
    server = RedisServer(directory, None, *args)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def subprocess_env(capture: CaptureServer, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        **capture.env,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **extra,
    }


@contextmanager
def forwarder_process(
    capture: CaptureServer,
    queue_name: str,
    name: str,
    tmp_path: Path,
    *extra: str,
    url: str = REDIS_URL,
) -> Iterator[subprocess.Popen[bytes]]:
    """``celery-langfuse forward`` as a subprocess; its log is ``process.log`` after."""
    log_path = tmp_path / f"forwarder-{name}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "celery_langfuse.cli", "forward",
                "--redis-url", url, "--queue", queue_name, "--consumer", name,
                "--max-backoff", "0.3", "--timeout", "1", "--claim-timeout", "3", *extra,
            ],
            env=subprocess_env(capture),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    process.log_path = log_path  # type: ignore[attr-defined]
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        process.log = log_path.read_text(errors="replace")  # type: ignore[attr-defined]


_PRODUCER = textwrap.dedent(
    """
    import sys
    from langfuse import get_client
    from tests.support import tasks

    langfuse = get_client()  # after install(): the durable client
    for line in sys.stdin:
        command, *args = line.split()
        if command == "send":
            queue, first, count = args[0], int(args[1]), int(args[2])
            ids = []
            for i in range(first, first + count):
                # Publishing inside a trace records a "publish" observation here.
                with langfuse.start_as_current_observation(name=f"request-{i}"):
                    ids.append(tasks.add.apply_async((i, i), queue=queue).id)
            print(" ".join(ids), flush=True)
        elif command == "exit":
            break
    """
)


class Producer:
    """A durable-mode process that publishes tasks when told to: its ``publish``
    observations go through its own durable exporter."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process

    def send(self, queue: str, first: int, count: int) -> list[str]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"send {queue} {first} {count}\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().split()


@contextmanager
def producer_process(env: dict[str, str], tmp_path: Path) -> Iterator[Producer]:
    log_path = tmp_path / "producer.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", _PRODUCER],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
    producer = Producer(process)
    producer.log_path = log_path  # type: ignore[attr-defined]
    try:
        yield producer
    finally:
        if process.poll() is None:
            assert process.stdin is not None
            process.stdin.write("exit\n")
            process.stdin.close()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def delivered_once(capture: CaptureServer, ids: set[str]) -> None:
    """Every span id of ``ids`` reached the sink, each exactly once."""
    deliveries = capture.deliveries
    missing = ids - set(deliveries)
    repeated = {span_id: n for span_id, n in deliveries.items() if span_id in ids and n != 1}
    assert not missing, f"{len(missing)} of {len(ids)} spans never arrived"
    assert not repeated, f"spans delivered more than once: {repeated}"


class LimitingProxy:
    """Langfuse with a request size limit: 413 for a request of more than ``limit``
    spans, else the request goes on to the capture server, whose answer (status,
    ``Retry-After``) comes back. (The capture server has no size limit to configure;
    this stands in for Langfuse's body size limit.) ``requests`` records each one:
    (arrival on this machine's monotonic clock, spans, status)."""

    def __init__(self, target: str, limit: Optional[int] = None) -> None:
        self.limit = limit
        self.requests: list[tuple[float, int, int]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                arrived = time.monotonic()
                body = self.rfile.read(int(self.headers["Content-Length"]))
                spans = count_spans(body)
                headers: dict[str, str] = {}
                if proxy.limit is not None and spans > proxy.limit:
                    status, text = 413, b"payload too large"
                else:
                    answer = httpx.post(
                        target + self.path,
                        content=body,
                        headers={k: v for k, v in self.headers.items() if k != "Host"},
                    )
                    status, text = answer.status_code, answer.content
                    if "retry-after" in answer.headers:
                        headers["Retry-After"] = answer.headers["retry-after"]
                proxy.requests.append((arrived, spans, status))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def sizes(self) -> list[int]:
        """The span count of each request, in arrival order."""
        return [spans for _, spans, _ in self.requests]

    def forwarder(self, queue: DurableQueue, **options: Any) -> Forwarder:
        """A forwarder of ``queue`` that sends through this proxy."""
        options.setdefault("max_backoff", 0.1)
        options.setdefault("block", 0.1)
        return Forwarder(
            queue, LangfuseEndpoint(self.url, PUBLIC_KEY, SECRET_KEY, timeout=5), **options
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def by_task_id(observations: list[Any], prefix: str) -> dict[str, list[Any]]:
    """Observations whose name starts with ``prefix``, grouped by their task id."""
    grouped: dict[str, list[Any]] = {}
    for observation in observations:
        if observation.name.startswith(prefix):
            grouped.setdefault(observation.metadata.get("task_id"), []).append(observation)
    return grouped


class RabbitNode:
    """A RabbitMQ node of the test's own (no plugins), on free ports, in a temporary
    directory: the machine's shared broker is never restarted. ``kill`` is SIGKILL of
    the node's VM (a crash); ``start`` again recovers its durable queues."""

    def __init__(self) -> None:
        # Not under pytest's tmp_path: the node runs as the rabbitmq user, which must
        # be able to reach its directory.
        directory = Path(tempfile.mkdtemp(prefix="durable-rabbit-"))
        directory.chmod(0o755)
        self.directory = directory
        self.port = free_port()
        self.name = f"durable-{uuid.uuid4().hex[:8]}@localhost"
        self.process: Optional[subprocess.Popen[bytes]] = None
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "enabled_plugins").write_text("[].\n")
        (directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {self.port}\nloopback_users = none\n"
        )
        for sub in ("mnesia", "log"):
            (directory / sub).mkdir(exist_ok=True)
        # rabbitmq-server runs the node as the rabbitmq user when started as root.
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(directory)], check=False)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> None:
        binary = shutil.which("rabbitmq-server")
        assert binary, "rabbitmq-server is not installed"
        d = self.directory
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_MNESIA_DIR": str(d / "mnesia" / "node"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(d / "mnesia" / "feature_flags"),
            "RABBITMQ_QUORUM_DIR": str(d / "mnesia" / "quorum"),
            "RABBITMQ_STREAM_DIR": str(d / "mnesia" / "stream"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(d / "plugins-expand"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
            "RABBITMQ_PID_FILE": str(d / "pid"),
        }
        with open(d / "out.log", "ab") as out:
            self.process = subprocess.Popen([binary], env=env, stdout=out, stderr=out)
        deadline = time.monotonic() + 90
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                import amqp

                connection = amqp.Connection(f"127.0.0.1:{self.port}", connect_timeout=2)
                connection.connect()
                connection.close()
                return
            except Exception:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise AssertionError(
                        f"RabbitMQ node {self.name} did not start:\n"
                        + (d / "out.log").read_text(errors="replace")[-2000:]
                    ) from None
                time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM, as a crash would."""
        pid_file = self.directory / "pid"
        if pid_file.exists() and pid_file.read_text().strip().isdigit():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
            pid_file.unlink()
        if self.process is not None:
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            self.process = None

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)
