"""The Django example (example_project/django_site) on one machine, traced, with one
command:

    python -m example_project.django_demo

Prepares a SQLite database (migrations and the beat schedule, ``demo_setup``), starts
the Django site under uvicorn (ASGI), a prefork Celery worker and Celery beat with
django-celery-beat's ``DatabaseScheduler`` as subprocesses, sends the FastAPI demo's
burst of requests from three users, waits for the work, and prints the traces
Langfuse receives. Needs ``pip install -e '.[demo,django]'``.

Everything but how the site starts is ``python -m example_project.demo``'s (the burst,
the checks, the report, the broker and Langfuse choices): the local Redis when it
answers, else kombu's ``filesystem://`` transport; a local capture server, unless
LANGFUSE_PUBLIC_KEY, LANGFUSE_SECRET_KEY and LANGFUSE_BASE_URL are set.

This module sits beside the site, not in it: importing the site's package loads its
Celery app and so its Django settings, which only the subprocesses should do.

Exits 0 when every request trace is complete (request -> delay_on_commit -> tasks ->
nested runs in one trace, user and session on every observation, no orphans, beat
runs traced), 1 otherwise.
"""

from __future__ import annotations

import sys
from typing import TextIO

from example_project.demo import (
    WORKER_ARGS,
    DemoResult,
    Site,
    celery_command,
    uvicorn_command,
)
from example_project.demo import main as _main
from example_project.demo import run as _run

APP = "example_project.django_site"

DJANGO = Site(
    prog="python -m example_project.django_demo",
    commands=lambda port, workdir: {
        "api": uvicorn_command(f"{APP}.asgi:application", port),
        "worker": celery_command(APP, *WORKER_ARGS),
        "beat": celery_command(
            APP, "beat", "-l", "INFO", "-S", "django_celery_beat.schedulers:DatabaseScheduler"
        ),
    },
    env={"DJANGO_SETTINGS_MODULE": f"{APP}.settings"},
    setup=("-m", "django", "demo_setup"),
    # Django's migrations and three interpreters on a loaded machine.
    deadline_seconds=90.0,
)


def run(
    *,
    redis_url: str | None = "redis://127.0.0.1:6379/0",
    real_langfuse: bool | None = None,
    out: TextIO = sys.stdout,
) -> DemoResult:
    """Run the Django demo once (see :func:`example_project.demo.run`)."""
    return _run(redis_url=redis_url, real_langfuse=real_langfuse, out=out, site=DJANGO)


def main(argv: list[str] | None = None) -> int:
    return _main(argv, site=DJANGO, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
