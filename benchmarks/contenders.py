"""The tracers under comparison, each set up the way its documentation says.

Every benchmark process (producer or worker) calls :func:`setup` once for the
contender named in ``BENCH_CONTENDER``, then uses :func:`active_trace` to open the
"incoming request" that a traced producer publishes from, and :func:`flush` to send
what is buffered. All exporters point at the local sink in ``BENCH_SINK_URL``.

- ``plain``: Celery alone.
- ``celery-langfuse``: ``install(app)`` with default settings (input/output capture on).
- ``otel``: ``opentelemetry-instrumentation-celery`` with the OTel SDK, a
  ``BatchSpanProcessor`` and the OTLP/HTTP exporter.
- ``otel-langfuse``: the same instrumentation, with the Langfuse SDK's tracer provider
  as the global provider, made with ``Langfuse(should_export_span=lambda span: True)``:
  since SDK v4 Langfuse's default export filter drops every span that is not its own
  or an LLM library's, so without it the Celery spans never reach Langfuse (the
  SDK's upgrade guide gives this line for keeping them).
- ``sentry``: ``sentry_sdk`` with ``CeleryIntegration``, every transaction sampled.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, Callable

CONTENDERS = ("plain", "celery-langfuse", "otel", "otel-langfuse", "sentry")
LABELS = {
    "plain": "plain Celery",
    "celery-langfuse": "celery-langfuse",
    "otel": "OTel celery instr.",
    "otel-langfuse": "OTel instr. + Langfuse SDK",
    "sentry": "Sentry CeleryIntegration",
}

_flush: Callable[[float], None] = lambda timeout: None  # noqa: E731
_active_trace: Callable[[], Any] = contextlib.nullcontext


def setup(name: str, app: Any, *, prefork_child_init: bool = False) -> None:
    """Turn on contender ``name`` for ``app`` in this process.

    ``prefork_child_init``: this is a prefork worker's parent; instrumentations that
    own exporter threads are set up in each child (``worker_process_init``), as their
    documentation asks.
    """
    if name not in CONTENDERS:
        raise SystemExit(f"unknown contender {name!r}; one of {', '.join(CONTENDERS)}")
    setups = {
        "plain": lambda: None,
        "celery-langfuse": lambda: _celery_langfuse(app),
        "otel": _otel,
        "otel-langfuse": _otel_langfuse,
        "sentry": _sentry,
    }
    if name in ("otel", "otel-langfuse") and prefork_child_init:
        from celery import signals

        signals.worker_process_init.connect(lambda **_: setups[name](), weak=False)
    else:
        setups[name]()


@contextlib.contextmanager
def active_trace() -> Iterator[None]:
    """The span of an incoming request (or of a parent task) that tasks are published in."""
    with _active_trace():
        yield


def flush(timeout: float = 30.0) -> None:
    _flush(timeout)


def _sink() -> str:
    return os.environ["BENCH_SINK_URL"]


def _celery_langfuse(app: Any) -> None:
    global _flush, _active_trace
    from celery_langfuse import client, install

    install(app)
    _flush = lambda timeout: client.flush(timeout)  # noqa: E731
    _active_trace = _langfuse_request


def _langfuse_request() -> Any:
    # Imported here, not in setup: a worker never opens a request, and celery-langfuse
    # does not load the SDK in a worker whose tasks do not use it.
    import langfuse

    return langfuse.get_client().start_as_current_observation(name="request")


def _otel() -> None:
    global _flush, _active_trace
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "bench"}))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{_sink()}/v1/traces"))
    )
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument()
    tracer = trace.get_tracer("bench.request")
    _flush = lambda timeout: provider.force_flush(int(timeout * 1000))  # noqa: E731
    _active_trace = lambda: tracer.start_as_current_span("request")  # noqa: E731


def _otel_langfuse() -> None:
    global _flush, _active_trace
    import langfuse
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    # Installs its tracer provider as the global one; exports the Celery spans too.
    client = langfuse.Langfuse(should_export_span=lambda span: True)
    CeleryInstrumentor().instrument()
    tracer = trace.get_tracer("bench.request")
    _flush = lambda timeout: client.flush()  # noqa: E731
    _active_trace = lambda: tracer.start_as_current_span("request")  # noqa: E731


def _sentry() -> None:
    global _flush, _active_trace
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration

    port = _sink().rsplit(":", 1)[1]
    sentry_sdk.init(
        dsn=f"http://public@127.0.0.1:{port}/1",
        integrations=[CeleryIntegration()],
        traces_sample_rate=1.0,
    )
    _flush = lambda timeout: sentry_sdk.flush(timeout)  # noqa: E731
    start_transaction = getattr(sentry_sdk, "start_transaction", None)
    if start_transaction is not None:  # sentry-sdk 2
        _active_trace = lambda: start_transaction(  # noqa: E731
            name="request", op="http.server"
        )
    else:  # sentry-sdk 3: a span with no parent is the root of its trace
        _active_trace = lambda: sentry_sdk.start_span(  # noqa: E731
            name="request", attributes={"sentry.op": "http.server"}
        )
