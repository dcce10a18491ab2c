"""The tests' Django app: orders, views that publish tasks, the tasks."""
