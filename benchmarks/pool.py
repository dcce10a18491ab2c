"""Pool the repetitions of several runs of ``benchmarks/run.py`` into one report.

    python benchmarks/pool.py OUT_DIR RESULTS_JSON [RESULTS_JSON ...]

On a noisy machine a few repetitions are not enough; runs with the same N can be
pooled: every sample is kept, the medians and ratios are taken over all repetitions,
and the report says which runs went in. Runs may measure different contenders or
workloads (a default run and a longer ``--workloads solo,prefork,sink-down`` one):
each repetition is still compared with plain Celery's figure from the same
repetition, and a contender or workload a run did not measure counts as missing
there. Refuses runs of different N.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_SAME = ("n_publish", "n_worker", "n_latency", "n_large", "per_parent")


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        raise SystemExit(__doc__)
    from benchmarks import report
    from benchmarks.contenders import CONTENDERS
    from benchmarks.run import WORKLOADS

    out, paths = Path(argv[1]), [Path(p) for p in argv[2:]]
    docs = [json.loads(p.read_text()) for p in paths]
    first = docs[0]
    for path, doc in zip(paths, docs):
        for key in _SAME:
            # .get: results written before a setting existed (n_large) lack it
            if doc["settings"].get(key) != first["settings"].get(key):
                raise SystemExit(f"{path}: {key} differs from {paths[0]}; not pooled")
    contenders = [c for c in CONTENDERS if any(c in d["settings"]["contenders"] for d in docs)]
    workloads = [w for w in WORKLOADS if any(w in d["samples"] for d in docs)]
    pooled = dict(first)
    pooled["settings"] = {
        **first["settings"],
        "reps": sum(d["settings"]["reps"] for d in docs),
        "contenders": contenders,
        "workloads": workloads,
    }
    pooled["samples"] = {
        workload: {
            contender: [s for d in docs for s in _samples(d, workload, contender)]
            for contender in contenders
        }
        for workload in workloads
    }
    pooled["seconds"] = sum(d["seconds"] for d in docs)
    pooled["command"] = " + ".join(d["command"] for d in docs) + " (pooled)"
    pooled["pooled_from"] = [
        {
            "command": d["command"],
            "commit": d["machine"].get("commit"),
            "reps": d["settings"]["reps"],
        }
        for d in docs
    ]
    pooled["summary"] = report.summarise(pooled["samples"], first["settings"]["contenders"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(pooled, indent=1))
    (out / "results.md").write_text(report.markdown(pooled))
    report.plot(pooled, out / "results.png")
    print(report.markdown(pooled))


def _samples(doc: dict[str, Any], workload: str, contender: str) -> list[dict[str, Any]]:
    """A run's samples of one workload and contender, one per repetition: an empty one
    where the run did not measure it, so the repetitions of all runs stay aligned."""
    samples = list(doc["samples"].get(workload, {}).get(contender, []))
    return samples + [{} for _ in range(doc["settings"]["reps"] - len(samples))]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv)
