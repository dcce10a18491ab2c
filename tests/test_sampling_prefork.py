"""Sampling measured on a real `celery worker -P prefork`: at rate 0.1 every failed task
is visible and about one successful task in ten."""

from __future__ import annotations

from math import comb
from pathlib import Path
from typing import Any

import pytest

from celery_langfuse._policy import trace_id_sampled
from celery_langfuse.testing import CaptureServer
from tests.conftest import worker_process

pytestmark = pytest.mark.timeout(180)

RATE = 0.1
SUCCEEDING, FAILING = 160, 40
# Kept successes are Binomial(160, 0.1): mean 16. Outside 4..31 with probability 0.00016.
KEPT_BOUNDS = (4, 31)


def test_at_rate_0_1_all_failures_and_about_a_tenth_of_successes_are_visible(
    tasks_app: Any, capture: CaptureServer, tmp_path: Path
) -> None:
    env = {"CELERY_LANGFUSE_SAMPLE_RATE": str(RATE)}
    with worker_process(capture.env, "-P", "prefork", "-c", "2", env=env, tmp_path=tmp_path) as w:
        succeeding, failing = [], []
        for i in range(SUCCEEDING + FAILING):
            if i % 5 == 4:
                failing.append(tasks_app.fail.apply_async((f"failure {i}",), queue=w.queue))
            else:
                succeeding.append(tasks_app.add.apply_async((i, i), queue=w.queue))
        assert [r.get(timeout=60) for r in succeeding] == [i + i for i in range(200) if i % 5 != 4]
        for result in failing:
            with pytest.raises(ValueError):
                result.get(timeout=60)
    # The worker has shut down warm: its children flushed everything before exiting.

    runs = {o.metadata.get("task_id"): o for o in capture.observations}
    kept_failures = [runs[r.id] for r in failing if r.id in runs]
    kept_successes = [runs[r.id] for r in succeeding if r.id in runs]

    assert len(kept_failures) == FAILING
    for run in kept_failures:
        assert run.level == "ERROR"
        assert run.status_message == f"ValueError: {run.input['args'][0]}"
        assert run.parent_id is None
        assert "Traceback" in run.metadata["traceback"]
        # Sampled-out traces keep the failure and say so; sampled ones need not.
        assert run.metadata.get("trace_sampled", True) is trace_id_sampled(run.trace_id, RATE)

    assert KEPT_BOUNDS[0] <= len(kept_successes) <= KEPT_BOUNDS[1], len(kept_successes)
    for run in kept_successes:
        assert trace_id_sampled(run.trace_id, RATE)
        assert run.output == run.input["args"][0] * 2

    for trace in capture.traces():
        assert trace.orphans() == []
    print(
        f"\nsample rate {RATE}: failures visible {len(kept_failures)}/{FAILING}, "
        f"successes visible {len(kept_successes)}/{SUCCEEDING} "
        f"({len(kept_successes) / SUCCEEDING:.1%}; binomial 95% range "
        f"{_binomial_range(SUCCEEDING, RATE)})"
    )


def _binomial_range(n: int, p: float) -> str:
    pmf = [comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    total, low = 0.0, 0
    while total + pmf[low] < 0.025:
        total += pmf[low]
        low += 1
    total, high = 0.0, n
    while total + pmf[high] < 0.025:
        total += pmf[high]
        high -= 1
    return f"{low}..{high}"
