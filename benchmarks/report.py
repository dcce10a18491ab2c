"""Turn benchmark samples into medians, ratios to plain Celery, a Markdown table and a plot."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from benchmarks.contenders import LABELS, RECORD_GENERATIONS

OURS = "celery-langfuse"


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    workload: str
    field: str
    unit: str
    #: "ratio": contender / plain; "added": contender - plain; "value": as measured
    compare: str
    higher_is_better: bool
    #: the target for celery-langfuse, in the units of ``compare`` (issue 21's: publish
    #: ≤ 1.10 times plain Celery, throughput ≥ 0.90, CPU per task ≤ 1.15, peak RSS ≤ plain + 10 MB)
    target: Optional[float]
    #: where plain's figure comes from when plain has no samples of ``workload``
    #: (results written before plain ran the sink-down block too)
    baseline_workload: Optional[str] = None
    #: The tracers that do the same work on this row, when not all do (a task's LLM
    #: call is recorded only by some): the others are shown in parentheses and are
    #: neither the best nor beaten.
    same_work: Optional[tuple[str, ...]] = None

    def does_same_work(self, contender: str) -> bool:
        return self.same_work is None or contender in self.same_work

    def target_text(self) -> str:
        if self.target is None:
            return "-"
        if self.compare == "ratio":
            return f"{'≥' if self.higher_is_better else '≤'} {self.target:.2f}×"
        if self.compare == "added":
            return f"≤ +{self.target:g} {self.unit}"
        return f"< {self.target:g} {self.unit}"


def _solo_rows(
    key: str, workload: str, what: str, same_work: Optional[tuple[str, ...]] = None
) -> tuple[Metric, ...]:
    """Throughput, CPU per task and peak RSS of a solo worker on ``workload``."""
    return (
        Metric(
            f"{key}_throughput",
            f"{what}: solo tasks/s",
            workload,
            "tasks_per_s",
            "tasks/s",
            "ratio",
            True,
            0.90,
            same_work=same_work,
        ),
        Metric(
            f"{key}_cpu",
            f"{what}: CPU per task",
            workload,
            "cpu_us_per_task",
            "µs",
            "ratio",
            False,
            1.15,
            same_work=same_work,
        ),
        Metric(
            f"{key}_peak_rss",
            f"{what}: peak RSS",
            workload,
            "peak_rss_mb",
            "MB",
            "added",
            False,
            10,
            same_work=same_work,
        ),
    )


METRICS = (
    Metric(
        "publish",
        "publish, in an active trace",
        "publish",
        "publish_us",
        "µs",
        "ratio",
        False,
        1.10,
    ),
    Metric(
        "publish_bare",
        "publish, no active trace",
        "publish-bare",
        "publish_us",
        "µs",
        "ratio",
        False,
        1.10,
    ),
    Metric(
        "publish_one_root",
        "publish, one long-lived root span",
        "publish-one-root",
        "publish_us",
        "µs",
        "ratio",
        False,
        1.10,
    ),
    Metric(
        "publish_sampled_out",
        "publish, sampled-out trace",
        "publish-sampled-out",
        "publish_us",
        "µs",
        "ratio",
        False,
        1.10,
    ),
    Metric(
        "publish_excluded",
        "publish, excluded task",
        "publish-excluded",
        "publish_us",
        "µs",
        "ratio",
        False,
        1.10,
    ),
    Metric(
        "solo_throughput",
        "solo worker, tasks/s",
        "solo",
        "tasks_per_s",
        "tasks/s",
        "ratio",
        True,
        0.90,
    ),
    Metric(
        "solo_cpu", "worker CPU per task", "solo", "cpu_us_per_task", "µs", "ratio", False, 1.15
    ),
    Metric(
        "prefork_throughput",
        "prefork -c 2, tasks/s",
        "prefork",
        "tasks_per_s",
        "tasks/s",
        "ratio",
        True,
        0.90,
    ),
    Metric(
        "latency",
        "publish → task start latency",
        "latency",
        "latency_ms",
        "ms",
        "added",
        False,
        0.3,
    ),
    Metric(
        "prefork_main_cpu",
        "prefork: main process CPU per task",
        "prefork",
        "main_cpu_us_per_task",
        "µs",
        "ratio",
        False,
        None,
    ),
    Metric(
        "prefork_pool_cpu",
        "prefork: pool processes' CPU per task",
        "prefork",
        "pool_cpu_us_per_task",
        "µs",
        "ratio",
        False,
        None,
    ),
    Metric("peak_rss", "worker peak RSS (solo)", "solo", "peak_rss_mb", "MB", "added", False, 10),
    Metric(
        "rss_growth",
        "RSS growth, 2nd half (solo)",
        "solo",
        "rss_growth_mb",
        "MB",
        "value",
        False,
        2,
    ),
    Metric(
        "sink_down_throughput",
        "sink down: solo tasks/s",
        "sink-down",
        "tasks_per_s",
        "tasks/s",
        "ratio",
        True,
        0.90,
        baseline_workload="solo",
    ),
    Metric(
        "sink_down_peak_rss",
        "sink down: peak RSS (solo)",
        "sink-down",
        "peak_rss_mb",
        "MB",
        "added",
        False,
        10,
        baseline_workload="solo",
    ),
    Metric(
        "sink_down_rss_growth",
        "sink down: RSS growth, 2nd half",
        "sink-down",
        "rss_growth_mb",
        "MB",
        "value",
        False,
        2,
    ),
    *_solo_rows("new_trace", "new-trace", "no trace published (run starts it)"),
    *_solo_rows("new_trace_sampled", "new-trace-0.1", "no trace published, sampling 0.1"),
    *_solo_rows("one_root", "one-root", "one long-lived root span"),
    Metric(
        "prefork_one_root_throughput",
        "one long-lived root span: prefork -c 2, tasks/s",
        "prefork-one-root",
        "tasks_per_s",
        "tasks/s",
        "ratio",
        True,
        0.90,
    ),
    Metric(
        "prefork_one_root_pool_cpu",
        "one long-lived root span: prefork pool processes' CPU per task",
        "prefork-one-root",
        "pool_cpu_us_per_task",
        "µs",
        "ratio",
        False,
        None,
    ),
    *_solo_rows("sampled_out", "sampled-out", "sampled-out traces"),
    *_solo_rows("excluded", "excluded", "an excluded task"),
    *_solo_rows(
        "generation", "generation", "one SDK generation per task", same_work=RECORD_GENERATIONS
    ),
    *_solo_rows("large_arg", "large-arg", "a 100 kB JSON argument"),
)


def summarise(
    samples: dict[str, dict[str, list[dict[str, Any]]]], contenders: list[str]
) -> dict[str, Any]:
    """Median of each metric per contender, and its comparison with plain Celery.

    A comparison is paired: each repetition's figure is compared with plain Celery's
    from the same repetition (measured minutes apart), and the median of those ratios
    or differences is reported. On a machine whose speed drifts, that cancels the drift
    that comparing two medians of different moments would keep.
    """
    summary: dict[str, Any] = {}
    for metric in METRICS:
        if metric.workload not in samples:
            continue
        series: dict[str, list[Optional[float]]] = {}
        for contender in contenders:
            workload = metric.workload
            if (
                contender == "plain"
                and metric.baseline_workload
                and not samples.get(workload, {}).get("plain")
            ):
                workload = metric.baseline_workload
            series[contender] = [
                s.get(metric.field) for s in samples.get(workload, {}).get(contender, [])
            ]
        medians = {
            contender: statistics.median(present)
            for contender, values in series.items()
            if (present := [v for v in values if v is not None])
        }
        if not medians:
            continue  # a field that results of older runs do not have
        base = series.get("plain", [])
        compared = {}
        for contender, value in medians.items():
            if metric.compare == "value" or contender == "plain" or "plain" not in medians:
                compared[contender] = value
                continue
            pairs = [
                (mine, theirs)
                for mine, theirs in zip(series[contender], base)
                if mine is not None and theirs is not None
            ]
            if metric.compare == "ratio":
                ratios = [mine / theirs for mine, theirs in pairs if theirs]
                if ratios:
                    compared[contender] = statistics.median(ratios)
            elif pairs:
                compared[contender] = statistics.median(mine - theirs for mine, theirs in pairs)
        if "plain" in medians and metric.compare != "value":
            compared["plain"] = 1.0 if metric.compare == "ratio" else 0.0
        entry: dict[str, Any] = {
            "medians": medians,
            "compared": compared,
            "reps": sum(1 for v in base if v is not None),  # plain's samples: the pairs' bound
        }
        ours = compared.get(OURS)
        if ours is not None:
            if metric.target is not None:
                entry["target_met"] = (
                    ours >= metric.target
                    if metric.higher_is_better
                    else (
                        ours < metric.target if metric.compare == "value" else ours <= metric.target
                    )
                )
            others = [
                v
                for c, v in compared.items()
                if c not in ("plain", OURS) and metric.does_same_work(c)
            ]
            if others:
                entry["beats_others"] = all(
                    ours > v if metric.higher_is_better else ours < v for v in others
                )
        summary[metric.key] = entry
    return summary


def _fmt_value(value: float, unit: str) -> str:
    if unit == "tasks/s":
        return f"{value:,.0f} tasks/s"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "µs":
        return f"{value:.0f} µs"
    return f"{value:.1f} {unit}"


def _fmt_compared(metric: Metric, value: float) -> str:
    if metric.compare == "ratio":
        return f"{value:.2f}×"
    if metric.compare == "added":
        return (
            f"{value:+.2f} {metric.unit}" if metric.unit == "ms" else f"{value:+.1f} {metric.unit}"
        )
    return f"{value:+.1f} {metric.unit}"


def markdown(doc: dict[str, Any]) -> str:
    summary = doc["summary"]
    contenders = doc["settings"]["contenders"]
    machine = doc["machine"]
    out = []
    pooled = doc.get("pooled_from")
    runs = f", pooled from {len(pooled)} runs" if pooled else ""
    out.append(
        f"{doc['settings']['reps']} interleaved repetitions{runs}; plain Celery as the "
        "median in absolute terms, the others relative to it (× time or rate, or added "
        "ms/MB): the median of each repetition's comparison with plain Celery's figure "
        "from the same repetition. **Bold**: best of the tracers. *n*: the repetitions "
        "that measured the row.\n"
    )
    header = ["workload", "n"] + [LABELS[c] for c in contenders] + ["target (ours)"]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    for metric in METRICS:
        entry = summary.get(metric.key)
        if not entry:
            continue
        tracers = {
            c: v
            for c, v in entry["compared"].items()
            if c != "plain" and metric.does_same_work(c)
        }
        if metric.compare == "value":
            best = min(tracers.items(), key=lambda kv: abs(kv[1]), default=(None, 0))[0]
        else:
            pick = max if metric.higher_is_better else min
            best = pick(tracers.items(), key=lambda kv: kv[1], default=(None, 0))[0]
        cells = [metric.title, str(entry.get("reps", "-"))]
        for contender in contenders:
            if contender not in entry["compared"]:
                cells.append("-")
            elif contender == "plain" and metric.compare != "value":
                cells.append(_fmt_value(entry["medians"]["plain"], metric.unit))
            else:
                text = _fmt_compared(metric, entry["compared"][contender])
                if contender != "plain" and not metric.does_same_work(contender):
                    text = f"({text})"
                cells.append(f"**{text}**" if contender == best else text)
        met = entry.get("target_met")
        mark = "" if met is None else (" ✅" if met else " ❌")
        cells.append(metric.target_text() + mark)
        out.append("| " + " | ".join(cells) + " |")
    if any(m.same_work and m.key in summary for m in METRICS):
        recording = ", ".join(LABELS[c] for c in RECORD_GENERATIONS)
        out.append(
            f"\nIn parentheses: a tracer that does not record the task's LLM call (only "
            f"{recording} do); it makes the call as plain Celery does, so its figure is the "
            "cost of tracing the run alone, not compared with the others."
        )
    out.append("")
    out.append("Absolute medians:\n")
    header = ["metric"] + [LABELS[c] for c in contenders]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    for metric in METRICS:
        entry = summary.get(metric.key)
        if not entry:
            continue
        cells = [f"{metric.title} ({metric.unit})"]
        for contender in contenders:
            value = entry["medians"].get(contender)
            cells.append("-" if value is None else f"{value:,.2f}")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    load_before = ", ".join(f"{x:.2f}" for x in doc["load_average_before"])
    load_after = ", ".join(f"{x:.2f}" for x in doc["load_average_after"])
    out.append(
        f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, "
        f"{machine['platform']}. Versions: {versions}. Commit {machine['commit']}. "
        f"Load average before {load_before}, after {load_after}. "
        f"Took {doc['seconds']:.0f} s: `{doc['command']}`.\n"
    )
    return "\n".join(out)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = doc["summary"]
    contenders = [c for c in doc["settings"]["contenders"]]
    metrics = [m for m in METRICS if m.key in summary]
    columns = 3
    rows = (len(metrics) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(15, 3.1 * rows), squeeze=False)
    colours = {
        "plain": "#9e9e9e",
        "celery-langfuse": "#1565c0",
        "otel": "#f9a825",
        "otel-langfuse": "#ef6c00",
        "sentry": "#6a1b9a",
    }
    for axis, metric in zip(axes.flat, metrics):
        entry = summary[metric.key]
        shown = [c for c in contenders if c in entry["compared"]]
        values = [entry["compared"][c] for c in shown]
        if metric.compare == "ratio":
            reference, xlabel = (
                1.0,
                "× plain Celery"
                + (" (higher is better)" if metric.higher_is_better else " (lower is better)"),
            )
        elif metric.compare == "added":
            values = [0.0 if c == "plain" else v for c, v in zip(shown, values)]
            reference, xlabel = 0.0, f"{metric.unit} added to plain Celery (lower is better)"
        else:
            reference, xlabel = 0.0, f"{metric.unit} (closer to 0 is better)"
        positions = range(len(shown))[::-1]
        bars = axis.barh(list(positions), values, color=[colours[c] for c in shown])
        for bar, contender in zip(bars, shown):
            if contender != "plain" and not metric.does_same_work(contender):
                bar.set_hatch("//")  # does not do this row's work (see the report's note)
                bar.set_alpha(0.5)
        for y, value in zip(positions, values):
            text = _fmt_compared(metric, value) if metric.compare != "ratio" else f"{value:.2f}×"
            # Labels sit right of the bar's end, or of the zero line for negative bars.
            axis.annotate(
                text,
                (max(value, 0.0), y),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
        axis.axvline(reference, color="black", linewidth=0.8)
        if metric.target is not None:
            axis.axvline(metric.target, color="#c62828", linestyle="--", linewidth=1)
        axis.set_yticks(list(positions), [LABELS[c] for c in shown], fontsize=8)
        plain = entry["medians"].get("plain")
        base = (
            f" — plain: {_fmt_value(plain, metric.unit)}"
            if plain is not None and metric.compare != "value"
            else ""
        )
        axis.set_title(metric.title + base, fontsize=9)
        axis.set_xlabel(xlabel, fontsize=8)
        axis.tick_params(axis="x", labelsize=8)
        low, high = axis.get_xlim()
        axis.set_xlim(min(low, 0), high * 1.18 if high > 0 else high)
    for axis in list(axes.flat)[len(metrics) :]:
        axis.axis("off")
    fig.suptitle(
        "Cost of Celery tracers, relative to plain Celery "
        "(red dashed line: celery-langfuse's target)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (3.1 * rows)))  # room for the title
    fig.savefig(path, dpi=110)
    plt.close(fig)
