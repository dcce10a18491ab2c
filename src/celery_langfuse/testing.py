"""Capture what the Langfuse SDK sends, and rebuild what Langfuse would show.

Langfuse itself cannot run in a test suite, so :class:`CaptureServer` stands in for
it: a small HTTP server on 127.0.0.1 that answers the requests of the real Langfuse
Python SDK (v5) the way Langfuse does, decodes them, and keeps what it received.
Any process given ``server.env`` exports to it, so a Celery worker or beat
subprocess is captured as well as the test process itself.

Endpoints served (the ones SDK v5 calls):

- ``POST /api/public/otel/v1/traces``: OTLP/HTTP protobuf, gzip (the SDK default)
  or uncompressed. Answered with an empty ``ExportTraceServiceResponse``.
- ``POST /api/public/ingestion``: SDK 4's ``score-create`` events, answered ``207``.
- ``POST /api/public/scores``: a JSON list of scores (SDK v5 no longer uses the
  batch ``/api/public/ingestion`` endpoint for scores). Answered ``202 Accepted``.
- ``GET /api/public/projects``: what ``Langfuse.auth_check()`` calls; one project.

Each span becomes an :class:`Observation`; :func:`build_traces` groups them into
:class:`Trace` objects. The rules are Langfuse's own, checked against its server-side
conversion (``OtelIngestionProcessor`` of langfuse/langfuse at commit
62751446149b702b419a9292ddfc2280cdf74b8c, ``packages/shared/src/server/otel/``) by
:func:`compare_with_langfuse`, which the test suite runs on every body it sends:

- Observation fields follow the v4 observation rows (``processToEvent``): type from
  ``langfuse.observation.type`` (default ``span``; Langfuse spells it upper case);
  level from ``langfuse.observation.level``, else ``ERROR`` when the OTel status is
  error, else ``DEFAULT``; status message from ``langfuse.observation.status_message``,
  else the OTel status message; environment from ``langfuse.environment`` (span, then
  resource), else ``default``; model, model parameters, usage and cost details from
  ``langfuse.observation.model.name`` / ``.model.parameters`` / ``.usage_details`` /
  ``.cost_details``. Start and end times keep milliseconds, rounded down.
- Metadata is the observation's (``langfuse.observation.metadata``, a JSON object,
  overlaid with the ``langfuse.observation.metadata.<key>`` attributes) merged with the
  trace metadata on the same span (``langfuse.trace.metadata``/``.<key>``), which wins
  a tie: the SDK propagates trace metadata to every span, so every observation shows
  it. Langfuse also adds ``resourceAttributes`` and ``scope``, kept here apart as
  ``resource`` and ``scope``; a span from another instrumentation scope than
  ``langfuse-sdk`` keeps its other attributes under ``attributes``.
- A trace is every observation sharing a trace id. Its fields come from the
  ``trace-create`` events Langfuse makes of its spans (``createTraceEvent``): a root
  span (no parent, or ``langfuse.internal.as_root``, set by ``trace_context=``) writes
  the trace name (``langfuse.trace.name``, else its own name), user, session, tags,
  environment, input and output (``langfuse.trace.input``/``output``, else its own) and
  metadata (trace metadata plus its own); any other span that sets a trace-level
  attribute (Langfuse's ``hasTraceUpdates``) writes those same fields from its
  trace-level attributes only; every other span writes only the environment. The last
  non-empty write of a field wins, in arrival order, and metadata merges key by key.
  ``langfuse.internal.is_app_root`` only drives a filter of Langfuse's UI.
- Langfuse keeps one row per span id, so a span received twice (an exporter retry)
  counts once, the later copy winning; each copy still wrote the trace.

What the oracle does not cover, and so neither does this: model matching, cost and
token counting (they need Langfuse's database), and the UI's own read-side roll-up.

Values written by the SDK as JSON (input, output, metadata values) are decoded;
a value that is not valid JSON stays the string it was sent as.

:class:`LangfuseOracle` runs Langfuse's conversion (``langfuse-otel.cjs``, built from
that commit; the pytest plugin finds it at ``$CELERY_LANGFUSE_ORACLE`` or
``../shared/langfuse-oracle``) in one Node process; :func:`compare_with_langfuse`
compares it with the capture server, observation by observation and trace by trace.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, NamedTuple, cast

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

__all__ = [
    "ORACLE_ENV",
    "CaptureServer",
    "Difference",
    "LangfuseComparison",
    "LangfuseOracle",
    "Observation",
    "OracleUnavailable",
    "Score",
    "SpanLink",
    "Trace",
    "build_traces",
    "compare_with_langfuse",
    "find_langfuse_oracle",
    "format_traces",
]

PUBLIC_KEY = "pk-lf-test"
SECRET_KEY = "sk-lf-test"

_OTLP_PATH = "/api/public/otel/v1/traces"
_SCORES_PATH = "/api/public/scores"
#: SDK 4 sends scores as ``score-create`` events of the batch ingestion API.
_INGESTION_PATH = "/api/public/ingestion"
_PROJECTS_PATH = "/api/public/projects"

_OBSERVATION_METADATA = "langfuse.observation.metadata"
_TRACE_METADATA = "langfuse.trace.metadata"
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# Attributes that make a span write its trace, ``hasTraceUpdates`` in Langfuse.
_TRACE_UPDATE_KEYS = (
    "langfuse.trace.name",
    "langfuse.trace.input",
    "langfuse.trace.output",
    "langfuse.trace.public",
    "langfuse.trace.tags",
    "user.id",
    "session.id",
    "langfuse.user.id",
    "langfuse.session.id",
    f"{_OBSERVATION_METADATA}.langfuse_user_id",
    f"{_OBSERVATION_METADATA}.langfuse_session_id",
    f"{_OBSERVATION_METADATA}.langfuse_tags",
)
# The instrumentation scope of the Langfuse SDK (and of this library's lean spans).
# Spans of any other scope keep their plain attributes in metadata, under "attributes".
_LANGFUSE_SCOPE = "langfuse-sdk"
# Attributes Langfuse reads into fields, so leaves out of that "attributes" metadata.
_FIELD_ATTRIBUTES = frozenset(
    {
        "langfuse.trace.input",
        "langfuse.trace.output",
        "langfuse.observation.input",
        "langfuse.observation.output",
    }
)


class SpanLink(NamedTuple):
    """An OTel span link: the span (usually of another trace) a span points at."""

    trace_id: str
    span_id: str


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
    model: str | None = None
    model_parameters: dict[str, Any] = field(default_factory=dict)
    usage_details: dict[str, Any] = field(default_factory=dict)
    cost_details: dict[str, Any] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)
    scope: str = ""
    resource: dict[str, Any] = field(default_factory=dict)
    #: The start as sent, in nanoseconds: it orders observations that Langfuse's
    #: millisecond ``start_time`` ties (a parent and the child it starts at once).
    start_unix_nano: int = field(default=0, compare=False, repr=False)
    #: The span's OTel span links. Langfuse ignores them (it draws none); an
    #: OpenTelemetry backend shows them.
    links: list[SpanLink] = field(default_factory=list)

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
    def updates_trace(self) -> bool:
        """Whether the span sets a trace-level attribute (Langfuse's ``hasTraceUpdates``)."""
        return any(self.attributes.get(key) for key in _TRACE_UPDATE_KEYS) or any(
            key.startswith(_TRACE_METADATA) for key in self.attributes
        )

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
        """Observations without a parent span, by start time (to the nanosecond)."""
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
    received = list(observations)
    by_trace: dict[str, list[Observation]] = {}
    for obs in received:
        by_trace.setdefault(obs.trace_id, []).append(obs)
    scores_by_trace: dict[str, list[Score]] = {}
    for score in scores:
        if score.trace_id is not None:
            scores_by_trace.setdefault(score.trace_id, []).append(score)
    traces = [
        _rollup(trace_id, spans, scores_by_trace.get(trace_id, []))
        for trace_id, spans in by_trace.items()
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
    """Fold the trace writes of ``received`` (in arrival order) into one trace.

    Every copy of a span received twice writes the trace, as each becomes a
    ``trace-create`` event; the trace shows only the latest copy of the span.
    """
    trace = Trace(
        id=trace_id,
        observations=sorted(
            _latest_copies(received), key=lambda obs: (obs.start_time, obs.start_unix_nano)
        ),
        scores=scores,
    )
    for obs in received:
        for name, value in _trace_write(obs).items():
            if name == "metadata":
                trace.metadata.update(value)
            elif _meaningful(value):
                setattr(trace, name, value)
    return trace


def _trace_write(obs: Observation) -> dict[str, Any]:
    """What one span writes to its trace: the fields of the ``trace-create`` event
    Langfuse makes of it (``OtelIngestionProcessor.createTraceEvent``)."""
    is_root = obs.parent_id is None or obs.as_root
    if not is_root and not obs.updates_trace:
        return {"environment": obs.environment}
    attributes = obs.attributes
    write: dict[str, Any] = {
        "name": obs.trace_name,
        "user_id": obs.user_id,
        "session_id": obs.session_id,
        "tags": obs.tags,
        "environment": obs.environment,
        "metadata": obs.trace_metadata,
        "input": _json_value(attributes.get("langfuse.trace.input")),
        "output": _json_value(attributes.get("langfuse.trace.output")),
    }
    if is_root:
        write["name"] = obs.trace_name or obs.name
        write["metadata"] = {
            **obs.trace_metadata,
            **_metadata(attributes, _OBSERVATION_METADATA),
            **_scope_attributes(obs.scope, attributes),
        }
        write["input"] = write["input"] or obs.input
        write["output"] = write["output"] or obs.output
    return write


def _meaningful(value: Any) -> bool:
    """Langfuse's ``hasMeaningfulValue``: not null, empty string, list or object."""
    return value is not None and not (isinstance(value, (str, list, dict)) and not value)


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

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self._port = port
        self._host = host
        self._lock = threading.Lock()
        self._received: list[Observation] = []
        self._bodies: list[bytes] = []
        self._on_clear: Callable[[list[bytes]], None] | None = None
        self._scores: list[Score] = []
        self._requests = 0
        self._cleared = 0  # clear() calls: a request held past one is not kept
        self._unhandled: list[str] = []
        self._fault = _Fault()
        self._httpd: _CaptureHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind ``host`` (127.0.0.1 unless given; ``0.0.0.0`` lets a container reach
        it) on ``port`` (a free one when 0) and serve in a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError("CaptureServer is already running")
        self._httpd = _CaptureHTTPServer((self._host, self._port), self)
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
        """``http://127.0.0.1:PORT``, what ``LANGFUSE_BASE_URL`` must be on this host."""
        if self._httpd is None:
            raise RuntimeError("CaptureServer is not running; call start() first")
        return f"http://127.0.0.1:{self.port}"

    @property
    def port(self) -> int:
        """The port the server listens on."""
        if self._httpd is None:
            raise RuntimeError("CaptureServer is not running; call start() first")
        return int(self._httpd.server_address[1])

    @property
    def env(self) -> dict[str, str]:
        """Environment that points a Langfuse SDK at this server, for ``os.environ``
        or a subprocess. The short flush interval makes exports arrive within ~0.1 s
        while keeping the SDK's batching (and so its flush paths) as in production."""
        return self.env_for(self.base_url)

    def env_for(self, base_url: str) -> dict[str, str]:
        """``env`` for a process that reaches this server at another address, such as
        ``http://host.docker.internal:PORT`` from a container (see ``port``)."""
        return {
            "LANGFUSE_BASE_URL": base_url,
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
    def bodies(self) -> list[bytes]:
        """Every OTLP request body stored, uncompressed, in arrival order: exactly the
        bytes Langfuse would have decoded (see :func:`compare_with_langfuse`)."""
        with self._lock:
            return list(self._bodies)

    def take_bodies(self) -> list[bytes]:
        """``bodies``, forgetting them (the observations stay): what the pytest plugin
        compares with Langfuse after each test, so no body is compared twice."""
        with self._lock:
            bodies, self._bodies = self._bodies, []
        return bodies

    def on_clear(self, callback: Callable[[list[bytes]], None] | None) -> None:
        """Have ``clear()`` hand the bodies it forgets to ``callback`` first (the pytest
        plugin compares them with Langfuse), or stop doing so with ``None``."""
        self._on_clear = callback

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
        """Forget everything received, including the request count and ``bodies``
        (handed to the ``on_clear`` callback first)."""
        bodies = self.take_bodies()
        if self._on_clear is not None and bodies:
            self._on_clear(bodies)
        with self._lock:
            self._received.clear()
            self._scores.clear()
            self._requests = 0
            self._unhandled.clear()
            self._cleared += 1

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

    def wait_for_trace(
        self, root: str, containing: Iterable[str] = (), timeout: float = 10.0
    ) -> Trace:
        """The one trace with a root observation called ``root``, once it arrived
        together with an observation of every name in ``containing``.

        Name every observation the assertions look at: spans end and are exported
        in whatever order the processes finish them (a nested task's run can arrive
        before the run that spawned it), so waiting for the last one proves nothing
        about the others. AssertionError after ``timeout`` if there is no such
        trace, several, or one still missing a name.
        """
        wanted = set(containing)

        def matching(server: CaptureServer) -> list[Trace]:
            return [
                t for t in server.traces() if any(o.name == root for o in t.root_observations())
            ]

        def ready(server: CaptureServer) -> bool:
            found = matching(server)
            if len(found) != 1:
                return False
            return wanted <= {obs.name for obs in found[0].observations}

        try:
            self.wait_for(ready, timeout)
        except AssertionError as error:
            raise AssertionError(
                f"waiting for one trace rooted at {root!r} containing {sorted(wanted)}: {error}"
            ) from None
        (trace,) = matching(self)
        return trace

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
        if method == "POST" and route == _INGESTION_PATH:
            return self._export(route, headers, body, self._store_ingestion_batch)
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
            cleared = self._cleared
        if fault.delay:
            time.sleep(fault.delay)
            with self._lock:
                stale = cleared != self._cleared
            if stale:
                # Held past a clear(): it belongs to what was cleared (an earlier test),
                # not to what comes after. Accepted (so nothing retries it) and not kept.
                if route == _OTLP_PATH:
                    return 200, {"Content-Type": "application/x-protobuf"}, _EMPTY_OTLP_RESPONSE
                return _json_reply(200, {"message": "arrived before clear(); not kept"})
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
            self._bodies.append(body)
        return 200, {"Content-Type": "application/x-protobuf"}, _EMPTY_OTLP_RESPONSE

    def _store_scores(self, body: bytes, headers: Mapping[str, str]) -> _Reply:
        payload = json.loads(body)
        items = payload if isinstance(payload, list) else [payload]
        scores = [_score_from_json(item) for item in items]
        with self._lock:
            self._scores.extend(scores)
        return _json_reply(202, {"message": "Accepted"})

    def _store_ingestion_batch(self, body: bytes, headers: Mapping[str, str]) -> _Reply:
        """SDK 4's scores: ``{"batch": [{"id", "type": "score-create", "body"}...]}``,
        answered ``207`` with a success per event, as Langfuse does."""
        events = json.loads(body)["batch"]
        scores = []
        for event in events:
            if event.get("type") == "score-create":
                scores.append(_score_from_json(event["body"]))
            else:
                self._note_unhandled(f"POST {_INGESTION_PATH}: event {event.get('type')!r}")
        with self._lock:
            self._scores.extend(scores)
        successes = [{"id": event.get("id"), "status": 201} for event in events]
        return _json_reply(207, {"successes": successes, "errors": []})

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
        start_unix_nano=span.start_time_unix_nano,
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
        # Langfuse stores the trace metadata on every observation too, winning ties.
        metadata={
            **_scope_attributes(scope, attributes),
            **_metadata(attributes, _OBSERVATION_METADATA),
            **_metadata(attributes, _TRACE_METADATA),
        },
        environment=(
            _first_string(attributes, "langfuse.environment")
            or _first_string(resource, "langfuse.environment")
            or "default"
        ),
        model=_first_string(attributes, "langfuse.observation.model.name"),
        model_parameters=_json_object(attributes.get("langfuse.observation.model.parameters")),
        usage_details=_usage_details(
            _json_object(attributes.get("langfuse.observation.usage_details"))
        ),
        cost_details=_json_object(attributes.get("langfuse.observation.cost_details")),
        attributes=attributes,
        scope=scope,
        resource=resource,
        links=[SpanLink(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
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
    """Langfuse keeps milliseconds, rounding down."""
    return _UNIX_EPOCH + timedelta(milliseconds=unix_nano // 1_000_000)


def _scope_attributes(scope: str, attributes: Mapping[str, Any]) -> dict[str, Any]:
    """``{"attributes": ...}`` for a span from outside the Langfuse SDK: its attributes
    that no field takes, non-strings as JSON, as Langfuse keeps them in metadata."""
    if scope.startswith(_LANGFUSE_SCOPE):
        return {}
    kept = {
        key: value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        for key, value in attributes.items()
        if key not in _FIELD_ATTRIBUTES
        and not key.startswith((_TRACE_METADATA, _OBSERVATION_METADATA))
    }
    return {"attributes": kept}


def _json_value(value: Any) -> Any:
    """Decode a JSON-encoded attribute; a plain string stays a string."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _json_object(value: Any) -> dict[str, Any]:
    """A JSON object attribute as a dict; anything else (absent, invalid) as ``{}``."""
    decoded = _json_value(value)
    return dict(decoded) if isinstance(decoded, dict) else {}


#: The two OpenAI usage shapes Langfuse recognises (``UsageDetails`` in its ingestion
#: types): (input key, output key, their details keys).
_OPENAI_USAGE_SHAPES = (
    ("prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details"),
    ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details"),
)
_LEADING_INT = re.compile(r"\s*[+-]?\d+")


def _usage_details(raw: dict[str, Any]) -> dict[str, int]:
    """Usage as Langfuse stores it: an OpenAI chat or responses usage object renamed to
    ``input`` / ``output`` / ``total`` (details as ``input_<key>`` / ``output_<key>``,
    taken out of the plain counts); anything else keeps its non-negative whole numbers
    (numeric strings parsed as JavaScript's ``parseInt`` would)."""
    for input_key, output_key, input_details, output_details in _OPENAI_USAGE_SHAPES:
        shape = {input_key, output_key, "total_tokens", input_details, output_details}
        required = (input_key, output_key, "total_tokens")
        if set(raw) <= shape and all(_is_count(raw.get(key)) for key in required):
            details = (raw.get(input_details), raw.get(output_details))
            if all(_is_count_record(d) for d in details):
                usage = {
                    "input": int(raw[input_key]),
                    "output": int(raw[output_key]),
                    "total": int(raw["total_tokens"]),
                }
                for side, side_details in zip(("input", "output"), details):
                    for key, value in (side_details or {}).items():
                        if value is not None:
                            usage[f"{side}_{key}"] = int(value)
                            usage[side] = max(usage[side] - int(value), 0)
                return usage
    usage = {}
    for key, value in raw.items():
        if _is_count(value):
            usage[key] = int(value)
        elif (
            isinstance(value, str)
            and (match := _LEADING_INT.match(value))
            and int(match.group()) >= 0
        ):
            usage[key] = int(match.group())
    return usage


def _is_count(value: Any) -> bool:
    """A JSON number that is a non-negative whole number (JavaScript has no int type)."""
    return type(value) in (int, float) and value >= 0 and float(value).is_integer()


def _is_count_record(value: Any) -> bool:
    return value is None or (
        isinstance(value, dict) and all(v is None or _is_count(v) for v in value.values())
    )


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


# Langfuse's own conversion: the reference the capture server is checked against.

#: Where :func:`find_langfuse_oracle` looks first: the oracle file or its folder.
ORACLE_ENV = "CELERY_LANGFUSE_ORACLE"
_ORACLE_FILE = "langfuse-otel.cjs"
_ORACLE_DIR = Path("..", "shared", "langfuse-oracle")
_MIN_NODE_MAJOR = 20
_ORACLE_MARK = "\x1eORACLE "
# One long-lived Node process converts bodies one at a time: a line of base64 in, a
# marked line of JSON out. Anything else the bundle prints is not marked and skipped.
_ORACLE_DRIVER = r"""
const { convert } = require(process.argv[1]);
const lines = require("readline").createInterface({ input: process.stdin, crlfDelay: Infinity });
(async () => {
  for await (const line of lines) {
    let out;
    try { out = await convert(Buffer.from(line, "base64")); }
    catch (e) { out = { status: 500, error: String((e && e.stack) || e) }; }
    process.stdout.write("\u001eORACLE " + JSON.stringify(out) + "\n");
  }
})();
"""


class OracleUnavailable(RuntimeError):
    """The Langfuse oracle cannot run here; the message says why and what to do."""


def find_langfuse_oracle(start: str | Path | None = None) -> Path:
    """The oracle script, ``langfuse-otel.cjs``.

    ``$CELERY_LANGFUSE_ORACLE`` (the file or its folder) if set, else
    ``../shared/langfuse-oracle`` relative to ``start`` (default: the current
    directory). Raises :class:`OracleUnavailable` naming the places looked at.
    """
    configured = os.environ.get(ORACLE_ENV)
    place = Path(configured) if configured else Path(start or Path.cwd()) / _ORACLE_DIR
    script = place if place.suffix == ".cjs" else place / _ORACLE_FILE
    if script.is_file():
        return script.resolve()
    how = f"{ORACLE_ENV}={configured}" if configured else f"{ORACLE_ENV} is not set"
    raise OracleUnavailable(
        f"Langfuse oracle not found at {script} ({how}); set {ORACLE_ENV} to its folder"
    )


def _node_command(node: str | None) -> str:
    found = shutil.which(node or "node")
    if not found:
        raise OracleUnavailable(
            f"{node or 'node'} (>= {_MIN_NODE_MAJOR}) is not on PATH; the oracle runs on it"
        )
    version = subprocess.run(
        [found, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()
    major = version.lstrip("v").split(".", 1)[0]
    if not major.isdigit() or int(major) < _MIN_NODE_MAJOR:
        raise OracleUnavailable(f"{found} is {version or 'unknown'}; the oracle needs node >= 20")
    return found


class LangfuseOracle:
    """Langfuse's server-side conversion of OTLP bodies, in one long-lived Node process.

    ``convert(body)`` returns what the oracle's ``convert`` returns: ``status`` (200, or
    400 when Langfuse's route rejects the body), ``validation`` (ingestion events that
    fail Langfuse's schema), ``ingestionEvents`` (``trace-create`` and the observation
    events) and ``events`` (the v4 observation rows). One call costs about a
    millisecond once the process runs, so a whole test suite can go through it.
    """

    def __init__(self, script: str | Path | None = None, node: str | None = None) -> None:
        self.script = Path(script) if script is not None else find_langfuse_oracle()
        if not self.script.is_file():
            raise OracleUnavailable(f"Langfuse oracle {self.script} does not exist")
        self._node = _node_command(node)
        self._process: subprocess.Popen[str] | None = None
        self._stderr: Any = None
        self._lock = threading.Lock()

    @property
    def commit(self) -> str | None:
        """The Langfuse commit the oracle was built from (its ``COMMIT`` file)."""
        path = self.script.parent / "COMMIT"
        return path.read_text().strip() if path.is_file() else None

    def convert(self, body: bytes) -> dict[str, Any]:
        """What Langfuse makes of one OTLP request body (protobuf, gzip or not)."""
        with self._lock:
            process = self._running()
            assert process.stdin is not None and process.stdout is not None
            try:
                process.stdin.write(base64.b64encode(body).decode("ascii") + "\n")
                process.stdin.flush()
                while True:
                    line = process.stdout.readline()
                    if not line:
                        break
                    if line.startswith(_ORACLE_MARK):
                        result: dict[str, Any] = json.loads(line[len(_ORACLE_MARK) :])
                        return result
            except (BrokenPipeError, OSError):
                pass
            self._stderr.seek(0)
            error = self._stderr.read()[-2000:]
            self._process = None
        raise OracleUnavailable(f"the Langfuse oracle process ({self.script}) died: {error}")

    def _running(self) -> subprocess.Popen[str]:
        if self._process is None or self._process.poll() is not None:
            # kept open for the life of the process, read when it dies
            self._stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115
            self._process = subprocess.Popen(
                [self._node, "-e", _ORACLE_DRIVER, str(self.script)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                text=True,
            )
        return self._process

    def close(self) -> None:
        """Stop the Node process (it starts again on the next ``convert``)."""
        with self._lock:
            process, self._process = self._process, None
        if process is not None:
            assert process.stdin is not None
            process.stdin.close()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> LangfuseOracle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass
class Difference:
    """One field on which the capture server and Langfuse disagree."""

    where: str
    field: str
    capture: Any
    langfuse: Any

    def __str__(self) -> str:
        return (
            f"{self.where}: {self.field}\n"
            f"    capture server: {self.capture!r}\n"
            f"    Langfuse:       {self.langfuse!r}"
        )


@dataclass
class LangfuseComparison:
    """The outcome of :func:`compare_with_langfuse`: counts, and what disagreed."""

    bodies: int = 0
    observations: int = 0
    traces: int = 0
    rejected: list[str] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Langfuse accepted every body and reads it as the capture server does."""
        return not self.rejected and not self.differences

    def report(self, limit: int = 40) -> str:
        """The rejections and differences, readable; ``limit`` differences at most."""
        lines = [
            f"compared {self.bodies} OTLP bodies, {self.observations} observations, "
            f"{self.traces} traces with Langfuse's own conversion: "
            f"{len(self.rejected)} rejected, {len(self.differences)} differences"
        ]
        lines.extend(f"  rejected: {reason}" for reason in self.rejected)
        lines.extend(str(difference) for difference in self.differences[:limit])
        if len(self.differences) > limit:
            lines.append(f"... and {len(self.differences) - limit} more differences")
        return "\n".join(lines)


def compare_with_langfuse(bodies: Iterable[bytes], oracle: LangfuseOracle) -> LangfuseComparison:
    """Feed OTLP request bodies to Langfuse's own conversion and compare, observation by
    observation and trace by trace, with what the capture server rebuilds from them.

    ``bodies`` in arrival order, uncompressed (:attr:`CaptureServer.bodies`). Traces are
    compared over all of them together, since one trace's spans arrive in several.
    """
    comparison = LangfuseComparison()
    received: list[Observation] = []
    trace_events: list[dict[str, Any]] = []
    for number, body in enumerate(bodies, 1):
        comparison.bodies += 1
        result = oracle.convert(body)
        if result.get("status") != 200 or result.get("validation"):
            comparison.rejected.append(f"body {number}: {_rejection(result)}")
            continue
        observations = _observations_from_otlp(body)
        received.extend(observations)
        rows = {(row["traceId"], row["spanId"]): row for row in result.get("events", [])}
        for obs in observations:
            comparison.observations += 1
            row = rows.pop((obs.trace_id, obs.id), None)
            where = f"observation {obs.id} {obs.name!r} (trace {obs.trace_id}, body {number})"
            if row is None:
                comparison.differences.append(Difference(where, "present", True, False))
                continue
            comparison.differences.extend(
                _differences(where, _capture_observation(obs), _langfuse_observation(row))
            )
        for (trace_id, span_id), row in rows.items():
            where = f"observation {span_id} {row.get('name')!r} (trace {trace_id}, body {number})"
            comparison.differences.append(Difference(where, "present", False, True))
        trace_events.extend(
            event["body"]
            for event in result.get("ingestionEvents", [])
            if event.get("type") == "trace-create"
        )
    langfuse_traces = _langfuse_traces(trace_events)
    for trace in build_traces(received):
        comparison.traces += 1
        where = f"trace {trace.id}"
        langfuse_trace = langfuse_traces.pop(trace.id, None)
        if langfuse_trace is None:
            comparison.differences.append(Difference(where, "present", True, False))
            continue
        comparison.differences.extend(_differences(where, _capture_trace(trace), langfuse_trace))
    for trace_id in langfuse_traces:
        comparison.differences.append(Difference(f"trace {trace_id}", "present", False, True))
    return comparison


def _rejection(result: Mapping[str, Any]) -> str:
    if result.get("status") != 200:
        return f"status {result.get('status')}: {result.get('rejected') or result.get('error')}"
    issues = [
        f"{item.get('type')} {item.get('id')}: "
        + "; ".join(
            f"{'.'.join(map(str, issue.get('path', [])))} {issue.get('message')}"
            for issue in item.get("issues", [])
        )
        for item in result.get("validation", [])
    ]
    return "fails Langfuse's ingestion schema: " + " | ".join(issues)


def _differences(
    where: str, capture: Mapping[str, Any], langfuse: Mapping[str, Any]
) -> list[Difference]:
    return [
        Difference(where, key, capture.get(key), langfuse.get(key))
        for key in capture
        if not (
            _same_metadata(capture[key], langfuse.get(key) or {})
            if key == "metadata"
            else capture.get(key) == langfuse.get(key)
        )
    ]


def _same_metadata(capture: Mapping[str, Any], langfuse: Mapping[str, Any]) -> bool:
    """Metadata equal as Langfuse keeps it: one string per key, so a string value and
    the value it spells (``"42"`` and ``42``) are the same there."""
    return capture.keys() == langfuse.keys() and all(
        capture[key] == langfuse[key] or _stored(capture[key]) == _stored(langfuse[key])
        for key in capture
    )


def _stored(value: Any) -> str:
    """A metadata value as Langfuse stores it: strings as they are, the rest as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


_GENERATION_TYPES = frozenset({"GENERATION", "EMBEDDING"})
# Keys Langfuse adds to every observation's metadata from the resource and the scope;
# the capture server keeps those apart, as ``resource`` and ``scope``.
_LANGFUSE_METADATA_KEYS = ("resourceAttributes", "scope")


def _from_iso(value: str | None) -> datetime | None:
    """Langfuse's ISO timestamp (``...T06:21:14.756Z``) as an aware datetime."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _capture_observation(obs: Observation) -> dict[str, Any]:
    view = {
        "id": obs.id,
        "parent_id": obs.parent_id,
        "trace_id": obs.trace_id,
        "name": obs.name,
        "type": obs.type.upper(),
        "level": obs.level,
        "status_message": obs.status_message,
        "input": obs.input,
        "output": obs.output,
        "metadata": obs.metadata,
        "environment": obs.environment,
        "user_id": obs.user_id,
        "session_id": obs.session_id,
        "tags": obs.tags,
        "trace_name": obs.trace_name,
        "start_time": obs.start_time,
        "end_time": obs.end_time,
        "resource": obs.resource,
        "scope": obs.scope,
    }
    if view["type"] in _GENERATION_TYPES:
        view.update(
            model=obs.model,
            model_parameters=obs.model_parameters,
            usage_details=obs.usage_details,
            cost_details=obs.cost_details,
        )
    return view


def _langfuse_observation(row: Mapping[str, Any]) -> dict[str, Any]:
    metadata = dict(row.get("metadata") or {})
    resource = metadata.pop("resourceAttributes", {})
    scope = metadata.pop("scope", {})
    return {
        "id": row["spanId"],
        "parent_id": row.get("parentSpanId"),
        "trace_id": row["traceId"],
        "name": row.get("name"),
        "type": row.get("type"),
        "level": row.get("level"),
        "status_message": row.get("statusMessage"),
        "input": _json_value(row.get("input")),
        "output": _json_value(row.get("output")),
        "metadata": {key: _json_value(value) for key, value in metadata.items()},
        "environment": row.get("environment"),
        "user_id": row.get("userId"),
        "session_id": row.get("sessionId"),
        "tags": row.get("tags") or [],
        "trace_name": row.get("traceName"),
        "start_time": _from_iso(row.get("startTimeISO")),
        "end_time": _from_iso(row.get("endTimeISO")),
        "resource": resource,
        "scope": scope.get("name", "") if isinstance(scope, dict) else scope,
        "model": row.get("modelName"),
        "model_parameters": row.get("modelParameters") or {},
        "usage_details": row.get("providedUsageDetails") or {},
        "cost_details": row.get("providedCostDetails") or {},
    }


def _capture_trace(trace: Trace) -> dict[str, Any]:
    return {
        "name": trace.name,
        "user_id": trace.user_id,
        "session_id": trace.session_id,
        "tags": trace.tags,
        "environment": trace.environment,
        "metadata": trace.metadata,
        "input": trace.input,
        "output": trace.output,
    }


def _langfuse_traces(trace_events: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Trace fields from ``trace-create`` events in order: a field's last meaningful
    value wins, metadata merges key by key (the oracle README's rule)."""
    fields = {
        "name": "name",
        "userId": "user_id",
        "sessionId": "session_id",
        "tags": "tags",
        "environment": "environment",
        "input": "input",
        "output": "output",
    }
    traces: dict[str, dict[str, Any]] = {}
    for body in trace_events:
        trace = traces.setdefault(
            body["id"],
            {
                "name": None,
                "user_id": None,
                "session_id": None,
                "tags": [],
                "environment": None,
                "metadata": {},
                "input": None,
                "output": None,
            },
        )
        for key, name in fields.items():
            value = body.get(key)
            if value not in (None, "", [], {}):
                trace[name] = _json_value(value) if name in ("input", "output") else value
        for key, value in (body.get("metadata") or {}).items():
            if key not in _LANGFUSE_METADATA_KEYS:
                trace["metadata"][key] = _json_value(value)
    return traces
