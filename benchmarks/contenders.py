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

Two workload settings reach every contender through the environment, each applied by
the contender's own documented means (docs/benchmarks.md lists them):

- ``BENCH_SAMPLE_RATE``: the share of new traces this process keeps (celery-langfuse's
  ``sample_rate`` and, for the request spans, the SDK's; the OTel samplers; Sentry's
  ``traces_sample_rate``). A trace is started where it is started and followed
  downstream: at ``0`` in a producer alone, its request spans are sampled out and the
  workers follow them.
- ``BENCH_EXCLUDED_TASK``: a task name no contender traces (celery-langfuse's
  ``exclude_tasks``, an OTel sampler that drops its spans, the Langfuse SDK's
  ``should_export_span``, Sentry's ``traces_sampler``).

:func:`generation` is a task body's LLM call: the contenders built on the Langfuse
SDK record it as a generation, the others make the same call unrecorded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Optional

from benchmarks.task_work import Messages, record_generation

CONTENDERS = ("plain", "celery-langfuse", "otel", "otel-langfuse", "sentry")
LABELS = {
    "plain": "plain Celery",
    "celery-langfuse": "celery-langfuse",
    "otel": "OTel celery instr.",
    "otel-langfuse": "OTel instr. + Langfuse SDK",
    "sentry": "Sentry CeleryIntegration",
}
#: The contenders whose task bodies record their LLM call (:func:`generation`) as a
#: Langfuse generation; the others make the same call and record nothing of it.
RECORD_GENERATIONS = ("celery-langfuse", "otel-langfuse")

_flush: Callable[[float], None] = lambda timeout: None  # noqa: E731
_active_trace: Callable[[], Any] = contextlib.nullcontext
_generation: Callable[[Callable[[Messages], dict[str, Any]], Messages], Any]
_generation = lambda call, messages: call(messages)  # noqa: E731


def setup(name: str, app: Any, *, prefork_child_init: bool = False) -> None:
    """Turn on contender ``name`` for ``app`` in this process.

    ``prefork_child_init``: this is a prefork worker's parent; instrumentations that
    own exporter threads are set up in each child (``worker_process_init``), as their
    documentation asks.
    """
    if name not in CONTENDERS:
        raise SystemExit(f"unknown contender {name!r}; one of {', '.join(CONTENDERS)}")
    rate = os.environ.get("BENCH_SAMPLE_RATE")
    sample_rate = None if rate in (None, "") else float(rate)
    excluded = os.environ.get("BENCH_EXCLUDED_TASK") or None
    setups = {
        "plain": lambda: None,
        "celery-langfuse": lambda: _celery_langfuse(app, sample_rate, excluded),
        "otel": lambda: _otel(sample_rate, excluded),
        "otel-langfuse": lambda: _otel_langfuse(sample_rate, excluded),
        "sentry": lambda: _sentry(sample_rate, excluded),
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


def generation(call: Callable[[Messages], dict[str, Any]], messages: Messages) -> Any:
    """``call(messages)``, the task body's LLM call: recorded as a Langfuse generation
    by the contenders in :data:`RECORD_GENERATIONS`, made unrecorded by the others."""
    return _generation(call, messages)


def _sink() -> str:
    return os.environ["BENCH_SINK_URL"]


def _celery_langfuse(app: Any, sample_rate: Optional[float], excluded: Optional[str]) -> None:
    global _flush, _active_trace, _generation
    from celery_langfuse import client, install

    options: dict[str, Any] = {}
    if sample_rate is not None:
        options["sample_rate"] = sample_rate
    if excluded is not None:
        options["exclude_tasks"] = ["celery.*", excluded]  # the default, and the task
    install(app, **options)
    _flush = lambda timeout: client.flush(timeout)  # noqa: E731
    _active_trace = lambda: _langfuse_request(sample_rate)  # noqa: E731
    _generation = _langfuse_generation


def _langfuse_request(sample_rate: Optional[float]) -> Any:
    return _langfuse_client(sample_rate).start_as_current_observation(name="request")


_langfuse: Any = None


def _langfuse_client(sample_rate: Optional[float] = None) -> Any:
    """The process's Langfuse SDK client, made on first use: a worker never opens a
    request, and celery-langfuse does not load the SDK in a worker whose tasks do not
    use it. Its request spans are the SDK's, sampled by its sampler."""
    global _langfuse
    if _langfuse is None:
        import langfuse

        _langfuse = (
            langfuse.get_client()
            if sample_rate is None
            else langfuse.Langfuse(sample_rate=sample_rate)
        )
    return _langfuse


def _langfuse_generation(call: Callable[[Messages], dict[str, Any]], messages: Messages) -> Any:
    return record_generation(_langfuse_client(), call, messages)


def _otel_sampler(sample_rate: Optional[float], excluded: Optional[str]) -> Any:
    """The OTel sampler for these settings; None for the SDK's default (parent-based,
    every root kept)."""
    if sample_rate is None and excluded is None:
        return None
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

    sampler = ParentBased(ALWAYS_ON if sample_rate is None else TraceIdRatioBased(sample_rate))
    return sampler if excluded is None else _DropTask(excluded, sampler)


def _otel(sample_rate: Optional[float], excluded: Optional[str]) -> None:
    global _flush, _active_trace
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(
        resource=Resource.create({"service.name": "bench"}),
        sampler=_otel_sampler(sample_rate, excluded),
    )
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{_sink()}/v1/traces"))
    )
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument()
    tracer = trace.get_tracer("bench.request")
    _flush = lambda timeout: provider.force_flush(int(timeout * 1000))  # noqa: E731
    _active_trace = lambda: tracer.start_as_current_span("request")  # noqa: E731


def _otel_langfuse(sample_rate: Optional[float], excluded: Optional[str]) -> None:
    global _flush, _active_trace, _generation, _langfuse
    import langfuse
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    # Installs its tracer provider as the global one; exports the Celery spans too,
    # but the excluded task's (the SDK's documented filter).
    names = _otel_span_names(excluded)
    client = langfuse.Langfuse(
        sample_rate=sample_rate,
        should_export_span=lambda span: span.name not in names,
    )
    CeleryInstrumentor().instrument()
    tracer = trace.get_tracer("bench.request")
    _flush = lambda timeout: client.flush()  # noqa: E731
    _active_trace = lambda: tracer.start_as_current_span("request")  # noqa: E731
    _langfuse = client
    _generation = _langfuse_generation


def _otel_span_names(task: Optional[str]) -> frozenset[str]:
    """The names the OTel Celery instrumentation gives a task's publish and run spans."""
    return frozenset() if task is None else frozenset({f"apply_async/{task}", f"run/{task}"})


class _DropTask:
    """An OTel sampler that drops one task's spans and asks ``delegate`` for the rest:
    the OTel Celery instrumentation has no option to leave a task out."""

    def __init__(self, task: str, delegate: Any) -> None:
        from opentelemetry.sdk.trace.sampling import Decision, SamplingResult

        self._names = _otel_span_names(task)
        self._delegate = delegate
        self._drop = SamplingResult(Decision.DROP)

    def should_sample(
        self,
        parent_context: Any,
        trace_id: int,
        name: str,
        kind: Any = None,
        attributes: Any = None,
        links: Optional[Sequence[Any]] = None,
        trace_state: Any = None,
    ) -> Any:
        if name in self._names:
            return self._drop
        return self._delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"DropTask({sorted(self._names)}, {self._delegate.get_description()})"


def _sentry(sample_rate: Optional[float], excluded: Optional[str]) -> None:
    global _flush, _active_trace
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration

    rate = 1.0 if sample_rate is None else sample_rate
    sampling: dict[str, Any] = {"traces_sample_rate": rate}
    if excluded is not None:

        def traces_sampler(context: dict[str, Any]) -> float:
            # Sentry's documented way to leave a Celery task out; a sampler also decides
            # for traces that a sampled parent started, so it follows the parent then.
            if context.get("celery_job", {}).get("task") == excluded:
                return 0.0
            parent = context.get("parent_sampled")
            return rate if parent is None else float(parent)

        sampling = {"traces_sampler": traces_sampler}
    port = _sink().rsplit(":", 1)[1]
    sentry_sdk.init(
        dsn=f"http://public@127.0.0.1:{port}/1",
        integrations=[CeleryIntegration()],
        **sampling,
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
