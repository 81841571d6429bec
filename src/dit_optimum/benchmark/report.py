"""The benchmark's outputs: one table (terminal and Markdown), deltas against each variant's baseline, and plots
(quality vs throughput with its Pareto front, GFLOPs, peak memory) plus the per-technique sample grids."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..utils import atomic_file, write_text_atomic

# (header, row key, format); a missing or None value prints as "n/a".
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("variant", "variant", "{}"),
    ("technique", "technique", "{}"),
    ("FID", "fid", "{:.2f}"),
    ("sFID", "sfid", "{:.2f}"),
    ("KIDx1e3", "kid", "{:.2f}"),
    ("GFLOPs", "gflops", "{:.3f}"),
    ("params (M)", "params_m", "{:.2f}"),
    ("size (MB)", "size_mb", "{:.2f}"),
    ("fwd img/s", "forward_images_per_s", "{:.1f}"),
    ("sample img/s", "sampling_images_per_s", "{:.2f}"),
    ("latency (s)", "latency_s", "{:.3f}"),
    ("sampling mem (MB)", "peak_memory_mb", "{:.1f}"),
    ("fwd mem (MB)", "forward_peak_memory_mb", "{:.1f}"),
)
# Deltas against the baseline, in percent; for the quality metrics lower is better, for throughput higher.
# Speed deltas come from the paired ratios (the baseline re-timed in the same rounds as the cell) when present.
PAIRED_RATIOS = {
    "forward_images_per_s": "forward_speedup",
    "sampling_images_per_s": "sampling_speedup",
    "latency_s": "latency_ratio",
}
DELTAS: tuple[tuple[str, str], ...] = (
    ("FID", "fid"),
    ("KID", "kid"),
    ("GFLOPs", "gflops"),
    ("size", "size_bytes"),
    ("fwd img/s", "forward_images_per_s"),
    ("sample img/s", "sampling_images_per_s"),
    ("latency", "latency_s"),
    ("sampling mem", "peak_memory_bytes"),
    ("fwd mem", "forward_peak_memory_bytes"),
)


def _derived(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    if row.get("size_bytes") is not None:
        row["size_mb"] = row["size_bytes"] / 1e6
    for key in ("peak_memory_bytes", "forward_peak_memory_bytes"):
        if row.get(key) is not None:
            row[key.replace("_bytes", "_mb")] = row[key] / 1e6
    if row.get("kid") is not None:
        row["kid"] = row["kid"] * 1e3
    return row


def _cell(row: dict[str, Any], key: str, pattern: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return pattern.format(value)


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Formatted cells of the finished rows, in ``COLUMNS`` order."""
    return [[_cell(_derived(row), key, pattern) for _, key, pattern in COLUMNS] for row in rows if _ok(row)]


def _ok(row: dict[str, Any]) -> bool:
    return row.get("status") == "ok"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results table in Markdown."""
    lines = ["| " + " | ".join(header for header, _, _ in COLUMNS) + " |"]
    lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|")
    lines.extend("| " + " | ".join(cells) + " |" for cells in table_rows(rows))
    return "\n".join(lines) + "\n"


def baseline_deltas(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per finished row: percent change of each ``DELTAS`` metric against its variant's baseline row (the baseline's
    own row shows the timing noise of its paired re-measurement)."""
    baselines = {row["variant"]: row for row in rows if _ok(row) and row["technique"] == "baseline"}
    deltas = []
    for row in rows:
        base = baselines.get(row["variant"])
        if not _ok(row) or base is None:
            continue
        entry: dict[str, Any] = {"variant": row["variant"], "technique": row["technique"]}
        for label, key in DELTAS:
            value, reference = row.get(key), base.get(key)
            if row.get(PAIRED_RATIOS.get(key, "")) is not None:
                entry[label] = 100 * (row[PAIRED_RATIOS[key]] - 1)
            else:
                entry[label] = None if value is None or not reference else 100 * (value - reference) / abs(reference)
        deltas.append(entry)
    return deltas


def markdown_deltas(rows: Sequence[dict[str, Any]]) -> str:
    """The deltas table in Markdown (``+12.3%``; n/a where a metric or the baseline is missing)."""
    header = "| variant | technique | " + " | ".join(label for label, _ in DELTAS) + " |"
    lines = [header, "|---|---|" + "---:|" * len(DELTAS)]
    for entry in baseline_deltas(rows):
        cells = ["n/a" if entry[label] is None else f"{entry[label]:+.1f}%" for label, _ in DELTAS]
        lines.append(f"| {entry['variant']} | {entry['technique']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def quality_key(rows: Sequence[dict[str, Any]]) -> str | None:
    """The quality metric every finished row has: FID when all have it, else KID, else None (cost-only runs)."""
    finished = [row for row in rows if _ok(row)]
    for key in ("fid", "kid"):
        if finished and all(row.get(key) is not None for row in finished):
            return key
    return None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both throughput (x, higher) and quality (y, lower)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((ox >= x and oy <= y) and (ox > x or oy < y) for j, (ox, oy) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def write_plots(rows: Sequence[dict[str, Any]], folder: Path) -> list[Path]:
    """PNG plots: quality vs sampling throughput (Pareto front), GFLOPs and peak memory per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [_derived(row) for row in rows if _ok(row)]
    if not finished:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    metric = quality_key(rows)
    labels = [
        f"{row['variant']} {row['technique']}" if len({r["variant"] for r in finished}) > 1 else row["technique"]
        for row in finished
    ]
    written = []

    if metric is not None:
        written.append(_pareto_plot(plt, finished, labels, metric, folder / "pareto.png"))

    for key, title, filename in (
        ("gflops", "GFLOPs per image per forward", "gflops.png"),
        ("forward_peak_memory_mb", "peak memory of one transformer forward (MB)", "memory.png"),
    ):
        figure, axis = plt.subplots(figsize=(8, 0.3 * len(finished) + 1.5))
        axis.barh(labels, [row.get(key) or 0 for row in finished], color="tab:green")
        axis.invert_yaxis()
        axis.set(title=title)
        figure.tight_layout()
        written.append(_save(figure, folder / filename))
    plt.close("all")
    return written


def _pareto_plot(plt, finished: list[dict[str, Any]], labels: list[str], metric: str, path: Path) -> Path:
    points = [(row["sampling_images_per_s"], row[metric]) for row in finished]
    figure, axis = plt.subplots(figsize=(8, 5.5))
    axis.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue")
    for label, (x, y) in zip(labels, points):
        axis.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto_front(points)
    axis.plot([points[i][0] for i in front], [points[i][1] for i in front], color="tab:red", label="Pareto front")
    unit = "x1e3" if metric == "kid" else ""
    axis.set(
        xlabel="sampling throughput (images/s)",
        ylabel=f"{metric.upper()}{unit} (lower is better)",
        title=f"{metric.upper()} vs throughput",
    )
    axis.legend()
    figure.tight_layout()
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    with atomic_file(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")
    return path


def write_report(
    rows: Sequence[dict[str, Any]],
    output_dir: str | Path,
    title: str = "dit-optimum benchmark",
    notes: Sequence[str] = (),
) -> Path:
    """``report.md`` (table, deltas, failures, plots, sample grids) and the plots, in ``output_dir``."""
    output_dir = Path(output_dir)
    plots = write_plots(rows, output_dir / "plots")
    finished = [row for row in rows if _ok(row)]
    failed = [row for row in rows if not _ok(row)]
    parts = [f"# {title}\n"]
    parts.extend(f"{note}\n" for note in notes)
    if finished:
        parts.append(_measurement_line(finished[0]))
    parts.append("## Results\n\n" + markdown_table(rows))
    parts.append(
        "## Change against each variant's baseline\n\nSpeed columns are paired: in every cell the baseline is "
        "timed again, round-robin with the technique, and the change is their ratio (the baseline's own row "
        "measures the noise).\n\n" + markdown_deltas(rows)
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
    path = output_dir / "report.md"
    write_text_atomic(path, "\n".join(parts))
    return path


def _measurement_line(row: dict[str, Any]) -> str:
    speed = row.get("speed_settings", {})
    line = f"Measured on {row.get('device')} ({row.get('hardware')}), each cell in the dtype its technique gives. "
    if row.get("num_samples") is not None:
        quality = row.get("quality_settings", {})
        line += (
            f"Quality: N={row['num_samples']} generated vs N={row.get('reference_samples')} reference images "
            f"({quality.get('reference')}), {row.get('sampler')} {quality.get('num_inference_steps')} steps, "
            f"guidance {quality.get('guidance_scale')}; KID (x1e3) over subsets of {row.get('kid_subset_size')}; "
            "FID/sFID need N above the feature dimension (2048 / 2023) and are n/a below. "
        )
    else:
        line += "Cost only: untrained models (weights do not change these columns), no quality metrics. "
    return line + (
        f"Speed: one transformer forward at batch {speed.get('forward_batch_size')}, full sampling at batch "
        f"{speed.get('batch_size')} ({speed.get('num_inference_steps')} steps, guidance {speed.get('guidance_scale')}"
        f", decode included), latency at batch 1; medians of {speed.get('repeats')} after {speed.get('warmup')} "
        "warm-up; peak memory above the loaded model during one sampling call and one forward.\n"
    )
