"""Copied by pytest-celery into its worker container and imported by the worker's app
module: trace that app with celery-langfuse once the worker starts."""

from celery import signals


@signals.worker_init.connect
def trace_with_langfuse(sender, **kwargs):
    from celery_langfuse import install

    install(sender.app)
