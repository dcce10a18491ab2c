"""The installed Langfuse Python SDK: its version, whether it is supported, and what
differs between the supported versions.

celery-langfuse supports ``langfuse>=4.7,<6``. The versions differ in what this
library must copy or follow (checked against each release's source; see
docs/design.md, "Langfuse SDK versions"):

- the server they need: SDK 5 needs Langfuse Cloud or a self-hosted Langfuse v4.59.0
  or later (Langfuse's v4 to v5 guide); SDK 4 works with Cloud and self-hosted
  v3.63.0 or later (Langfuse's compatibility matrix), and SDK 4.7.0 is the oldest that
  Langfuse Cloud takes after its v4 cutover;
- the wire format of the span export: SDK 5 gzips by default and sends
  ``x-langfuse-ingestion-version: 4``; SDK 4 sends neither (4.18 added the
  ``otel_compression`` setting, off by default);
- metadata values: SDK 5 JSON-encodes every value, strings included, on spans and
  in ``propagate_attributes``; SDK 4 writes strings and integers as they are and
  JSON-encodes the rest (4.7 keeps only strings in ``propagate_attributes``, 4.12
  to 4.18 convert the others with ``str()``);
- what ``propagate_attributes`` carries: ``environment`` since 4.12, ``prompt``
  since 4.14, ``skills_available`` and ``attach_skills`` since 5.2; ``create_score``
  takes ``environment`` since 4.12;
- media: uploaded by the exporter from span attributes since 4.12, by the span
  wrapper where a field is set before;
- the resource manager's fields: ``id_generator`` and ``mask_otel_spans`` since
  4.12, ``otel_compression`` since 4.18, ``skills`` since 5.2, and
  ``blocked_instrumentation_scopes`` only before 5;
- scores: SDK 5's ``flush()`` wakes its score consumers; SDK 4's waits for them, up
  to ``flush_interval``.

The version is read once, from the package metadata (the SDK itself is not imported:
a worker whose tasks never use it does not pay for it), and everything else here is
derived from it. :func:`require_supported` is what ``install()`` calls. The
version-dependent private details that are more than a fact live here too: the media
upload of SDKs before 4.12 (:func:`upload_media_in_attributes`) and waking SDK 4's
score consumers on a flush (:func:`wake_score_consumers`); tests/test_sdk_contract.py
pins them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from typing import Any, Callable, Optional

from .config import ConfigurationError

#: The versions this library supports, as pyproject.toml declares them.
SUPPORTED_RANGE = ">=4.7,<6"
_OLDEST = (4, 7, 0)
_FIRST_UNSUPPORTED = (6, 0, 0)

#: ``propagate_attributes`` keywords whose values cross the broker, and the SDK
#: version that added each (the others are in every supported version).
_PROPAGATED_SINCE = {
    "environment": (4, 12, 0),
    "prompt": (4, 14, 0),
    "skills_available": (5, 2, 0),
    "attach_skills": (5, 2, 0),
}
_ALWAYS_PROPAGATED = ("user_id", "session_id", "tags", "trace_name", "version", "metadata")


@dataclass(frozen=True)
class InstalledSdk:
    """The Langfuse SDK found in this environment, and its facts."""

    #: The version string, as installed; None when the SDK is not installed.
    version: Optional[str]
    #: Its release number (major, minor, patch); (0, 0, 0) when not installed.
    release: tuple[int, int, int]

    @property
    def supported(self) -> bool:
        return _OLDEST <= self.release < _FIRST_UNSUPPORTED

    @property
    def major(self) -> int:
        return self.release[0]

    @property
    def minimum_server(self) -> str:
        """The Langfuse server this SDK needs, in words."""
        if self.major >= 5:
            return "Langfuse Cloud, or self-hosted Langfuse v4.59.0 or later"
        return "Langfuse Cloud, or self-hosted Langfuse v3.63.0 or later (v3 or v4)"

    @property
    def ingestion_version(self) -> Optional[str]:
        """The ``x-langfuse-ingestion-version`` header the SDK's exporter sends."""
        return "4" if self.major >= 5 else None

    @property
    def gzip_by_default(self) -> bool:
        """Whether the SDK's exporter gzips when nothing is configured."""
        return self.major >= 5

    @property
    def has_compression_setting(self) -> bool:
        """Whether ``otel_compression`` / ``LANGFUSE_OTEL_COMPRESSION`` exist (4.18+)."""
        return self.release >= (4, 18, 0)

    @property
    def score_takes_environment(self) -> bool:
        """Whether ``create_score`` takes ``environment=`` (4.12+)."""
        return self.release >= (4, 12, 0)

    @property
    def media_scanned_at_export(self) -> bool:
        """Whether the SDK's exporter finds and uploads media in span attributes (4.12+);
        before, its span wrapper did it where input, output or metadata was set."""
        return self.release >= (4, 12, 0)

    @property
    def metadata_values_are_json(self) -> bool:
        """Whether metadata values are JSON-encoded, strings included (SDK 5)."""
        return self.major >= 5

    @property
    def propagated_arguments(self) -> frozenset[str]:
        """The ``propagate_attributes`` keywords this SDK takes that cross the broker."""
        since = _PROPAGATED_SINCE
        return frozenset(
            (*_ALWAYS_PROPAGATED, *(name for name in since if self.release >= since[name]))
        )

    def metadata_encoder(self) -> Callable[[Any], Optional[str]]:
        """The SDK's encoding of one metadata value of an observation, as its
        ``_flatten_and_serialize_metadata`` writes a ``langfuse.observation.metadata.<key>``
        attribute (None: the key is not written)."""
        return _json_metadata_value if self.metadata_values_are_json else _sdk4_metadata_value


def _json_metadata_value(value: Any) -> Optional[str]:
    # SDK 5: every value JSON, strings too; compact, non-ASCII kept as it is.
    if value is None:
        return None
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def _sdk4_metadata_value(value: Any) -> Optional[str]:
    # SDK 4: strings and integers (booleans too: they are ints) as they are, the rest
    # through json.dumps with its default separators and ASCII escapes.
    if value is None or isinstance(value, (str, int)):
        return value  # type: ignore[return-value]  # an int is an attribute value too
    return json.dumps(value, default=str)


_MEDIA_FIELDS = {
    "langfuse.observation.input": "input",
    "langfuse.observation.output": "output",
    "langfuse.observation.metadata": "metadata",
}


def upload_media_in_attributes(
    attributes: dict[str, Any], trace_id: int, span_id: int, media_manager: Any
) -> None:
    """For SDK 4.7 to 4.11, whose exporter does not upload media: do what its span
    wrapper does where input, output or metadata is set, with its private media
    manager, to the JSON of each such attribute carrying a base64 data URI (replaced
    by the media reference the upload returns)."""
    from langfuse._utils.serializer import EventSerializer

    for key, value in list(attributes.items()):
        if not (isinstance(value, str) and ";base64," in value):
            continue
        field = _MEDIA_FIELDS.get(key) or (
            "metadata" if key.startswith("langfuse.observation.metadata.") else None
        )
        if field is None:
            continue
        try:
            data = json.loads(value)
        except ValueError:
            data = value
        processed = media_manager._find_and_process_media(
            data=data,
            field=field,
            trace_id=format(trace_id, "032x"),
            observation_id=format(span_id, "016x"),
        )
        attributes[key] = (
            processed if isinstance(processed, str) else json.dumps(processed, cls=EventSerializer)
        )


def wake_score_consumers(resources: Any) -> None:
    """Make SDK 4's score consumers of one client (its resource manager,
    ``client._resources``) send what they hold now, as SDK 5's ``flush()`` does itself
    (it wakes them). SDK 4's ``flush()`` only waits for its queue, which a consumer
    drains once per ``flush_interval``: a process exiting within a shorter deadline
    would lose its last scores. A consumer takes its shutdown sentinel as "send this
    batch now" and, still running, goes on: one sentinel per consumer. For the flush
    path: call before the manager's (or client's) ``flush()`` / ``shutdown()``."""
    if installed().major >= 5:
        return
    import importlib

    # A module SDK 5 no longer has: imported by name, for the type checker's sake.
    consumers = importlib.import_module("langfuse._task_manager.score_ingestion_consumer")
    for consumer in getattr(resources, "_ingestion_consumers", ()):
        if consumer.is_alive():
            resources._score_ingestion_queue.put(consumers._SHUTDOWN_SENTINEL, block=False)


_RELEASE = re.compile(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def parse_release(version: str) -> tuple[int, int, int]:
    """``"5.2.0"`` -> (5, 2, 0); pre-release and local parts are ignored; (0, 0, 0)
    when it does not start with a number."""
    match = _RELEASE.match(version.strip())
    if match is None:
        return (0, 0, 0)
    major, minor, patch = (int(part or 0) for part in match.groups())
    return (major, minor, patch)


@cache
def installed() -> InstalledSdk:
    """The installed SDK, read once per process from its package metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found: Optional[str] = version("langfuse")
    except PackageNotFoundError:
        found = None
    return InstalledSdk(found, parse_release(found) if found else (0, 0, 0))


def require_supported() -> InstalledSdk:
    """The installed SDK, or :class:`ConfigurationError` naming the version found and
    the supported range."""
    sdk = installed()
    if not sdk.supported:
        found = "not installed" if sdk.version is None else f"langfuse {sdk.version}"
        raise ConfigurationError(
            f"celery-langfuse supports the Langfuse Python SDK langfuse{SUPPORTED_RANGE}; "
            f"found {found}. Install a supported version, e.g. "
            "pip install 'langfuse>=4.7,<6' (install() connected nothing)"
        )
    return sdk
