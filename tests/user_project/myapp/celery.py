import os

from celery import Celery

from celery_langfuse import install

app = Celery(
    "myapp",
    broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"),
    backend=os.environ.get("CELERY_RESULT_BACKEND", "redis://localhost:6379/0"),
    include=["myapp.tasks"],
)
install(app)
