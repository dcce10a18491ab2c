"""Capture what the Langfuse SDK sends, and rebuild what Langfuse would show.

Langfuse itself cannot run in a test suite, so :class:`CaptureServer` stands in for
it: a small HTTP server on 127.0.0.1 that answers the requests of the real Langfuse
Python SDK (v5) the way Langfuse does, decodes them, and keeps what it received.
Any process given ``server.env`` exports to it, so a Celery worker or beat
subprocess is captured as well as the test process itself.

Endpoints served (the ones SDK v5 calls):

- ``POST /api/public/otel/v1/traces``: OTLP/HTTP protobuf, gzip (the SDK default)
  or uncompressed. Answered with an empty ``ExportTraceServiceResponse``.
- ``POST /api/public/scores``: a JSON list of scores (SDK v5 no longer uses the
  batch ``/api/public/ingestion`` endpoint for scores). Answered ``202 Accepted``.
- ``GET /api/public/projects``: what ``Langfuse.auth_check()`` calls; one project.

Each span becomes an :class:`Observation`; :func:`build_traces` groups them into
:class:`Trace` objects following the Langfuse server's rules:

- Observation fields follow ``OtelIngestionProcessor`` (langfuse/langfuse,
  ``packages/shared/src/server/otel/OtelIngestionProcessor.ts``): type from
  ``langfuse.observation.type`` (default ``span``); level from
  ``langfuse.observation.level``, else ``ERROR`` when the OTel status is error, else
  ``DEFAULT``; status message from ``langfuse.observation.status_message``, else the
  OTel status message; environment from ``langfuse.environment`` (span, then
  resource), else ``default``; metadata from ``langfuse.observation.metadata`` (a JSON
  object) overlaid with the ``langfuse.observation.metadata.<key>`` attributes.
- A trace is every observation sharing a trace id. Its trace-level fields are rolled
  up as Langfuse v4 (the only server SDK v5 supports) aggregates its events table,
  ``EVENTS_AGGREGATION_FIELDS`` in ``packages/shared/src/server/queries/clickhouse-sql/
  event-query-builder.ts``: ``user_id``, ``session_id``, ``environment``, the trace
  name (``langfuse.trace.name``) and ``tags`` take the value of the most recently
  received observation that has a non-empty one (``argMaxIf(.., event_ts, .. <> '')``),
  so a trace-level attribute set on *any* span reaches the trace. ``input`` and
  ``output`` come only from the root observation, the one without a parent span
  (``argMaxIf(input, event_ts, parent_span_id = '')``); a span started with
  ``trace_context=`` (``langfuse.internal.as_root``) has a parent id and is not the
  root, as in Langfuse's fix for issue #15860 (PR #15927, "only treat parentless
  spans as the trace root"). ``langfuse.internal.is_app_root`` only drives the
  "root observations" filter of Langfuse's UI and does not change the rollup.
- Two deliberate choices where v4 has no single rule: without any
  ``langfuse.trace.name`` the trace is named after its root observation (the legacy
  ``trace-create`` rule, ``langfuse.trace.name ?? root span name``, and what the UI
  shows), and trace metadata merges the ``langfuse.trace.metadata.<key>`` attributes
  of all observations key by key, later ones winning (v4 reads the root's, but the
  SDK propagates trace metadata to every span, so both agree for propagated data).
- Langfuse keeps one row per span id, so a span received twice (an exporter retry)
  counts once, the later copy winning. "Most recently received" is arrival order at
  this server, the analogue of Langfuse's ``event_ts``.

Values written by the SDK as JSON (input, output, metadata values) are decoded;
a value that is not valid JSON stays the string it was sent as.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, cast

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

__all__ = [
    "CaptureServer",
    "Observation",
    "Score",
    "Trace",
    "build_traces",
    "format_traces",
]

PUBLIC_KEY = "pk-lf-test"
SECRET_KEY = "sk-lf-test"

_OTLP_PATH = "/api/public/otel/v1/traces"
_SCORES_PATH = "/api/public/scores"
_PROJECTS_PATH = "/api/public/projects"

_OBSERVATION_METADATA = "langfuse.observation.metadata"
_TRACE_METADATA = "langfuse.trace.metadata"
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass
class Observation:
    """One span as Langfuse would store it: an observation of a trace.

    ``attributes`` holds every raw span attribute; the trace-level values the SDK
    propagates onto each span are exposed as properties (``user_id``, ``tags``, ...).
    """

    id: str
    trace_id: str
    name: str
    start_time: datetime
    end_time: datetime
    parent_id: str | None = None
    type: str = "span"
    level: str = "DEFAULT"
    status_message: str | None = None
    input: Any = None
    output: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    environment: str = "default"
    attributes: dict[str, Any] = field(default_factory=dict)
    scope: str = ""
    resource: dict[str, Any] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        """Seconds between start and end."""
        return (self.end_time - self.start_time).total_seconds()

    @property
    def user_id(self) -> str | None:
        """``user.id`` (or the compatibility key ``langfuse.user.id``) on this span."""
        return _first_string(self.attributes, "langfuse.user.id", "user.id")

    @property
    def session_id(self) -> str | None:
        """``session.id`` (or the compatibility key ``langfuse.session.id``) on this span."""
        return _first_string(self.attributes, "langfuse.session.id", "session.id")

    @property
    def trace_name(self) -> str | None:
        """``langfuse.trace.name`` on this span."""
        return _first_string(self.attributes, "langfuse.trace.name")

    @property
    def tags(self) -> list[str]:
        """``langfuse.trace.tags`` on this span, read as the server reads it."""
        return _tags(self.attributes.get("langfuse.trace.tags"))

    @property
    def trace_metadata(self) -> dict[str, Any]:
        """Trace-level metadata (``langfuse.trace.metadata.*``) on this span."""
        return _metadata(self.attributes, _TRACE_METADATA)

    @property
    def as_root(self) -> bool:
        """Whether the SDK marked the span as a root (``trace_context=``)."""
        return str(self.attributes.get("langfuse.internal.as_root")).lower() == "true"


@dataclass
class Score:
    """A score as sent to ``POST /api/public/scores``."""

    id: str | None
    trace_id: str | None
    observation_id: str | None
    name: str
    value: Any
    data_type: str
    comment: str | None = None
    metadata: Any = None


@dataclass
class Trace:
    """What Langfuse would show for one trace id; see the module docstring for the rules."""

    id: str
    name: str | None = None
    user_id: str | None = None
    session_id: str | None = None
    tags: list[str] = field(default_factory=list)
    environment: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    input: Any = None
    output: Any = None
    observations: list[Observation] = field(default_factory=list)
    scores: list[Score] = field(default_factory=list)

    def root_observations(self) -> list[Observation]:
        """Observations without a parent span, by start time."""
        return [obs for obs in self.observations if obs.parent_id is None]

    def children(self, observation: Observation) -> list[Observation]:
        """Direct children of ``observation``, by start time."""
        return [obs for obs in self.observations if obs.parent_id == observation.id]

    def orphans(self) -> list[Observation]:
        """Observations whose parent is not in the trace; a correct trace has none."""
        ids = {obs.id for obs in self.observations}
        return [
            obs
            for obs in self.observations
            if obs.parent_id is not None and obs.parent_id not in ids
        ]

    def find_all(self, name: str) -> list[Observation]:
        """Every observation called ``name``, by start time."""
        return [obs for obs in self.observations if obs.name == name]

    def find(self, name: str) -> Observation:
        """The one observation called ``name``; AssertionError if there are none or several."""
        matches = self.find_all(name)
        if len(matches) != 1:
            names = sorted({obs.name for obs in self.observations})
            raise AssertionError(
                f"expected exactly one observation named {name!r} in trace {self.id}, "
                f"found {len(matches)}; names present: {names}\n{self.tree()}"
            )
        return matches[0]

    def tree(self) -> str:
        """The trace as an indented tree: name, duration, level; orphans flagged."""
        lines = [
            f"Trace {self.id} name={self.name!r} user={self.user_id!r} "
            f"session={self.session_id!r} tags={self.tags} env={self.environment!r}"
        ]
        shown: set[str] = set()

        def add(obs: Observation, depth: int) -> None:
            if obs.id in shown:  # a malformed parent cycle must not recurse forever
                return
            shown.add(obs.id)
            line = f"{'  ' * depth}{obs.name} [{obs.type}] {obs.duration * 1000:.1f} ms {obs.level}"
            if obs.status_message:
                line += f" - {obs.status_message}"
            lines.append(line)
            for child in self.children(obs):
                add(child, depth + 1)

        for root in self.root_observations():
            add(root, 1)
        for orphan in self.orphans():
            how = " (started with trace_context=)" if orphan.as_root else ""
            lines.append(f"  ! orphan{how}: parent {orphan.parent_id} is not in this trace")
            add(orphan, 2)
        lines.extend(f"  score {score.name}={score.value!r}" for score in self.scores)
        return "\n".join(lines)


def format_traces(traces: Iterable[Trace]) -> str:
    """All ``traces`` as trees, for assertion messages."""
    trees = [trace.tree() for trace in traces]
    return "\n\n".join(trees) if trees else "(no traces captured)"


def build_traces(observations: Iterable[Observation], scores: Iterable[Score] = ()) -> list[Trace]:
    """Group observations (in arrival order) into traces, ordered by start time.

    Pure: the rollup rules of the module docstring applied to what was received.
    Scores attach to the trace named by their ``trace_id``; scores alone make no trace.
    """
    by_trace: dict[str, list[Observation]] = {}
    for obs in _latest_copies(observations):
        by_trace.setdefault(obs.trace_id, []).append(obs)
    scores_by_trace: dict[str, list[Score]] = {}
    for score in scores:
        if score.trace_id is not None:
            scores_by_trace.setdefault(score.trace_id, []).append(score)
    traces = [
        _rollup(trace_id, received, scores_by_trace.get(trace_id, []))
        for trace_id, received in by_trace.items()
    ]
    return sorted(traces, key=lambda trace: trace.observations[0].start_time)


def _latest_copies(observations: Iterable[Observation]) -> list[Observation]:
    """One observation per span id, the last received, in order of that arrival."""
    latest: dict[tuple[str, str], Observation] = {}
    for obs in observations:
        key = (obs.trace_id, obs.id)
        latest.pop(key, None)
        latest[key] = obs
    return list(latest.values())


def _rollup(trace_id: str, received: list[Observation], scores: list[Score]) -> Trace:
    roots = [obs for obs in received if obs.parent_id is None]
    root = roots[-1] if roots else None
    metadata: dict[str, Any] = {}
    for obs in received:
        metadata.update(obs.trace_metadata)
    return Trace(
        id=trace_id,
        name=_last_set(obs.trace_name for obs in received) or (root.name if root else None),
        user_id=_last_set(obs.user_id for obs in received),
        session_id=_last_set(obs.session_id for obs in received),
        tags=_last_set(obs.tags for obs in received) or [],
        environment=_last_set(obs.environment for obs in received),
        metadata=metadata,
        input=root.input if root else None,
        output=root.output if root else None,
        observations=sorted(received, key=lambda obs: obs.start_time),
        scores=scores,
    )


def _last_set(values: Iterable[Any]) -> Any:
    """The last non-empty value, Langfuse's ``argMaxIf(value, event_ts, value <> '')``."""
    found = None
    for value in values:
        if value:
            found = value
    return found


@dataclass
class _Fault:
    status: int = 200
    delay: float = 0.0
    retry_after: float | None = None


class CaptureServer:
    """A stand-in Langfuse on 127.0.0.1 that records what the SDK sends.

    Start it (or use it as a context manager), hand ``env`` to the processes under
    test, then assert on ``traces()``. Every accessor returns a snapshot, safe to
    call while requests arrive on the server's threads.
    """

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self._lock = threading.Lock()
        self._received: list[Observation] = []
        self._scores: list[Score] = []
        self._requests = 0
        self._unhandled: list[str] = []
        self._fault = _Fault()
        self._httpd: _CaptureHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind 127.0.0.1 (a free port when ``port`` is 0) and serve in a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError("CaptureServer is already running")
        self._httpd = _CaptureHTTPServer(("127.0.0.1", self._port), self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="langfuse-capture", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and release the port. Captured data stays readable."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd = None
        self._thread = None

    def __enter__(self) -> CaptureServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``, what ``LANGFUSE_BASE_URL`` must be."""
        if self._httpd is None:
            raise RuntimeError("CaptureServer is not running; call start() first")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def env(self) -> dict[str, str]:
        """Environment that points a Langfuse SDK at this server, for ``os.environ``
        or a subprocess. The short flush interval makes exports arrive within ~0.1 s
        while keeping the SDK's batching (and so its flush paths) as in production."""
        return {
            "LANGFUSE_BASE_URL": self.base_url,
            "LANGFUSE_PUBLIC_KEY": PUBLIC_KEY,
            "LANGFUSE_SECRET_KEY": SECRET_KEY,
            "LANGFUSE_FLUSH_INTERVAL": "0.1",
            "LANGFUSE_TRACING_ENABLED": "true",
            "LANGFUSE_SAMPLE_RATE": "1.0",
        }

    @property
    def observations(self) -> list[Observation]:
        """Every observation received, once per span id (the latest copy)."""
        with self._lock:
            received = list(self._received)
        return _latest_copies(received)

    @property
    def deliveries(self) -> dict[str, int]:
        """How many times each span id was received. Above 1 means the span was sent
        again (an exporter or forwarder retry); Langfuse, like ``observations``, keeps
        one copy, so this is the place to see re-sends."""
        with self._lock:
            ids = [obs.id for obs in self._received]
        counts: dict[str, int] = {}
        for span_id in ids:
            counts[span_id] = counts.get(span_id, 0) + 1
        return counts

    @property
    def scores(self) -> list[Score]:
        """Every score received, in arrival order."""
        with self._lock:
            return list(self._scores)

    @property
    def requests(self) -> int:
        """How many export requests (OTLP and scores) arrived, failed ones included."""
        with self._lock:
            return self._requests

    @property
    def unhandled(self) -> list[str]:
        """Requests the server could not serve (unknown path, undecodable body)."""
        with self._lock:
            return list(self._unhandled)

    def traces(self) -> list[Trace]:
        """Traces rebuilt from everything received so far."""
        with self._lock:
            received, scores = list(self._received), list(self._scores)
        return build_traces(received, scores)

    def trace(self, trace_id: str) -> Trace:
        """The trace with this id; KeyError if nothing of it arrived."""
        for trace in self.traces():
            if trace.id == trace_id:
                return trace
        raise KeyError(f"no trace {trace_id} captured")

    def clear(self) -> None:
        """Forget everything received, including the request count."""
        with self._lock:
            self._received.clear()
            self._scores.clear()
            self._requests = 0
            self._unhandled.clear()

    def set_response(
        self, status: int = 200, delay: float = 0.0, retry_after: float | None = None
    ) -> None:
        """Answer every export request with ``status`` after ``delay`` seconds.

        Simulates a slow, failing or rate-limiting (429 with ``Retry-After``) Langfuse.
        A request answered with an error status stores nothing, as in Langfuse.
        Call with no arguments to restore normal service.
        """
        with self._lock:
            self._fault = _Fault(status, delay, retry_after)

    def wait_for(self, predicate: Callable[[CaptureServer], object], timeout: float = 10.0) -> None:
        """Poll until ``predicate(self)`` is truthy.

        A predicate that raises (``KeyError`` from ``trace()``, ``AssertionError``
        from ``find()``) counts as not yet true. On timeout, raise AssertionError with
        the last such error and every captured trace as a tree.
        """
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            try:
                if predicate(self):
                    return
                last_error = None
            except Exception as error:
                last_error = error
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        reason = f"; last error: {last_error!r}" if last_error is not None else ""
        raise AssertionError(f"condition not met within {timeout} s{reason}\n{self._describe()}")

    def wait_for_observations(self, n: int, timeout: float = 10.0, name: str | None = None) -> None:
        """Wait until at least ``n`` observations (called ``name``, if given) arrived."""

        def enough(server: CaptureServer) -> bool:
            matching = [obs for obs in server.observations if name is None or obs.name == name]
            return len(matching) >= n

        what = f"{n} observation(s)" + (f" named {name!r}" if name else "")
        try:
            self.wait_for(enough, timeout)
        except AssertionError as error:
            raise AssertionError(f"waiting for {what}: {error}") from None

    def _describe(self) -> str:
        with self._lock:
            counts = (
                f"requests={self._requests} spans={len(self._received)} "
                f"scores={len(self._scores)} unhandled={self._unhandled}"
            )
        return f"captured: {counts}\n{format_traces(self.traces())}"

    def _serve(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> _Reply:
        """Answer one request as Langfuse would, recording what it carries."""
        route = path.split("?", 1)[0].rstrip("/")
        if method == "GET" and route == _PROJECTS_PATH:
            return _json_reply(200, {"data": [_PROJECT]})
        if method == "POST" and route == _OTLP_PATH:
            return self._export(route, headers, body, self._store_spans)
        if method == "POST" and route == _SCORES_PATH:
            return self._export(route, headers, body, self._store_scores)
        self._note_unhandled(f"{method} {path}: no such endpoint")
        return _json_reply(404, {"message": f"{method} {route} is not served by CaptureServer"})

    def _export(
        self,
        route: str,
        headers: Mapping[str, str],
        body: bytes,
        store: Callable[[bytes, Mapping[str, str]], _Reply],
    ) -> _Reply:
        with self._lock:
            self._requests += 1
            fault = self._fault
        if fault.delay:
            time.sleep(fault.delay)
        if not 200 <= fault.status < 300:
            extra = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
            return _json_reply(fault.status, {"message": "injected by set_response"}, extra)
        try:
            return store(_decoded_body(body, headers), headers)
        except (ValueError, KeyError, TypeError, DecodeError, OSError) as error:
            self._note_unhandled(f"POST {route}: {error}")
            return _json_reply(400, {"message": f"cannot decode request: {error}"})

    def _store_spans(self, body: bytes, headers: Mapping[str, str]) -> _Reply:
        if "json" in headers.get("content-type", "").lower():
            raise ValueError("OTLP/JSON is not supported; the Langfuse SDK sends protobuf")
        observations = _observations_from_otlp(body)
        with self._lock:
            self._received.extend(observations)
        return 200, {"Content-Type": "application/x-protobuf"}, _EMPTY_OTLP_RESPONSE

    def _store_scores(self, body: bytes, headers: Mapping[str, str]) -> _Reply:
        payload = json.loads(body)
        items = payload if isinstance(payload, list) else [payload]
        scores = [_score_from_json(item) for item in items]
        with self._lock:
            self._scores.extend(scores)
        return _json_reply(202, {"message": "Accepted"})

    def _note_unhandled(self, description: str) -> None:
        with self._lock:
            self._unhandled.append(description)


def _observations_from_otlp(payload: bytes) -> list[Observation]:
    """Observations from an uncompressed OTLP ``ExportTraceServiceRequest`` body."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(payload)
    observations = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                observations.append(_observation(span, scope_spans.scope.name, resource))
    return observations


def _observation(span: Span, scope: str, resource: dict[str, Any]) -> Observation:
    attributes = _attributes(span.attributes)
    is_error = span.status.code == Status.STATUS_CODE_ERROR
    return Observation(
        id=span.span_id.hex(),
        trace_id=span.trace_id.hex(),
        parent_id=span.parent_span_id.hex() or None,
        name=span.name,
        type=str(attributes.get("langfuse.observation.type") or "span"),
        start_time=_datetime(span.start_time_unix_nano),
        end_time=_datetime(span.end_time_unix_nano or span.start_time_unix_nano),
        level=str(
            attributes.get("langfuse.observation.level") or ("ERROR" if is_error else "DEFAULT")
        ),
        status_message=(
            _first_string(attributes, "langfuse.observation.status_message")
            or span.status.message
            or None
        ),
        input=_json_value(attributes.get("langfuse.observation.input")),
        output=_json_value(attributes.get("langfuse.observation.output")),
        metadata=_metadata(attributes, _OBSERVATION_METADATA),
        environment=(
            _first_string(attributes, "langfuse.environment")
            or _first_string(resource, "langfuse.environment")
            or "default"
        ),
        attributes=attributes,
        scope=scope,
        resource=resource,
    )


def _attributes(key_values: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in key_values}


def _any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind)


def _datetime(unix_nano: int) -> datetime:
    return _UNIX_EPOCH + timedelta(microseconds=unix_nano // 1000)


def _json_value(value: Any) -> Any:
    """Decode a JSON-encoded attribute; a plain string stays a string."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _metadata(attributes: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``prefix`` (a JSON object) overlaid with the ``prefix.<key>`` attributes."""
    whole = _json_value(attributes.get(prefix))
    metadata: dict[str, Any] = dict(whole) if isinstance(whole, dict) else {}
    for key, value in attributes.items():
        if key.startswith(prefix + "."):
            metadata[key[len(prefix) + 1 :]] = _json_value(value)
    return metadata


def _tags(value: Any) -> list[str]:
    """Tags the way the server reads them: a list, a JSON list, or comma-separated."""
    if isinstance(value, (list, tuple)):
        return [str(tag) for tag in value]
    if not isinstance(value, str) or not value:
        return []
    decoded = _json_value(value)
    if isinstance(decoded, list):
        return [str(tag) for tag in decoded]
    return [tag.strip() for tag in value.split(",")]


def _first_string(attributes: Mapping[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = attributes.get(key)
        if value:
            return value if isinstance(value, str) else json.dumps(value)
    return None


def _score_from_json(item: Mapping[str, Any]) -> Score:
    value = item["value"]
    inferred_type = "CATEGORICAL" if isinstance(value, str) else "NUMERIC"
    return Score(
        id=item.get("id"),
        trace_id=item.get("traceId"),
        observation_id=item.get("observationId"),
        name=str(item["name"]),
        value=value,
        data_type=item.get("dataType") or inferred_type,
        comment=item.get("comment"),
        metadata=item.get("metadata"),
    )


def _decoded_body(body: bytes, headers: Mapping[str, str]) -> bytes:
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding in ("", "identity"):
        return body
    raise ValueError(f"Content-Encoding {encoding!r} is not supported (Langfuse decodes gzip)")


_Reply = tuple[int, dict[str, str], bytes]

_EMPTY_OTLP_RESPONSE = ExportTraceServiceResponse().SerializeToString()

_PROJECT = {
    "id": "celery-langfuse-capture",
    "name": "celery-langfuse capture",
    "organization": {"id": "celery-langfuse-capture", "name": "capture"},
    "metadata": {},
}


def _json_reply(status: int, payload: object, headers: Mapping[str, str] | None = None) -> _Reply:
    return (
        status,
        {"Content-Type": "application/json", **(headers or {})},
        json.dumps(payload).encode(),
    )


class _CaptureHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], capture: CaptureServer) -> None:
        super().__init__(address, _CaptureHandler)
        self.capture = capture


class _CaptureHandler(BaseHTTPRequestHandler):
    """Moves bytes between the socket and :meth:`CaptureServer._serve`."""

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {key.lower(): value for key, value in self.headers.items()}
        capture = cast(_CaptureHTTPServer, self.server).capture
        status, reply_headers, reply = capture._serve(method, self.path, headers, body)
        try:
            self.send_response(status)
            for key, value in {**reply_headers, "Content-Length": str(len(reply))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(reply)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (a slow set_response): as Langfuse would

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet; ``CaptureServer.unhandled`` records what went wrong."""
