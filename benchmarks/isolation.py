"""Contender processes see only the packages that the contenders depend on.

Whatever else the virtual environment holds must not change the figures. The case that
made this necessary: the Langfuse SDK imports numpy when it is importable, which adds
about 17 MB to every Langfuse-based worker, and numpy is in the environment only
because the benchmark's own plotting library (matplotlib) needs it. So the producer and
worker processes run with ``benchmarks/_site`` first on ``PYTHONPATH``; its
``sitecustomize`` hides every installed top-level module that does not belong to the
dependency closure of :data:`ROOTS`. Results record what was hidden.
"""

from __future__ import annotations

import re
from importlib import metadata

#: The distributions the contenders need; their dependencies are followed.
ROOTS = (
    "celery-langfuse",
    "celery",
    "redis",
    "langfuse",
    "opentelemetry-sdk",
    "opentelemetry-exporter-otlp-proto-http",
    "opentelemetry-instrumentation-celery",
    "sentry-sdk",
)

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(roots: tuple[str, ...] = ROOTS) -> set[str]:
    """Normalised names of ``roots`` and everything they require (extras excluded)."""
    seen: set[str] = set()
    todo = [_normal(root) for root in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for requirement in requires:
            marker = requirement.partition(";")[2]
            if "extra" in marker:  # an optional extra, not a dependency
                continue
            match = _NAME.match(requirement)
            if match:
                todo.append(_normal(match.group(1)))
    return seen


def hidden_modules(roots: tuple[str, ...] = ROOTS) -> list[str]:
    """Installed top-level modules that no distribution in the closure provides."""
    allowed = dependency_closure(roots)
    hidden = []
    for module, distributions in metadata.packages_distributions().items():
        if not any(_normal(d) in allowed for d in distributions):
            hidden.append(module)
    return sorted(hidden)
