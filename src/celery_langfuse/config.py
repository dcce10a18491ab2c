"""Settings of one installation: where each comes from, presets, and errors for people.

Every setting is resolved once, at ``install()``, from the first source that has it:

1. an ``install(app, **options)`` argument;
2. a ``CELERY_LANGFUSE_<SETTING>`` environment variable;
3. for ``flush_at`` / ``flush_interval`` only, the SDK's own ``LANGFUSE_FLUSH_AT`` /
   ``LANGFUSE_FLUSH_INTERVAL`` (the SDK variables keep their meaning);
4. the Celery app's configuration: key ``langfuse_<setting>`` of ``app.conf``, which
   is ``CELERY_LANGFUSE_<SETTING>`` in Django's settings.py when the app reads them
   with ``config_from_object("django.conf:settings", namespace="CELERY")``
   (:func:`app_settings`);
5. the environment preset (``development``, ``staging``, ``production``), chosen by
   the ``preset`` setting or, without one, by ``LANGFUSE_TRACING_ENVIRONMENT``;
6. the default.

A wrong value raises :class:`ConfigurationError` naming the setting as it was given
(``sample_rate=1.5``, ``CELERY_LANGFUSE_SAMPLE_RATE='1.5'`` or, from the app's
configuration, ``CELERY_LANGFUSE_SAMPLE_RATE=1.5``), the value, and what is allowed.
Patterns and masks are compiled here, once, so the handlers never parse a setting or
read the environment per task.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, Union

from ._policy import Sampler, TaskPolicy
from .payload import PayloadCapture, Redactor

log = logging.getLogger(__name__)


class ConfigurationError(ValueError):
    """A setting has a value that is not allowed; the message names both."""


ENV_PREFIX = "CELERY_LANGFUSE_"

#: The values each preset sets; any of them can still be overridden.
PRESETS: Mapping[str, Mapping[str, Any]] = {
    "development": dict(flush_at=1, flush_interval=1.0, sample_rate=1.0, keep_failures=True),
    "staging": dict(flush_at=15, flush_interval=5.0, sample_rate=0.5, keep_failures=True),
    "production": dict(flush_at=25, flush_interval=5.0, sample_rate=0.1, keep_failures=True),
}
#: ``LANGFUSE_TRACING_ENVIRONMENT`` values (and ``preset`` spellings) naming a preset.
PRESET_ALIASES: Mapping[str, str] = {
    "development": "development",
    "dev": "development",
    "local": "development",
    "staging": "staging",
    "stage": "staging",
    "production": "production",
    "prod": "production",
}


@dataclass(frozen=True)
class TracingConfig:
    """What ``install(app, **options)`` accepts; see docs/configuration.md.

    enabled:
        Trace at all. Off, ``install`` connects nothing.
    preset:
        ``development``, ``staging`` or ``production``: flush batch size and interval,
        sample rate, keep failures. Defaults from ``LANGFUSE_TRACING_ENVIRONMENT``.
    sample_rate:
        Share of new traces kept, decided from the trace id (0 to 1).
    keep_failures:
        A task that fails in a sampled-out trace is still recorded, as the root of
        its trace, with its input and error.
    task_sample_rates:
        ``{fnmatch pattern: rate}`` for traces that start with a matching task; the
        first matching pattern wins.
    sampler:
        ``sampler(SamplingContext) -> rate | bool`` for new traces whose task matches
        no ``task_sample_rates`` pattern.
    exclude_tasks:
        fnmatch patterns of tasks never traced; Celery's own ``celery.*`` by default.
    capture_input / capture_output:
        Record task args/kwargs and return values on the run observation.
    capture_exclude_tasks:
        fnmatch patterns of tasks whose input and output are never captured (a task
        can also say so itself: ``@app.task(langfuse_capture=False)``).
    redact_keys:
        More key names whose values are replaced by ``[REDACTED]``, on top of the
        built-in list (password, token, api_key, authorization, cookie, ...).
    mask:
        ``mask(value) -> value``, applied to every captured input and output after
        redaction; if it raises, the value is not captured.
    max_payload_chars:
        Upper bound on the JSON size of one captured input or output; larger values
        are cut with a visible ``...[truncated]`` marker.
    flush_at / flush_interval:
        The SDK's export batch size and interval (seconds); ``None`` leaves the SDK's
        own (``LANGFUSE_FLUSH_AT`` / ``LANGFUSE_FLUSH_INTERVAL``, else 512 / 5 s).
        Applied when this library creates the process's Langfuse client.
    flush_timeout:
        Seconds a process may spend sending buffered observations when it shuts down
        (prefork child exit, worker shutdown, interpreter exit).
    max_open_runs:
        Upper bound on task runs tracked at once in one process; past it the oldest
        run is closed (level WARNING) so the registry can never grow without bound.
    export:
        ``"direct"``: the SDK sends spans to Langfuse itself. ``"durable"``: spans go
        to a bounded queue in Redis or RabbitMQ, and ``celery-langfuse forward`` sends
        them on, removing each batch only once Langfuse answered it (docs/reliability.md).
    durable_url:
        Where the durable queue lives: a Redis (``redis://``, ``rediss://``,
        ``unix://``), a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``) or
        RabbitMQ (``amqp://``, ``amqps://``); required with ``export="durable"``,
        refused without it. ``install()`` connects once and raises if it cannot.
    durable_queue:
        Name of the durable queue, so several apps or projects can share one server.
    durable_max_bytes:
        Upper bound on the span data the durable queue holds; past it the oldest
        batches are dropped, counted and logged.
    producer_secret:
        Unset (the default), a worker takes the trace attributes (user, session, tags,
        ...) and the Langfuse parent of every message: whoever can publish to your
        broker can already run your tasks. Set, this app signs the messages it
        publishes with it, and its workers take them only from messages signed with
        the same secret (other messages still run and are traced, in a trace of
        their own or continuing their W3C ``traceparent``). For a worker consuming a
        queue other services publish to. Never shown in errors or ``doctor``.
    durable_buffer_bytes:
        Per process: span data held in memory while the queue does not answer,
        written once it does; past it the oldest go to ``durable_spill_dir``, or are
        dropped, counted and logged.
    durable_spill_dir:
        A local directory for what does not fit in memory during a queue outage, and
        for what a process still holds when it exits; ``None``: none.
    durable_spill_max_bytes:
        Upper bound on the span data in ``durable_spill_dir`` (all processes of the
        host together); past it the oldest are dropped, counted and logged.
    log_trace_ids:
        Log records made while an observation is current carry ``langfuse_trace_id``
        and ``langfuse_observation_id`` (empty strings elsewhere), for log formats and
        structured loggers (see ``trace_logs.py``); runs set
        ``task.request.langfuse_trace_id``.
    project_id:
        The Langfuse project id (in the project's URL and settings), so runs can set
        ``task.request.langfuse_trace_url``; unset, no URL is given (finding it would
        take an API call).
    linked_trace_tasks:
        fnmatch patterns of tasks that, published inside a trace, start a trace of
        their own linked to it (fan-out): the new trace keeps user, session and tags,
        and its metadata names the parent trace and observation; the publish
        observation names the new trace. A pattern matching no registered task is an
        error at ``install()`` once the app's tasks are registered, else a warning when
        the worker is ready. Per call: header ``x-langfuse-linked-trace: "1"`` (or
        ``"0"`` to stay in the caller's trace).
    max_trace_observations:
        Past this many observations recorded in one trace by one process, tasks that
        process publishes in that trace start linked traces (one warning); None: no
        limit.
    """

    enabled: bool = True
    preset: Optional[str] = None
    sample_rate: float = 1.0
    keep_failures: bool = True
    task_sample_rates: Mapping[str, float] = field(default_factory=dict, hash=False)
    sampler: Optional[Sampler] = None
    exclude_tasks: Sequence[str] = ("celery.*",)
    capture_input: bool = True
    capture_output: bool = True
    capture_exclude_tasks: Sequence[str] = ()
    redact_keys: Sequence[str] = ()
    mask: Optional[Callable[[Any], Any]] = None
    max_payload_chars: int = 10_000
    flush_at: Optional[int] = None
    flush_interval: Optional[float] = None
    flush_timeout: float = 3.0
    max_open_runs: int = 10_000
    export: str = "direct"
    durable_url: Optional[str] = None
    durable_queue: str = "celery-langfuse"
    durable_max_bytes: int = 256 * 1024 * 1024
    producer_secret: Optional[str] = field(default=None, repr=False)
    durable_buffer_bytes: int = 16 * 1024 * 1024
    durable_spill_dir: Optional[str] = None
    durable_spill_max_bytes: int = 1024 * 1024 * 1024
    log_trace_ids: bool = True
    project_id: Optional[str] = None
    linked_trace_tasks: Sequence[str] = ()
    max_trace_observations: Optional[int] = 10_000

    #: Compiled from the settings above: task-name rules and sampling decisions.
    policy: TaskPolicy = field(init=False, repr=False, compare=False, hash=False)
    #: Compiled from the settings above: how one input or output is captured.
    payload: PayloadCapture = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        for setting in _SETTINGS:
            value = getattr(self, setting.name)
            _require(f"{setting.name}={_shown(value, setting)}", value, setting)
        if (self.export == "durable") != (self.durable_url is not None):
            raise ConfigurationError(
                f"celery-langfuse setting durable_url={self.durable_url!r}: must be "
                + (
                    "set when export='durable'"
                    if self.export == "durable"
                    else "unset unless export='durable'"
                )
            )
        # Normalised so that equal settings compare equal, however they were given.
        object.__setattr__(self, "task_sample_rates", dict(self.task_sample_rates))
        for name in (
            "exclude_tasks", "capture_exclude_tasks", "redact_keys", "linked_trace_tasks"
        ):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.preset is not None:
            object.__setattr__(self, "preset", PRESET_ALIASES[self.preset.lower()])
        object.__setattr__(
            self,
            "policy",
            TaskPolicy(
                exclude_tasks=self.exclude_tasks,
                task_sample_rates=self.task_sample_rates,
                capture_exclude_tasks=self.capture_exclude_tasks,
                sample_rate=self.sample_rate,
                sampler=self.sampler,
                keep_failures=self.keep_failures,
                linked_trace_tasks=self.linked_trace_tasks,
            ),
        )
        object.__setattr__(
            self,
            "payload",
            PayloadCapture(self.max_payload_chars, Redactor(self.redact_keys), self.mask),
        )
        if "_sources" not in self.__dict__:
            defaults = TracingConfig.__dataclass_fields__
            object.__setattr__(
                self,
                "_sources",
                {
                    f.name: "argument"
                    for f in fields(self)
                    if f.init and getattr(self, f.name) != _default_of(defaults[f.name])
                },
            )

    @classmethod
    def resolve(
        cls,
        options: Mapping[str, Any],
        environ: Optional[Mapping[str, str]] = None,
        app_config: Optional[Mapping[str, tuple[Any, str]]] = None,
    ) -> TracingConfig:
        """The settings of one ``install(app, **options)``, from every source in order.

        ``app_config`` is what :func:`app_settings` read from the app's configuration.
        """
        environ = os.environ if environ is None else environ
        app_config = app_config or {}
        unknown = sorted(set(options) - set(SETTING_NAMES))
        if unknown:
            raise ConfigurationError(
                f"install() got unknown option(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(SETTING_NAMES))}"
            )
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for setting in _SETTINGS:
            found = _from_sources(setting, options, environ, app_config, values.get("preset"))
            if found is not None:
                values[setting.name], sources[setting.name] = found
        config = cls(**values)
        object.__setattr__(config, "_sources", sources)
        return config

    def source_of(self, name: str) -> str:
        """Where the value of setting ``name`` came from, for people (and ``doctor``)."""
        sources: dict[str, str] = self.__dict__["_sources"]
        return sources.get(name, "default")

    def traces_task(self, task_name: str) -> bool:
        """Whether runs of ``task_name`` are traced at all: not excluded by
        ``exclude_tasks`` (and tracing enabled). For other layers, such as beat."""
        return self.enabled and self.policy.traces_task(task_name)


@dataclass(frozen=True)
class _Setting:
    name: str
    check: Callable[[Any], bool]
    allowed: str
    parse: Optional[Callable[[str], Any]] = None  # None: not settable from the environment
    sdk_env: Optional[str] = None
    secret: bool = False  # its value is never shown in an error

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


def _from_sources(
    setting: _Setting,
    options: Mapping[str, Any],
    environ: Mapping[str, str],
    app_config: Mapping[str, tuple[Any, str]],
    preset: Optional[str],
) -> Optional[tuple[Any, str]]:
    """``(value, source)`` from the first source that sets ``setting``, validated."""
    name = setting.name
    if name in options:
        value = options[name]
        _require(f"{name}={_shown(value, setting)}", value, setting)
        return value, "install()"
    for variable in (setting.env, setting.sdk_env):
        if variable is None or setting.parse is None:
            continue
        raw = environ.get(variable)
        # An empty variable means unset, but not for a secret: there it is a secret
        # that failed to reach the process, and trusting everyone instead fails open.
        if raw is None or (
            raw.strip() == "" and not _is_list_setting(setting) and not setting.secret
        ):
            continue
        value = setting.parse(raw)
        _require(f"{variable}={_shown(raw, setting)}", value, setting)
        return value, variable
    if name in app_config:
        given, key = app_config[name]
        # settings.py often reads the environment, so a string is parsed as one would be.
        value = setting.parse(given) if isinstance(given, str) and setting.parse else given
        _require(f"{key}={_shown(given, setting)}", value, setting)
        return value, f"app config {key}"
    if name == "preset":
        named = environ.get("LANGFUSE_TRACING_ENVIRONMENT", "").strip().lower()
        if named in PRESET_ALIASES:
            return PRESET_ALIASES[named], "LANGFUSE_TRACING_ENVIRONMENT"
        return None
    if preset is not None:
        canonical = PRESET_ALIASES[preset.lower()]
        if name in PRESETS[canonical]:
            return PRESETS[canonical][name], f"preset {canonical}"
    return None


# -- parsing environment values -------------------------------------------------------
#
# A value that does not parse becomes _INVALID, which every check rejects, so a
# malformed variable and an out-of-range one get the same message.

_INVALID = object()
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _parse_bool(raw: str) -> Any:
    value = raw.strip().lower()
    return True if value in _TRUE else False if value in _FALSE else _INVALID


def _parse_float(raw: str) -> Any:
    try:
        return float(raw)
    except ValueError:
        return _INVALID


def _parse_int(raw: str) -> Any:
    try:
        return int(raw)
    except ValueError:
        return _INVALID


def _parse_list(raw: str) -> Any:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _parse_rates(raw: str) -> Any:
    rates: dict[str, float] = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        pattern, sep, rate = item.rpartition("=")
        parsed = _parse_float(rate)
        if not sep or not pattern.strip() or parsed is _INVALID:
            return _INVALID
        rates[pattern.strip()] = parsed
    return rates


def _parse_preset(raw: str) -> Any:
    return raw.strip().lower()


# -- checks ---------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rate(value: Any) -> bool:
    return _is_number(value) and 0 <= value <= 1


def _is_patterns(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple, set, frozenset))
        and all(isinstance(item, str) and item for item in value)
    )


def _is_rates(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(pattern, str) and pattern and _is_rate(rate) for pattern, rate in value.items()
    )


def _is_list_setting(setting: _Setting) -> bool:
    return setting.parse in (_parse_list, _parse_rates)


# -- trust settings (shared with the web middlewares' settings) --------------------------

_SECRET = re.compile(r"[\x21-\x7e]{16,1024}")
#: What a trust secret must be: usable as an HTTP header value as it is, and not short.
SECRET_ALLOWED = "a string of 16 to 1024 visible ASCII characters (no spaces)"

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def is_secret(value: Any) -> bool:
    """Whether ``value`` can be a trust secret (``producer_secret``, the web ``trust_secret``)."""
    return isinstance(value, str) and _SECRET.fullmatch(value) is not None


def shown_secret(value: Any) -> str:
    """A secret setting's value as an error message may show it: never the secret."""
    if isinstance(value, str):
        return repr(value) if not value.strip() else f"<secret of {len(value)} characters>"
    return f"<{type(value).__name__}>"


def parse_networks(setting: str, value: Any) -> tuple[Network, ...]:
    """``value`` (CIDRs or addresses, ``"10.0.0.0/8"``, ``"::1"``) as networks, or a
    :class:`ConfigurationError` naming ``setting`` and the entry that is not one."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Collection):
        raise ConfigurationError(
            f"celery-langfuse setting {setting}={value!r}: must be a list of networks "
            "(CIDR such as '10.0.0.0/8' or an address such as '10.1.2.3')"
        )
    networks = []
    for entry in value:
        try:
            if not isinstance(entry, str):
                raise ValueError(f"a {type(entry).__name__}, not a string")
            networks.append(ipaddress.ip_network(entry.strip()))
        except ValueError as exc:
            raise ConfigurationError(
                f"celery-langfuse setting {setting}: {entry!r} is not a network ({exc}); "
                "give a CIDR such as '10.0.0.0/8' or '2001:db8::/32', or an address"
            ) from None
    return tuple(networks)


def _shown(value: Any, setting: _Setting) -> str:
    return shown_secret(value) if setting.secret else repr(value)


_DURABLE_SCHEMES = tuple(
    f"{scheme}://"
    for scheme in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "amqp", "amqps")
)
_PROJECT_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")
_QUEUE_NAME = re.compile(r"[A-Za-z0-9._:-]{1,100}")
_BOOL = "true or false"
_PATTERNS = "a list of task name patterns (fnmatch), comma-separated in the environment"

_SETTINGS: tuple[_Setting, ...] = (
    _Setting("enabled", lambda v: isinstance(v, bool), _BOOL, _parse_bool),
    _Setting(
        "preset",
        lambda v: v is None or (isinstance(v, str) and v.lower() in PRESET_ALIASES),
        "one of development, staging, production",
        _parse_preset,
    ),
    _Setting("sample_rate", _is_rate, "a number from 0 to 1", _parse_float),
    _Setting("keep_failures", lambda v: isinstance(v, bool), _BOOL, _parse_bool),
    _Setting(
        "task_sample_rates",
        _is_rates,
        "a mapping of task name patterns to numbers from 0 to 1, "
        "'pattern=rate,pattern=rate' in the environment",
        _parse_rates,
    ),
    _Setting(
        "sampler",
        lambda v: v is None or callable(v),
        "a callable taking a SamplingContext and returning a number from 0 to 1 or a bool",
    ),
    _Setting("exclude_tasks", _is_patterns, _PATTERNS, _parse_list),
    _Setting("capture_input", lambda v: isinstance(v, bool), _BOOL, _parse_bool),
    _Setting("capture_output", lambda v: isinstance(v, bool), _BOOL, _parse_bool),
    _Setting("capture_exclude_tasks", _is_patterns, _PATTERNS, _parse_list),
    _Setting(
        "redact_keys",
        _is_patterns,
        "a list of key names, comma-separated in the environment",
        _parse_list,
    ),
    _Setting(
        "mask",
        lambda v: v is None or callable(v),
        "a callable taking the captured value and returning what to send",
    ),
    _Setting(
        "max_payload_chars",
        lambda v: _is_int(v) and 64 <= v <= 10_000_000,
        "a whole number from 64 to 10000000",
        _parse_int,
    ),
    _Setting(
        "flush_at",
        lambda v: v is None or (_is_int(v) and 1 <= v <= 100_000),
        "a whole number of spans from 1 to 100000",
        _parse_int,
        sdk_env="LANGFUSE_FLUSH_AT",
    ),
    _Setting(
        "flush_interval",
        lambda v: v is None or (_is_number(v) and 0 < v <= 300),
        "a number of seconds above 0 and at most 300",
        _parse_float,
        sdk_env="LANGFUSE_FLUSH_INTERVAL",
    ),
    _Setting(
        "flush_timeout",
        lambda v: _is_number(v) and 0 < v <= 300,
        "a number of seconds above 0 and at most 300",
        _parse_float,
    ),
    _Setting(
        "max_open_runs",
        lambda v: _is_int(v) and v >= 1,
        "a whole number of at least 1",
        _parse_int,
    ),
    _Setting(
        "export",
        lambda v: v in ("direct", "durable"),
        "'direct' or 'durable'",
        lambda raw: raw.strip().lower(),
    ),
    _Setting(
        "durable_url",
        lambda v: v is None or (isinstance(v, str) and v.lower().startswith(_DURABLE_SCHEMES)),
        "a redis://, rediss://, unix://, redis+cluster://, rediss+cluster://, amqp:// "
        "or amqps:// URL",
        str.strip,
    ),
    _Setting(
        "durable_queue",
        lambda v: isinstance(v, str) and _QUEUE_NAME.fullmatch(v) is not None,
        "1 to 100 letters, digits, '.', '_', ':' or '-'",
        str.strip,
    ),
    _Setting(
        "durable_max_bytes",
        lambda v: _is_int(v) and v >= 1024 * 1024,
        "a whole number of bytes, at least 1048576 (1 MiB)",
        _parse_int,
    ),
    _Setting(
        "producer_secret",
        lambda v: v is None or is_secret(v),
        SECRET_ALLOWED,
        str.strip,
        secret=True,
    ),
    _Setting(
        "durable_buffer_bytes",
        lambda v: _is_int(v) and v >= 64 * 1024,
        "a whole number of bytes, at least 65536 (64 KiB)",
        _parse_int,
    ),
    _Setting(
        "durable_spill_dir",
        lambda v: v is None or (isinstance(v, str) and v != ""),
        "a directory path, or None",
        str.strip,
    ),
    _Setting(
        "durable_spill_max_bytes",
        lambda v: _is_int(v) and v >= 1024 * 1024,
        "a whole number of bytes, at least 1048576 (1 MiB)",
        _parse_int,
    ),
    _Setting("log_trace_ids", lambda v: isinstance(v, bool), _BOOL, _parse_bool),
    _Setting(
        "project_id",
        lambda v: v is None or (isinstance(v, str) and _PROJECT_ID.fullmatch(v) is not None),
        "a Langfuse project id: 1 to 100 letters, digits, '_' or '-'",
        str.strip,
    ),
    _Setting("linked_trace_tasks", _is_patterns, _PATTERNS, _parse_list),
    _Setting(
        "max_trace_observations",
        lambda v: v is None or (_is_int(v) and v >= 10),
        "a whole number of at least 10, or None for no limit ('none' in the environment)",
        lambda raw: None if raw.strip().lower() in ("none", "off") else _parse_int(raw),
    ),
)

#: Every setting name, in the order they are documented.
SETTING_NAMES: tuple[str, ...] = tuple(setting.name for setting in _SETTINGS)
#: The environment variable of each setting that can be set from the environment.
ENV_VARIABLES: Mapping[str, str] = {s.name: s.env for s in _SETTINGS if s.parse is not None}

#: Prefix of this library's keys in a Celery app's configuration.
APP_CONFIG_PREFIX = "langfuse_"
#: ``langfuse_<name>`` keys of an app's configuration read by another layer, not by
#: ``install``: the Django middleware's settings (``CELERY_LANGFUSE_DJANGO``).
OTHER_LAYER_KEYS: frozenset[str] = frozenset({"django"})


def app_settings(app: Any) -> dict[str, tuple[Any, str]]:
    """``{setting: (value, key as written)}`` for each ``langfuse_<setting>`` key of
    ``app.conf``, the app's configuration.

    Under a namespace the key is spelled as the user wrote it: with
    ``config_from_object("django.conf:settings", namespace="CELERY")`` that is
    ``CELERY_LANGFUSE_SAMPLE_RATE`` in settings.py (Celery also answers
    ``app.conf.langfuse_sample_rate`` for it). Reading ``app.conf`` loads a lazy
    configuration, so ``install(app)`` belongs after ``config_from_object``. An unknown
    ``langfuse_*`` key raises :class:`ConfigurationError`: a misspelt setting would
    otherwise be ignored without a word.
    """
    try:
        conf = app.conf
        keys = list(conf.keys())
    except Exception:  # say, Django settings that cannot be loaded yet
        log.warning(
            "celery-langfuse: could not read the configuration of app %r, so none of its "
            "langfuse_* settings apply; call install(app) after app.config_from_object(...) "
            "where that configuration can be loaded",
            getattr(app, "main", app),
            exc_info=True,
        )
        return {}
    namespace = getattr(app, "namespace", None)
    namespaced = f"{namespace}_{APP_CONFIG_PREFIX}".upper() if namespace else None
    found: dict[str, tuple[Any, str]] = {}
    for key in keys:
        if not isinstance(key, str):
            continue
        # Ours: Celery-style lower-case keys, and under a namespace its upper-case
        # spelling. Not ours: LANGFUSE_PUBLIC_KEY and the like, which a Django
        # settings.py may hold for the SDK and Celery lists with the rest.
        if key.startswith(APP_CONFIG_PREFIX):
            name = key[len(APP_CONFIG_PREFIX) :]
        elif namespaced and key.upper().startswith(namespaced):
            name = key[len(namespaced) :].lower()
        else:
            continue
        if name in OTHER_LAYER_KEYS:
            continue
        if name not in SETTING_NAMES:
            raise ConfigurationError(
                f"celery-langfuse setting {key} in the app's configuration is unknown; "
                f"allowed: {', '.join(_app_key(n, namespace) for n in SETTING_NAMES)}"
            )
        found[name] = (conf[key], key)
    return found


def _app_key(name: str, namespace: Optional[str]) -> str:
    """How a user writes setting ``name`` in the app's configuration."""
    key = APP_CONFIG_PREFIX + name
    return f"{namespace}_{key}".upper() if namespace else key


def _require(label: str, value: Any, setting: _Setting) -> None:
    ok = value is not _INVALID
    if ok:
        try:
            ok = bool(setting.check(value))
        except Exception:  # a hostile value (say, a mapping that raises) is just wrong
            ok = False
    if not ok:
        raise ConfigurationError(f"celery-langfuse setting {label}: must be {setting.allowed}")


def _default_of(f: Any) -> Any:
    return f.default_factory() if callable(f.default_factory) else f.default
