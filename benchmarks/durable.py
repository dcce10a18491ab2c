"""Durable mode measured: Redis and RabbitMQ side by side, with direct export to compare.

Three phases, each against local servers only (a ``redis-server`` of its own on a free
port, the machine's RabbitMQ with queues named ``durable-bench-...``, and a local
sink standing in for Langfuse):

``throughput``
    Fill each queue with ``--spans`` spans (default 1,000,000) in batches of 512
    realistic task-run spans (gzip OTLP, as the exporter writes them), measure the
    queue's memory, then drain it into the sink (``benchmarks/sink.py``) with one
    ``celery-langfuse forward`` process, and again with two: spans per second.
``cost``
    The worker's CPU per task (a ``celery worker -P solo``, ``--tasks`` trivial tasks
    of ``benchmarks/bench_app.py``): tracing off, direct export to the sink, and
    durable export to each queue. The difference is what durable mode adds per task.
``latency``
    A steady load of ``--traces-per-day`` traces of ``--observations`` observations
    each (default 10 million x 5 = 579 spans/s) for ``--seconds``, from a process
    exporting through the SDK's batch span processor (512 spans or 5 s, Langfuse's
    defaults): directly to the sink, and through each queue and one forwarder. The
    sink decodes every request and records each span's delay from its end to its
    arrival: p50 and p99.

Run (about 3 minutes with the small sizes; the defaults take much longer):

    PYTHONPATH=src:. python benchmarks/durable.py --spans 100000 --tasks 2000 --seconds 20

Prints a table per phase and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import httpx  # noqa: E402
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import (  # noqa: E402
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from redis import Redis  # noqa: E402

from celery_langfuse.durable import DurableSpanExporter, open_queue  # noqa: E402

AMQP_URL = os.environ.get("CELERY_LANGFUSE_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
BROKER = os.environ.get("CELERY_LANGFUSE_BENCH_BROKER", "redis://127.0.0.1:6379/8")
KEYS = {"LANGFUSE_PUBLIC_KEY": "pk-lf-bench", "LANGFUSE_SECRET_KEY": "sk-lf-bench"}
BATCH_SPANS = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(sink_port: int, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        **KEYS,
        "LANGFUSE_BASE_URL": f"http://127.0.0.1:{sink_port}",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        **extra,
    }
    env.pop("LANGFUSE_FLUSH_INTERVAL", None)  # the SDK's production batching
    env.pop("LANGFUSE_FLUSH_AT", None)
    return env


# -- servers ---------------------------------------------------------------------------


class OwnRedis:
    """A ``redis-server`` of the benchmark's own: its memory is the queue's alone."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port),
             "--save", "", "--appendonly", "no", "--dir", str(directory)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 20
        while True:
            try:
                Redis(port=self.port).ping()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def used_memory(self) -> int:
        return int(Redis(port=self.port).info("memory")["used_memory"])

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


class LeanSink:
    """``benchmarks/sink.py`` in a subprocess: answers 200, counts requests."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "sink.py"), str(self.port)],
            stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        self.process.stdout.readline()  # "ready"

    def requests(self) -> int:
        stats = httpx.get(f"http://127.0.0.1:{self.port}/__stats").json()
        return int(sum(stats["requests"].values()))

    def reset(self) -> None:
        httpx.post(f"http://127.0.0.1:{self.port}/__reset")

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


class DelaySink:
    """A sink that decodes each OTLP request and records, for every span, the delay
    from the span's end to its arrival (this machine's clock on both sides)."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        self.delays: list[float] = []
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                now = time.time_ns()
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                delays = [
                    (now - span.end_time_unix_nano) / 1e9
                    for resource in request.resource_spans
                    for scope in resource.scope_spans
                    for span in scope.spans
                ]
                with sink.lock:
                    sink.delays.extend(delays)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


def forwarder(
    url: str, queue: str, sink_port: int, name: str, logs: Path
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "celery_langfuse.cli", "forward", "--url", url, "--queue", queue,
         "--consumer", name, "--batch-size", "8", "--log-level", "WARNING"],
        env=child_env(sink_port),
        stdout=open(logs / f"forwarder-{name}.log", "ab"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip


def stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- spans -----------------------------------------------------------------------------


def task_run_spans(n: int, tracer_provider: Optional[TracerProvider] = None) -> list[ReadableSpan]:
    """``n`` spans shaped like a task run: name, input/output JSON, a few metadata."""
    memory = InMemorySpanExporter()
    provider = tracer_provider or TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("celery-langfuse-bench")
    for i in range(n):
        with tracer.start_as_current_span("proj.tasks.send_invoice") as span:
            span.set_attribute("langfuse.observation.type", "span")
            span.set_attribute(
                "langfuse.observation.input",
                json.dumps({"args": [random.randrange(10**9)], "kwargs": {"customer": f"c-{i}"}}),
            )
            span.set_attribute("langfuse.observation.output", json.dumps({"sent": True}))
            span.set_attribute("langfuse.observation.metadata.task_id", str(uuid.uuid4()))
            span.set_attribute("langfuse.observation.metadata.queue", "celery")
            span.set_attribute("langfuse.observation.metadata.retries", 0)
            span.set_attribute("langfuse.environment", "production")  # fmt: skip
    return list(memory.get_finished_spans())


def encoded_batches(distinct: int) -> list[bytes]:
    return [
        gzip.compress(encode_spans(task_run_spans(BATCH_SPANS)).SerializePartialToString(), 6)
        for _ in range(distinct)
    ]


# -- phases ----------------------------------------------------------------------------


@dataclass
class Engine:
    name: str
    url: str


def throughput(engine: Engine, args: argparse.Namespace, sink: LeanSink, logs: Path,
               redis: Optional[OwnRedis]) -> dict[str, Any]:  # fmt: skip
    batches = encoded_batches(20)
    count = max(1, args.spans // BATCH_SPANS)
    queue_name = f"durable-bench-{uuid.uuid4().hex[:6]}"
    queue = open_queue(engine.url, queue_name, 4 * 1024**3)
    result: dict[str, Any] = {"engine": engine.name, "spans": count * BATCH_SPANS}
    payload = 0
    for forwarders in (1, 2):
        before = redis.used_memory() if redis else 0
        started = time.perf_counter()
        for i in range(count):
            queue.append(batches[i % len(batches)], BATCH_SPANS, 4 * 1024**3)
            payload += len(batches[i % len(batches)]) if forwarders == 1 else 0
        fill_seconds = time.perf_counter() - started
        if forwarders == 1:
            result["fill_spans_per_s"] = round(count * BATCH_SPANS / fill_seconds)
            if redis is not None:
                result["queue_mib_per_million_spans"] = round(
                    (redis.used_memory() - before) / 2**20 / (count * BATCH_SPANS) * 1e6, 1
                )
            else:
                result["queue_mib_per_million_spans"] = rabbit_memory(queue_name, count)
            result["payload_bytes_per_span"] = round(payload / (count * BATCH_SPANS), 1)
        sink.reset()
        processes = [
            forwarder(engine.url, queue_name, sink.port, f"{engine.name}-{forwarders}-{i}", logs)
            for i in range(forwarders)
        ]
        # Timed from the first batch's arrival: the forwarders' start-up (imports,
        # connecting) is not throughput.
        deadline = time.monotonic() + args.timeout
        while sink.requests() == 0 and time.monotonic() < deadline:
            time.sleep(0.002)
        started, first = time.perf_counter(), sink.requests()
        while sink.requests() < count and time.monotonic() < deadline:
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        delivered = sink.requests()
        for process in processes:
            stop(process)
        result[f"forwarders_{forwarders}_spans_per_s"] = round(
            (delivered - first) * BATCH_SPANS / seconds
        )
        result[f"forwarders_{forwarders}_delivered"] = delivered * BATCH_SPANS
    queue.close()
    delete_queue(engine, queue_name, redis)
    return result


def rabbit_memory(queue_name: str, batches: int) -> Optional[float]:
    """RabbitMQ's own view of the queue: payload bytes held plus the queue process's
    memory, per million spans (rabbitmqctl, as root on the broker's host)."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return None
    done = subprocess.run(
        [ctl, "list_queues", "-q", "name", "message_bytes", "memory", "--formatter", "json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    for row in json.loads(done.stdout or "[]"):
        if row["name"] == queue_name:
            total = int(row["message_bytes"]) + int(row["memory"])
            return round(total / 2**20 / (batches * BATCH_SPANS) * 1e6, 1)
    return None


def delete_queue(engine: Engine, queue_name: str, redis: Optional[OwnRedis]) -> None:
    if engine.name == "rabbitmq":
        import amqp

        connection = amqp.Connection("127.0.0.1:5672")
        connection.connect()
        channel = connection.channel()
        for name in (queue_name, f"{queue_name}.dropped", f"{queue_name}.dead"):
            channel.queue_delete(name)
        connection.close()
    elif redis is not None:
        Redis(port=redis.port).flushdb()  # the benchmark's own server


def cost(mode: str, url: Optional[str], args: argparse.Namespace, sink: LeanSink,
         logs: Path) -> dict[str, Any]:  # fmt: skip
    run = f"durable-bench-{mode}-{uuid.uuid4().hex[:6]}"
    extra = {
        "CELERY_LANGFUSE_BENCH_BROKER": BROKER,
        "CELERY_LANGFUSE_BENCH_QUEUE": f"{run}-tasks",
        "CELERY_LANGFUSE_BENCH_RUN": run,
        "CELERY_LANGFUSE_BENCH_TASKS": str(args.tasks),
        "CELERY_LANGFUSE_BENCH_TRACING": "0" if mode == "off" else "1",
    }
    if url:
        extra["CELERY_LANGFUSE_BENCH_DURABLE_URL"] = url
        extra["CELERY_LANGFUSE_BENCH_DURABLE_QUEUE"] = f"{run}-spans"
    env = child_env(sink.port, **extra)
    # This process only publishes: the app without tracing, on the same broker.
    os.environ.update(CELERY_LANGFUSE_BENCH_TRACING="0", CELERY_LANGFUSE_BENCH_BROKER=BROKER)
    from benchmarks import bench_app

    with bench_app.app.producer_or_acquire() as producer:
        for i in range(args.tasks):
            bench_app.app.send_task("benchmarks.bench_app.unit", (i,), queue=f"{run}-tasks",
                                    producer=producer)  # fmt: skip
    broker = Redis.from_url(BROKER)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "benchmarks.bench_app", "worker", "-P", "solo",
         "-Q", f"{run}-tasks", "-n", f"{run}@%h", "-l", "WARNING", "--without-mingle",
         "--without-gossip", "--without-heartbeat"],
        cwd=ROOT, env=env, stdout=open(logs / f"{run}-worker.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + args.timeout
        while broker.get(f"{run}:start") is None and time.monotonic() < deadline:
            time.sleep(0.005)
        cpu_start, wall_start = cpu_seconds(worker.pid), time.perf_counter()
        while broker.get(f"{run}:end") is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(6)  # the SDK's last export (5 s interval) is part of the cost
        cpu = cpu_seconds(worker.pid) - cpu_start
        wall = time.perf_counter() - wall_start - 6
    finally:
        stop(worker)
        broker.delete(f"{run}:start", f"{run}:warm", f"{run}:end", f"{run}:done")
    if url:
        delete_queue(Engine("rabbitmq" if url.startswith("amqp") else "redis", url),
                     f"{run}-spans", None)  # fmt: skip
        if not url.startswith("amqp"):
            queue = open_queue(url, f"{run}-spans")
            queue.redis.delete(queue.stream, queue.stats_key)  # type: ignore[attr-defined]
    return {"mode": mode, "tasks": args.tasks, "cpu_ms_per_task": round(cpu / args.tasks * 1e3, 3),
            "tasks_per_s": round(args.tasks / wall)}  # fmt: skip


def direct_exporter(endpoint: str) -> SpanExporter:
    """The SDK's OTLP/HTTP exporter to the sink: direct mode's path for SDK spans."""
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint, compression=Compression.Gzip)


def latency(mode: str, url: Optional[str], args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    sink = DelaySink()
    queue_name = f"durable-bench-lat-{uuid.uuid4().hex[:6]}"
    exporter: SpanExporter
    process = None
    if url is None:
        exporter = direct_exporter(f"http://127.0.0.1:{sink.port}/api/public/otel/v1/traces")
    else:
        exporter = DurableSpanExporter(open_queue(url, queue_name, 256 * 1024**2))
        exporter.queue.ping()  # declares a RabbitMQ queue before the forwarder looks
        process = forwarder(url, queue_name, sink.port, f"lat-{mode}", logs)
    provider = TracerProvider()
    provider.add_span_processor(
        BatchSpanProcessor(exporter, max_export_batch_size=512, schedule_delay_millis=5000)
    )
    tracer = provider.get_tracer("celery-langfuse-bench")
    rate = args.traces_per_day * args.observations / 86_400
    total = int(rate * args.seconds)
    started = time.perf_counter()
    for i in range(total):
        # Open loop: each span ends at its scheduled time, however the exporter does.
        due = started + i / rate
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        with tracer.start_as_current_span("proj.tasks.step") as span:
            span.set_attribute("langfuse.observation.metadata.i", i)
    produced_in = time.perf_counter() - started
    provider.force_flush()
    deadline = time.monotonic() + args.timeout
    while len(sink.delays) < total and time.monotonic() < deadline:
        time.sleep(0.05)
    if process is not None:
        stop(process)
    provider.shutdown()
    sink.stop()
    if url is not None:
        delete_queue(Engine("rabbitmq" if url.startswith("amqp") else "redis", url),
                     queue_name, None)  # fmt: skip
    delays = sorted(sink.delays)
    pick = lambda q: round(delays[min(len(delays) - 1, int(q * len(delays)))], 3)  # noqa: E731
    return {"mode": mode, "spans_per_s": round(total / produced_in), "spans": total,
            "arrived": len(delays), "p50_s": pick(0.5), "p99_s": pick(0.99),
            "max_s": round(delays[-1], 3) if delays else None}  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=1_000_000, help="spans per queue (throughput)")
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks per mode (cost)")
    parser.add_argument("--seconds", type=float, default=120, help="steady load length (latency)")
    parser.add_argument("--traces-per-day", type=float, default=10_000_000)
    parser.add_argument("--observations", type=int, default=5, help="observations per trace")
    parser.add_argument("--phases", default="throughput,cost,latency")
    parser.add_argument("--engines", default="redis,rabbitmq")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "durable.json"))
    args = parser.parse_args()

    logs = Path("/tmp") / f"durable-bench-{os.getpid()}"
    logs.mkdir(parents=True, exist_ok=True)
    redis = OwnRedis(logs / "redis")
    engines = {"redis": Engine("redis", redis.url), "rabbitmq": Engine("rabbitmq", AMQP_URL)}
    chosen = [engines[name] for name in args.engines.split(",")]
    phases = args.phases.split(",")
    results: dict[str, Any] = {"args": vars(args)}
    sink = LeanSink()
    try:
        if "throughput" in phases:
            results["throughput"] = [
                throughput(e, args, sink, logs, redis if e.name == "redis" else None)
                for e in chosen
            ]
            print(table(results["throughput"]), flush=True)
        if "cost" in phases:
            modes = [("off", None), ("direct", None)] + [
                (f"durable-{e.name}", e.url) for e in chosen
            ]
            results["cost"] = [cost(mode, url, args, sink, logs) for mode, url in modes]
            print(table(results["cost"]), flush=True)
        if "latency" in phases:
            modes = [("direct", None)] + [(f"durable-{e.name}", e.url) for e in chosen]
            results["latency"] = [latency(mode, url, args, logs) for mode, url in modes]
            print(table(results["latency"]), flush=True)
    finally:
        sink.stop()
        redis.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"logs in {logs}; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
