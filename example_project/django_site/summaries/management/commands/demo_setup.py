"""``django-admin demo_setup``: the database and the beat schedule of the demo.

The schedule lives in the database (django-celery-beat), as in most Django projects:
two entries, every ``BEAT_INTERVAL_SECONDS`` and twice that.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from example_project import settings


class Command(BaseCommand):
    help = "Migrate the database and write the beat schedule."

    def handle(self, *args: Any, **options: Any) -> None:
        call_command("migrate", run_syncdb=True, verbosity=0, interactive=False)
        every = max(int(settings.BEAT_INTERVAL), 1)
        for name, task, seconds, task_args in (
            (
                "purge-stale-summaries",
                "maintenance.purge_stale_summaries",
                every,
                [settings.RETENTION_SECONDS],
            ),
            ("summary-stats", "maintenance.summary_stats", every * 2, []),
        ):
            interval, _ = IntervalSchedule.objects.get_or_create(
                every=seconds, period=IntervalSchedule.SECONDS
            )
            PeriodicTask.objects.update_or_create(
                name=name,
                defaults={"task": task, "interval": interval, "args": json.dumps(task_args)},
            )
