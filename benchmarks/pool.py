"""Pool the repetitions of several runs of ``benchmarks/run.py`` into one report.

    python benchmarks/pool.py OUT_DIR RESULTS_JSON [RESULTS_JSON ...]

On a noisy machine a few repetitions are not enough; runs of the same code with the
same settings (contenders, workloads, N) can be pooled: every sample is kept, the
medians and ratios are taken over all repetitions, and the report says which runs
went in. Refuses runs of different code or settings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_SAME = ("n_publish", "n_worker", "n_latency", "per_parent", "contenders", "workloads")


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        raise SystemExit(__doc__)
    from benchmarks import report

    out, paths = Path(argv[1]), [Path(p) for p in argv[2:]]
    docs = [json.loads(p.read_text()) for p in paths]
    first = docs[0]
    for path, doc in zip(paths, docs):
        for key in _SAME:
            if doc["settings"][key] != first["settings"][key]:
                raise SystemExit(f"{path}: {key} differs from {paths[0]}; not pooled")
    pooled = dict(first)
    pooled["settings"] = {**first["settings"], "reps": sum(d["settings"]["reps"] for d in docs)}
    pooled["samples"] = {
        workload: {
            contender: [s for d in docs for s in d["samples"][workload][contender]]
            for contender in first["samples"][workload]
        }
        for workload in first["samples"]
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


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv)
