"""Architecture benchmark: parameters, GFLOPs and forward time of every attention type, as ratios to SDPA.

Random weights, no training: how the attention types scale with tokens (``dit-optimum architecture``). The full
matrix with trained models, FID/KID and every technique is ``benchmark.runner``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..configs import PAPER_PRESETS, dit_config, parse_preset_name
from ..errors import DiTOptimumError
from ..evaluation.flops import count_parameters, gflops_breakdown
from ..evaluation.inputs import example_inputs
from ..evaluation.speed import interleaved_median_times
from ..models.attention import ATTENTION_TYPES
from ..models.transformer import DiTOptimumTransformer2DModel, check_activation_memory
from ..utils import check_positive_integers


def architecture_benchmark(
    presets: Sequence[str] = PAPER_PRESETS,
    attention_types: Sequence[str] = ATTENTION_TYPES,
    sample_sizes: Sequence[int] = (32,),
    in_channels: int = 4,
    batch_size: int = 4,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per (preset, sample size, attention type): params, GMACs, forward seconds and ratios to ``sdpa``."""
    unknown = [name for name in attention_types if name not in ATTENTION_TYPES]
    if unknown:
        raise DiTOptimumError(f"Unknown `attention_types` {unknown}; allowed values: {', '.join(ATTENTION_TYPES)}.")
    for preset in presets:
        parse_preset_name(preset)
    check_positive_integers(in_channels=in_channels, batch_size=batch_size, repeats=repeats)
    for side in sample_sizes:
        check_positive_integers(sample_sizes=side)
    if not presets or not attention_types or not sample_sizes:
        raise DiTOptimumError("`presets`, `attention_types` and `sample_sizes` must each name at least one entry.")
    for preset in presets:
        for side in sample_sizes:
            config = dit_config(preset, sample_size=side, in_channels=in_channels)
            with torch.device("meta"):  # the model's own validation, without allocating weights
                DiTOptimumTransformer2DModel(**config)
            check_activation_memory(config, batch_size, "batch_size")
    if not isinstance(warmup, int) or warmup < 0:
        raise DiTOptimumError(f"`warmup`={warmup!r} must be an integer >= 0.")
    rows = _architecture_rows(presets, attention_types, sample_sizes, in_channels, batch_size, warmup, repeats, seed)
    return [row for row in rows if row["attention_type"] in attention_types]


def _architecture_rows(
    presets: Sequence[str],
    attention_types: Sequence[str],
    sample_sizes: Sequence[int],
    in_channels: int,
    batch_size: int,
    warmup: int,
    repeats: int,
    seed: int,
) -> list[dict[str, Any]]:
    # The measurement itself, on checked arguments; sdpa always runs first as the ratios' base.
    types = ["sdpa", *[name for name in attention_types if name != "sdpa"]]
    rows = []
    for preset in presets:
        for sample_size in sample_sizes:
            torch.manual_seed(seed)
            models = {
                name: DiTOptimumTransformer2DModel(
                    **dit_config(preset, sample_size=sample_size, in_channels=in_channels, attention_type=name)
                ).eval()
                for name in types
            }
            inputs = example_inputs(models["sdpa"], batch_size)
            seconds = interleaved_median_times(models, inputs, warmup, repeats)
            patch = models["sdpa"].config.patch_size
            base: dict[str, float] = {}
            for name, model in models.items():
                flops = gflops_breakdown(model)
                row = {
                    "preset": preset,
                    "attention_type": name,
                    "sample_size": sample_size,
                    "tokens": (sample_size // patch) ** 2,
                    "params_m": count_parameters(model) / 1e6,
                    "gflops": flops["total"],
                    "attention_core_gflops": flops["attention_core"],
                    "forward_s": seconds[name],
                    "batch_size": batch_size,
                }
                if name == "sdpa":
                    base = row
                row["params_ratio"] = row["params_m"] / base["params_m"]
                row["gflops_ratio"] = row["gflops"] / base["gflops"]
                row["time_ratio"] = row["forward_s"] / base["forward_s"]
                rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as a Markdown table (the same columns the terminal table shows)."""
    header = "| model | attention | tokens | params (M) | GFLOPs | attn-core GFLOPs | forward (s) | time vs sdpa |"
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['preset']} | {row['attention_type']} | {row['tokens']} | {row['params_m']:.2f} "
            f"| {row['gflops']:.3f} "
            f"| {row['attention_core_gflops']:.3f} | {row['forward_s']:.4f} | {row['time_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"
