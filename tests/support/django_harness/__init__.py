"""Test harness for the Django tests: PostgreSQL set-up and fixtures.

Kept outside ``tests/support/django_site`` on purpose: importing that package imports
its Celery app and runs ``install(app)`` (as Celery's Django layout does), which must
happen only once the capture server's environment and ``DJANGO_SETTINGS_MODULE`` are
in place, not when pytest collects a test module.
"""
