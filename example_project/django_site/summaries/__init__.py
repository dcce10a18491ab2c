"""The summaries app: a model, the views that enqueue work, the tasks."""
