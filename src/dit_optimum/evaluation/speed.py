"""Wall-clock timing: warm-up, device synchronisation, medians of repeated runs, alternatives timed round-robin."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import DiTOptimumError
from .inputs import example_inputs


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_call_seconds(
    functions: Mapping[str, Callable[[], Any]], device: torch.device | str = "cpu", warmup: int = 1, repeats: int = 3
) -> dict[str, float]:
    """Median seconds of each ``function()``, called round-robin after ``warmup`` untimed rounds, device synchronised.

    Round-robin timing lets machine noise hit every alternative alike, so their ratios stay meaningful on a
    noisy machine. ``no_grad``, not ``inference_mode``: quantized tensor subclasses (quanto int4) cannot run there.
    """
    times = interleaved_call_times(functions, device, warmup, repeats)
    return {name: statistics.median(values) for name, values in times.items()}


def interleaved_call_times(
    functions: Mapping[str, Callable[[], Any]], device: torch.device | str = "cpu", warmup: int = 1, repeats: int = 3
) -> dict[str, list[float]]:
    """Seconds of each ``function()`` in every timed round of ``interleaved_call_seconds`` (round order kept, so the
    times of one round pair up)."""
    if warmup < 0 or repeats < 1:
        raise DiTOptimumError(f"`warmup` must be >= 0 and `repeats` >= 1, got warmup={warmup}, repeats={repeats}.")
    device = torch.device(device)
    times: dict[str, list[float]] = {name: [] for name in functions}
    with torch.no_grad():
        for round_index in range(warmup + repeats):
            for name, function in functions.items():
                _synchronize(device)
                start = time.perf_counter()
                function()
                _synchronize(device)
                if round_index >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


def interleaved_median_times(
    models: Mapping[str, nn.Module], inputs: tuple[torch.Tensor, ...], warmup: int = 1, repeats: int = 3
) -> dict[str, float]:
    """Median seconds of one forward per model on the same ``inputs``, the models timed round-robin."""
    calls = {name: functools.partial(model, *inputs) for name, model in models.items()}
    return interleaved_call_seconds(calls, inputs[0].device, warmup, repeats)


def median_call_seconds(
    function: Callable[[], Any], device: torch.device | str = "cpu", warmup: int = 1, repeats: int = 3
) -> float:
    """Median wall-clock seconds of ``function()`` after ``warmup`` untimed calls, device synchronised."""
    return interleaved_call_seconds({"call": function}, device, warmup, repeats)["call"]


def time_forward(
    model: nn.Module, batch_size: int = 8, sample_size: int | None = None, warmup: int = 2, repeats: int = 5
) -> float:
    """Median seconds of one forward of ``model`` on a random batch (no grad, device synchronised)."""
    inputs = example_inputs(model, batch_size, sample_size)
    return interleaved_median_times({"model": model}, inputs, warmup, repeats)["model"]
