"""An example app traced end to end: a FastAPI API, a Celery worker and beat, a fake LLM.

Run everything at once, with no Docker and no Langfuse account, from the repository
root: ``python -m example_project.demo``. See README.md in this folder.
"""
