from pytest_celery.vendors.worker.tasks import ping


def test_a_task_in_the_worker_container_is_traced(celery_setup, langfuse_capture_clean):
    queue = celery_setup.worker.worker_queue
    assert ping.s().apply_async(queue=queue).get(timeout=60) == "pong"

    langfuse_capture_clean.wait_for_observations(
        1, name="pytest_celery.vendors.worker.tasks.ping", timeout=30
    )
