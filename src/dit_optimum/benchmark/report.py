"""The benchmark's outputs: one table (terminal and Markdown) with intervals, the real-vs-real floors, changes
against each variant's baseline marked where they lie outside the noise, a quality verdict per technique (or
"weak baseline" against a baseline far from the real-vs-real floors), plots (quality vs throughput with its Pareto
front, quality vs sampling steps, GFLOPs, peak memory) and the per-technique sample grids. Every column comes from
the metric declarations (``evaluation.declarations``)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..evaluation.declarations import Metric, all_metrics
from ..evaluation.hardware import hardware_text
from ..files import write_bytes, write_text
from .settings import REPORT_FILE
from .significance import VERDICTS, WEAK_BASELINE, WEAK_BASELINE_ADVICE, speed_change_is_significant


def _ok(row: dict[str, Any]) -> bool:
    return row.get("status") == "ok"


def shown_metrics(rows: Sequence[dict[str, Any]]) -> list[Metric]:
    """The declared metrics at least one finished row has a value for, in declaration order."""
    finished = [row for row in rows if _ok(row)]
    return [metric for metric in all_metrics() if any(row.get(metric.key) is not None for row in finished)]


def _own_sampling(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether a finished row samples with its own recorded steps / guidance (a solver, a step-distilled student)."""
    return any(_ok(row) and row.get("sampling_defaults") for row in rows)


def _steps_text(row: dict[str, Any]) -> str:
    # the steps a cell sampled with, "unguided" where it samples without classifier-free guidance
    steps = row.get("sampling_steps", row.get("quality_settings", {}).get("num_inference_steps"))
    guidance = row.get("quality_settings", {}).get("guidance_scale")
    return "n/a" if steps is None else f"{steps}" + (" unguided" if guidance is not None and guidance <= 1 else "")


def _other_runtimes(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether a finished row's transformer ran in something other than torch (an exported runtime)."""
    return any(_ok(row) and row.get("runtime", "torch") != "torch" for row in rows)


def table_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Headers of the results table: variant, technique, the runtime (when a cell runs another than torch), the
    sampling steps (when a cell samples with its own), then every shown metric."""
    runtime = ["runtime"] if _other_runtimes(rows) else []
    steps = ["steps"] if _own_sampling(rows) else []
    return ["variant", "technique", *runtime, *steps, *(metric.header for metric in shown_metrics(rows))]


def _with_interval(metric: Metric, row: dict[str, Any], key: str) -> str:
    text = metric.shown(row.get(key))
    interval = row.get(f"{key}_interval")
    if interval and text != "n/a":
        text += f" [{metric.shown(interval[0])}, {metric.shown(interval[1])}]"
    return text


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Formatted cells of the finished rows (quality values with their 95% interval), in ``table_columns`` order."""
    metrics, own, runtimes = shown_metrics(rows), _own_sampling(rows), _other_runtimes(rows)
    return [
        [
            row["variant"],
            row["technique"],
            *([str(row.get("runtime", "torch"))] if runtimes else []),
            *([_steps_text(row)] if own else []),
            *(_with_interval(metric, row, metric.key) for metric in metrics),
        ]
        for row in rows
        if _ok(row)
    ]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results table in Markdown."""
    columns = table_columns(rows)
    lines = ["| " + " | ".join(columns) + " |"]
    text_columns = 3 if _other_runtimes(rows) else 2
    lines.append("|" + "|".join("---" if i < text_columns else "---:" for i in range(len(columns))) + "|")
    lines.extend("| " + " | ".join(cells) + " |" for cells in table_rows(rows))
    return "\n".join(lines) + "\n"


def baseline_deltas(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per finished row with a baseline: for every shown metric with a direction, the percent change against the
    variant's baseline and whether it lies outside the noise (quality: the paired bootstrap interval of the
    difference excludes 0; speed: every round's paired ratio is on one side of 1; None where not measured), plus
    the row's quality verdict. Speed changes are the paired ratios timed in the cell (the baseline's own row
    shows the noise of that re-measurement)."""
    baselines = {row["variant"]: row for row in rows if _ok(row) and row["technique"] == "baseline"}
    metrics = [metric for metric in shown_metrics(rows) if metric.better is not None]
    deltas = []
    for row in rows:
        base = baselines.get(row["variant"])
        if not _ok(row) or base is None:
            continue
        entry: dict[str, Any] = {"variant": row["variant"], "technique": row["technique"]}
        if row is base:
            entry["verdict"] = "(the baseline, weak)" if base.get("baseline_weak") else "(the baseline)"
        else:
            entry["verdict"] = row.get("quality_verdict", "n/a")
        for metric in metrics:
            entry[metric.key] = _change(metric, row, base)
        deltas.append(entry)
    return deltas


def _change(metric: Metric, row: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    if metric.paired_ratio and row.get(metric.paired_ratio) is not None:
        return {
            "percent": 100 * (row[metric.paired_ratio] - 1),
            "significant": speed_change_is_significant(row, metric.paired_ratio),
        }
    value, reference = row.get(metric.key), base.get(metric.key)
    if value is None or not reference:
        return {"percent": None, "significant": None}
    comparison = row.get("vs_baseline", {}).get(metric.key)
    return {
        "percent": 100 * (value - reference) / abs(reference),
        "significant": None if comparison is None else comparison["significant"],
    }


def markdown_deltas(rows: Sequence[dict[str, Any]]) -> str:
    """The change table in Markdown: ``+12.3%``, in bold where the change lies outside the noise."""
    metrics = [metric for metric in shown_metrics(rows) if metric.better is not None]
    header = "| variant | technique | quality vs baseline | " + " | ".join(m.header for m in metrics) + " |"
    lines = [header, "|---|---|---|" + "---:|" * len(metrics)]
    for entry in baseline_deltas(rows):
        cells = []
        for metric in metrics:
            change = entry[metric.key]
            text = "n/a" if change["percent"] is None else f"{change['percent']:+.1f}%"
            cells.append(f"**{text}**" if change["significant"] else text)
        lines.append(f"| {entry['variant']} | {entry['technique']} | {entry['verdict']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def quality_metric(rows: Sequence[dict[str, Any]]) -> Metric | None:
    """The first quality metric every finished row has (the Pareto plot's axis), or None (cost-only runs)."""
    finished = [row for row in rows if _ok(row)]
    for metric in all_metrics("quality"):
        if finished and all(row.get(metric.key) is not None for row in finished):
            return metric
    return None


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = False) -> list[int]:
    """Indices of the points no other point beats in both throughput (x, higher) and quality (y, lower unless
    ``higher_is_better``)."""
    if higher_is_better:
        points = [(x, -y) for x, y in points]
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((ox >= x and oy <= y) and (ox > x or oy < y) for j, (ox, oy) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def write_plots(rows: Sequence[dict[str, Any]], folder: Path) -> list[Path]:
    """PNG plots: quality vs sampling throughput (Pareto front), quality vs sampling steps (when few-step solver
    or step-distilled rows exist), GFLOPs and peak memory per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [row for row in rows if _ok(row)]
    if not finished:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    metric = quality_metric(rows)
    labels = [
        f"{row['variant']} {row['technique']}" if len({r["variant"] for r in finished}) > 1 else row["technique"]
        for row in finished
    ]
    written = []
    if metric is not None:
        written.append(_pareto_plot(plt, finished, labels, metric, folder / "pareto.png"))
    stepped = steps_rows(finished)
    if stepped:
        written.append(_steps_plot(plt, stepped, folder / "quality_vs_steps.png"))
    for key, filename in (("gflops", "gflops.png"), ("forward_peak_memory_bytes", "memory.png")):
        declared = next(m for m in all_metrics("cost") if m.key == key)
        figure, axis = plt.subplots(figsize=(8, 0.3 * len(finished) + 1.5))
        axis.barh(labels, [(row.get(key) or 0) * declared.scale for row in finished], color="tab:green")
        axis.invert_yaxis()
        axis.set(title=f"{declared.header}: {declared.description}")
        figure.tight_layout()
        written.append(_save(figure, folder / filename))
    plt.close("all")
    return written


def _pareto_plot(plt, finished: list[dict[str, Any]], labels: list[str], metric: Metric, path: Path) -> Path:
    points = [(row["sampling_images_per_s"], row[metric.key] * metric.scale) for row in finished]
    figure, axis = plt.subplots(figsize=(8, 5.5))
    for (x, y), row in zip(points, finished):
        interval = row.get(f"{metric.key}_interval")
        if interval:  # the 95% interval as an error bar
            low, high = (value * metric.scale for value in interval)
            axis.errorbar(x, y, yerr=[[max(0.0, y - low)], [max(0.0, high - y)]], color="tab:gray", capsize=2)
    combined = [i for i, row in enumerate(finished) if "+" in str(row.get("technique"))]  # stacked techniques
    single = [i for i in range(len(points)) if i not in combined]
    for indices, style in ((single, {"color": "tab:blue", "label": "single technique"}),
                           (combined, {"color": "tab:orange", "marker": "D", "label": "combined recipe"})):  # fmt: skip
        if indices:
            axis.scatter([points[i][0] for i in indices], [points[i][1] for i in indices], zorder=3, **style)
    for label, (x, y) in zip(labels, points):
        axis.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto_front(points, higher_is_better=metric.better == "higher")
    axis.plot([points[i][0] for i in front], [points[i][1] for i in front], color="tab:red", label="Pareto front")
    axis.set(
        xlabel="sampling throughput (images/s)",
        ylabel=f"{metric.header} ({metric.better} is better)",
        title=f"{metric.header} vs throughput (95% intervals)",
    )
    axis.legend()
    figure.tight_layout()
    return _save(figure, path)


STEP_TECHNIQUE_PREFIXES = ("solver-", "distill-steps-")


def steps_rows(finished: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the quality-vs-steps plot: each baseline and every few-step sampler (``solver-*``) or
    step-distilled (``distill-steps-*``) row of the same variant; none when no such technique was measured."""
    stepped = [row for row in finished if str(row["technique"]).startswith(STEP_TECHNIQUE_PREFIXES)]
    variants = {row["variant"] for row in stepped}
    baselines = [row for row in finished if row["technique"] == "baseline" and row["variant"] in variants]
    return baselines + stepped if stepped else []


def sampling_steps(row: dict[str, Any]) -> int | None:
    """The steps a row sampled its quality images with (``sampling_steps``; rows from before that field sampled at
    the run's ``num_inference_steps``)."""
    steps = row.get("sampling_steps")
    return steps if steps is not None else row.get("quality_settings", {}).get("num_inference_steps")


def _steps_plot(plt, rows: list[dict[str, Any]], path: Path) -> Path:
    # One panel per quality metric measured (class accuracy first, with its 95% interval as error bars); one series
    # per sampler, the step-distilled students as "distilled"; each point labelled with its technique.
    metrics = [metric for metric in shown_metrics(rows) if metric.kind == "quality"]
    first = quality_metric(rows)
    if first is not None:  # the metric every row has leads
        metrics = [first] + [metric for metric in metrics if metric is not first]
    several = len({row["variant"] for row in rows}) > 1
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if sampling_steps(row) is None:
            continue
        name = "distilled" if str(row["technique"]).startswith("distill-steps-") else str(row.get("sampler") or "?")
        series.setdefault(f"{row['variant']} {name}" if several else name, []).append(row)
    figure, axes = plt.subplots(1, max(1, len(metrics)), figsize=(6.5 * max(1, len(metrics)), 5), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for name, members in series.items():
            members = sorted((row for row in members if row.get(metric.key) is not None), key=sampling_steps)
            if not members:
                continue
            xs = [sampling_steps(row) for row in members]
            ys = [row[metric.key] * metric.scale for row in members]
            errors = [[], []]
            for row, y in zip(members, ys):
                interval = row.get(f"{metric.key}_interval")
                low, high = (value * metric.scale for value in interval) if interval else (y, y)
                errors[0].append(max(0.0, y - low))
                errors[1].append(max(0.0, high - y))
            axis.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=name)
            for row, x, y in zip(members, xs, ys):
                axis.annotate(row["technique"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        floors = [row.get(f"{metric.key}_real") for row in rows if row.get(f"{metric.key}_real") is not None]
        if floors:
            axis.axhline(floors[0] * metric.scale, color="tab:gray", linestyle="--", label="real vs real (floor)")
        axis.set_xscale("log", base=2)
        steps = sorted({sampling_steps(row) for row in rows if sampling_steps(row) is not None})
        axis.minorticks_off()
        axis.set_xticks(steps, [str(step) for step in steps])
        axis.set(
            xlabel="sampling steps",
            ylabel=f"{metric.header} ({metric.better} is better)",
            title=f"{metric.header} vs sampling steps (95% intervals)",
        )
        axis.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=120, format="png")
    return write_bytes(path.parent, path.name, buffer.getvalue())


def write_report(
    rows: Sequence[dict[str, Any]],
    output_dir: str | Path,
    title: str = "dit-optimum benchmark",
    notes: Sequence[str] = (),
) -> Path:
    """``report.md`` (table, floors, changes with significance, failures, plots, sample grids) and the plots."""
    output_dir = Path(output_dir)
    plots = write_plots(rows, output_dir / "plots")
    finished = [row for row in rows if _ok(row)]
    failed = [row for row in rows if not _ok(row)]
    parts = [f"# {title}\n"]
    parts.extend(f"{note}\n" for note in notes)
    if finished:
        parts.append(measurement_line(finished[0]))
    summary = _verdict_summary(rows)
    if summary:
        parts.append(summary)
    weak = weak_baseline_lines(rows)
    if weak:
        parts.append("## Weak baseline\n\n" + "\n".join(f"- {line}" for line in weak) + "\n")
    parts.append("## Results\n\nQuality numbers carry their 95% bootstrap interval.\n\n" + markdown_table(rows))
    floors = floor_lines(finished)
    if floors:
        parts.append(floors)
    parts.append(
        "## Change against each variant's baseline\n\n**Bold**: outside the noise. Quality: the 95% paired "
        "bootstrap interval of the difference excludes 0 (the same samples, seeds and classes in both cells); "
        "speed: in every cell the baseline is timed again, round-robin with the technique, the change is the "
        "median ratio, and it is bold when every round's ratio lies on the same side of 1 (the baseline's own row "
        "measures the noise). The verdict reads every quality metric.\n\n" + markdown_deltas(rows)
    )
    choices = forward_path_lines(finished)
    if choices:
        parts.append(
            "## Forward paths measured on this machine\n\nThe `+fastest` cells run the forward path that timed "
            "fastest here (one forward of the cell's model at its sampling batch, every candidate interleaved; speed "
            "against torch fp32):\n\n" + "\n".join(f"- {line}" for line in choices) + "\n"
        )
    searches = optimize_lines(finished)
    if searches:
        parts.append(
            "## The optimizer's choice\n\nThe `optimized` cells searched the registry's stacks on this run's "
            "baseline (`dit-optimum optimize`); their rows above are measured like every other cell:\n\n"
            + "\n".join(f"- {line}" for line in searches)
            + "\n"
        )
    problems = [row for row in finished if row.get("comparison_problem")]
    if problems:
        parts.append(
            "## Cells not compared with their baseline\n\n"
            + "\n".join(f"- {row['variant']} / {row['technique']}: {row['comparison_problem']}" for row in problems)
            + "\n"
        )
    if failed:
        parts.append(
            "## Failed cells (retried on the next run)\n\n"
            + "\n".join(f"- {row['variant']} / {row['technique']}: {row.get('error')}" for row in failed)
            + "\n"
        )
    if plots:
        parts.append("## Plots\n\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in plots) + "\n")
    grids = [row for row in finished if row.get("sample_grid")]
    if grids:
        parts.append(
            "## Samples (same seeds and classes in every cell)\n\n"
            + "\n".join(
                f"**{row['variant']} / {row['technique']}**\n\n![{row['technique']}]({row['sample_grid']})\n"
                for row in grids
            )
        )
    return write_text(output_dir, REPORT_FILE, "\n".join(parts))


def optimize_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per row made by the optimizer: the stack it chose, how much it tried and where its report is."""
    lines = []
    for row in rows:
        search = row.get("optimize")
        if not isinstance(search, dict) or "chosen" not in search:
            continue
        lines.append(
            f"{row['variant']} / {row['technique']}: chose **{search['chosen']}** ({search.get('target')}; "
            f"{search.get('candidates_tried')} candidates tried, {search.get('candidates_kept')} within the budget, "
            f"in {search.get('search_s', 0):.0f} s; stopped: {search.get('stopped')})"
            + (f"; its search: [{search['report']}]({search['report']})" if search.get("report") else "")
        )
    return lines


def forward_path_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per row whose forward path was chosen by measurement: the path taken and every candidate's speed."""
    lines = []
    for row in rows:
        choice = row.get("forward_path_choice")
        if not choice:
            continue
        ratios = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in choice["speedups"].items())
        origin = " (cached measurement)" if choice.get("cached") else ""
        lines.append(
            f"{row['variant']} / {row['technique']}: **{choice['name']}** at batch {choice['batch_size']}{origin}: "
            f"{ratios}"
        )
    return lines


def weak_baseline_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per variant whose baseline is weak (``baseline_weak``): why, what it means for its verdicts, and
    what to do."""
    return [
        f"{row['variant']}: the baseline is weak ({row['baseline_weak']}), so every verdict against it reads "
        f'"{WEAK_BASELINE}" instead of a quality change: the comparisons say nothing yet. To fix: '
        f"{WEAK_BASELINE_ADVICE}."
        for row in rows
        if _ok(row) and row["technique"] == "baseline" and row.get("baseline_weak")
    ]


def _verdict_summary(rows: Sequence[dict[str, Any]]) -> str:
    # At a glance: which techniques cost quality against their baseline and which do not (paired, 95%).
    groups: dict[str, list[str]] = {}
    entries = baseline_deltas(rows)
    several = len({entry["variant"] for entry in entries}) > 1
    for entry in entries:
        if entry["verdict"] in VERDICTS:
            name = f"{entry['variant']} {entry['technique']}" if several else entry["technique"]
            groups.setdefault(entry["verdict"], []).append(name)
    if not groups:
        return ""
    lines = [f"- **{verdict}**: {', '.join(groups[verdict])}" for verdict in VERDICTS if verdict in groups]
    return "## Quality against the baseline, at a glance\n\n" + "\n".join(lines) + "\n"


def floor_lines(finished: list[dict[str, Any]]) -> str:
    """The real-vs-real values at the same N (the same for every cell): the best a generator can show."""
    if not finished:
        return ""
    row = finished[0]
    cells = [
        f"{metric.header} {_with_interval(metric, row, f'{metric.key}_real')}"
        for metric in all_metrics("quality")
        if row.get(f"{metric.key}_real") is not None
    ]
    if not cells:
        return ""
    text = (
        f"Floor (real vs real: {row.get('floor_samples')} held-out real images scored exactly like the generated "
        f"ones, against the same {row.get('reference_samples')} reference images): " + "; ".join(cells) + "."
    )
    if row.get("classifier_accuracy") is not None:
        text += (
            f" The domain classifier's accuracy on {row.get('classifier_held_out_samples')} held-out real images: "
            f"{100 * row['classifier_accuracy']:.1f}%."
        )
    return text + "\n"


def measurement_line(row: dict[str, Any]) -> str:
    """How a row was measured: hardware, N, reference, sampler, steps, guidance, batches, repeats."""
    speed = row.get("speed_settings", {})
    hardware = hardware_text(row.get("hardware"))
    line = f"Measured on {row.get('device')} ({hardware}), each cell in the dtype its technique gives. "
    if row.get("num_samples") is not None:
        quality = row.get("quality_settings", {})
        line += (
            f"Quality: N={row['num_samples']} generated (class i mod classes, seed + i) vs "
            f"N={row.get('reference_samples')} real reference images ({quality.get('reference')}), "
            f"{row.get('sampler')} {quality.get('num_inference_steps')} steps, guidance "
            f"{quality.get('guidance_scale')}; intervals from {quality.get('bootstrap')} bootstrap resamples. "
            "Cells that record their own sampler, steps and guidance (solvers, step-distilled students: the steps "
            "column) sample with those, quality and speed alike, on the same seeds and classes. "
        )
    else:
        line += "Cost only: untrained models (weights do not change these columns), no quality metrics. "
    return line + (
        f"Speed: one transformer forward at batch {speed.get('forward_batch_size')}, full sampling at batch "
        f"{speed.get('batch_size')} ({speed.get('num_inference_steps')} steps, guidance {speed.get('guidance_scale')}"
        f", decode included), latency at batch 1; medians of {speed.get('repeats')} after {speed.get('warmup')} "
        "warm-up; peak memory above the loaded model during one sampling call and one forward.\n"
    )
