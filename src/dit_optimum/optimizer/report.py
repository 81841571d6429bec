"""The search's report: what was chosen and why, every candidate tried with its measured cost and quality verdict,
and the Pareto front of the fully measured ones (target score against quality)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..benchmark.report import _save, pareto_front
from ..evaluation.declarations import Metric, all_metrics
from ..files import write_text
from ..schemas import markdown_text
from .costs import TARGETS
from .search import SearchResult

REPORT_FILE = "report.md"
PLOT_FILE = "pareto.png"


def _metrics(records: Sequence[Mapping[str, Any]]) -> list[Metric]:
    present = {key for record in records for key in (record.get("quality") or {})}
    return [metric for metric in all_metrics("quality") if metric.key in present]


def _value(metric: Metric, numbers: Mapping[str, Any]) -> str:
    value = numbers.get(metric.key)
    if value is None:
        return ""
    interval = numbers.get(f"{metric.key}_interval")
    shown = metric.shown(value)
    return f"{shown} [{metric.shown(interval[0])}, {metric.shown(interval[1])}]" if interval else shown


def _change(metric: Metric, numbers: Mapping[str, Any]) -> str:
    comparison = (numbers.get("vs_baseline") or {}).get(metric.key)
    if not comparison:
        return ""
    low, high = (value * metric.scale for value in comparison["interval"])
    return f"{comparison['difference'] * metric.scale:+.3g} [{low:+.3g}, {high:+.3g}]"


def _score(record: Mapping[str, Any], target: str) -> str:
    score = record.get("score")
    if score is None:
        return ""
    span = TARGETS[target].span(record.get("cost") or {})
    return f"{score:.2f}x [{span[0]:.2f}, {span[1]:.2f}]" if span else f"{score:.2f}x"


def candidates_table(result: SearchResult) -> str:
    """Every candidate tried, in order: predicted and measured score, size against the baseline, quality with its
    paired change, how far it got and why it was kept or dropped."""
    metrics = _metrics([*result.records, {"quality": result.baseline}])
    base_size = result.baseline.get("size_bytes")
    header = ["#", "candidate", "predicted", f"measured {result.target}", "size"]
    header += [f"{metric.header} (change)" for metric in metrics] + ["stage", "status", "why"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, record in enumerate(result.records, 1):
        cost = record.get("cost") or {}
        quality = record.get("quality") or {}
        size = cost.get("size_bytes")
        cells = [
            str(index),
            f"`{record['name']}`" + (" **(chosen)**" if record["name"] == result.candidate.name else ""),
            f"{record['predicted']:.2f}x" if record.get("predicted") is not None else "",
            _score(record, result.target),
            f"{100 * size / base_size:.0f}%" if size and base_size else "",
        ]
        cells += [f"{_value(metric, quality)} ({_change(metric, quality)})" if quality else "" for metric in metrics]
        cells += [record["stage"], record["status"], markdown_text(record["reason"], 400)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_pareto_plot(result: SearchResult, path: Path) -> Path | None:
    """The fully measured candidates: score on the target against the first quality metric, the front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = _metrics(result.records)
    measured = [r for r in result.records if r.get("score") is not None and r.get("quality")]
    if not metrics or not measured:
        return None
    metric = metrics[0]
    points = [(record["score"], record["quality"][metric.key] * metric.scale) for record in measured]
    figure, axis = plt.subplots(figsize=(8, 5.5))
    kept = [i for i, record in enumerate(measured) if record["status"] == "kept"]
    dropped = [i for i in range(len(measured)) if i not in kept]
    for indices, style in ((kept, {"color": "tab:blue", "label": "within the budget"}),
                           (dropped, {"color": "tab:gray", "marker": "x", "label": "over the budget"})):  # fmt: skip
        if indices:
            axis.scatter([points[i][0] for i in indices], [points[i][1] for i in indices], zorder=3, **style)
    baseline = result.baseline.get(metric.key)
    if baseline is not None:
        axis.axhline(baseline * metric.scale, color="tab:green", linestyle="--", label="baseline")
    front = pareto_front(points, higher_is_better=metric.better == "higher")
    axis.plot([points[i][0] for i in front], [points[i][1] for i in front], color="tab:red", label="Pareto front")
    for record, (x, y) in zip(measured, points):
        if record["name"] == result.candidate.name:
            axis.annotate(f"chosen: {record['name']}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.set_xscale("log")
    axis.set(
        xlabel=f"{result.target}: times better than the baseline (measured in the same rounds)",
        ylabel=f"{metric.header} ({metric.better} is better)",
        title=f"Candidates measured on the full N: {metric.header} vs {result.target}",
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    path = _save(figure, path)
    plt.close("all")
    return path


def write_search_report(
    result: SearchResult, folder: str | Path, chosen_row: Mapping[str, Any] | None = None, notes: Sequence[str] = ()
) -> Path:
    """``report.md`` (and ``pareto.png``) in ``folder``: the choice, the candidates table and the plot.
    ``chosen_row``: the chosen pipeline's final measurement (a benchmark row), when one was made."""
    folder = Path(folder)
    plot = write_pareto_plot(result, folder / PLOT_FILE)
    metrics = _metrics([result.record, {"quality": result.baseline}])
    final = chosen_row or {}
    quality = {**(result.record.get("quality") or {}), **{k: v for k, v in final.items() if k in result.baseline}}
    if final.get("vs_baseline"):
        quality["vs_baseline"] = final["vs_baseline"]
    lines = [
        f"# dit-optimum optimize: `{result.candidate.name}`",
        "",
        f"- Target: **{result.target}** ({_target_text(result.target)}).",
        f"- Quality budget: {result.budget.describe()}.",
        f"- Search: {result.space.get('legal', '?')} legal stacks"
        + (
            f", {result.space['over_size_limit']} of them over the size limit even at their least (not tried)"
            if result.space.get("over_size_limit")
            else ""
        )
        + f"; {len(result.records)} candidates tried, "
        f"{sum(r['status'] == 'kept' for r in result.records)} within the budget, in {result.elapsed_s:.0f} s; "
        f"stopped: {result.stopped}.",
    ]
    if result.baseline.get("baseline_weak"):
        lines.append(f"- **Weak baseline**: {markdown_text(result.baseline['baseline_weak'], 400)}.")
    lines += ["", "## The chosen pipeline", ""]
    source = final if final else result.record.get("cost") or {}
    if final and result.target == "sampling":
        span = final["sampling_speedup_range"]
        shown = f"{final['sampling_speedup']:.2f}x [{span[0]:.2f}, {span[1]:.2f}] over the timed rounds"
    else:
        shown = _score(result.record, result.target) + " over the timed rounds"
    lines.append(f"- {result.target}: {shown} against the baseline, timed round-robin in the same run.")
    if source.get("size_bytes") and result.baseline.get("size_bytes"):
        share = 100 * source["size_bytes"] / result.baseline["size_bytes"]
        lines.append(f"- Size: {source['size_bytes'] / 1e6:.2f} MB, {share:.0f}% of the baseline's.")
    lines.append(f"- Forward path: {source.get('runtime', 'torch')} ({source.get('dtype', 'float32')}).")
    for metric in metrics:
        base = _value(metric, result.baseline)
        lines.append(
            f"- {metric.header}: {_value(metric, quality)} (baseline {base}; change {_change(metric, quality)}, "
            f"N={quality.get('num_samples') or result.baseline.get('num_samples')}, 95% paired bootstrap)."
        )
    verdict = final.get("quality_verdict") or (result.record.get("quality") or {}).get("verdict")
    if verdict:
        lines.append(f"- Verdict (the benchmark's paired test): **{verdict}**.")
    lines += ["", "## Candidates tried", "", candidates_table(result), ""]
    if plot is not None:
        lines += ["## Pareto front", "", f"![Pareto front]({PLOT_FILE})", ""]
    lines += [f"- {note}" for note in notes]
    return write_text(folder, REPORT_FILE, "\n".join(lines) + "\n")


def _target_text(target: str) -> str:
    return TARGETS[target].description
