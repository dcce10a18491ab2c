import pytest


@pytest.fixture
def langfuse_celery_app():
    from myapp.celery import app

    return app
