"""Wall-clock timing of transformer forwards: warm-up, device synchronisation, median of repeated runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .inputs import example_inputs


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_median_times(
    models: Mapping[str, nn.Module], inputs: tuple[torch.Tensor, ...], warmup: int = 1, repeats: int = 3
) -> dict[str, float]:
    """Median seconds of one forward per model, timing the models round-robin so machine noise hits them alike."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"`warmup` must be >= 0 and `repeats` >= 1, got warmup={warmup}, repeats={repeats}.")
    device = inputs[0].device
    times: dict[str, list[float]] = {name: [] for name in models}
    # no_grad, not inference_mode: quantized tensor subclasses (quanto int4) cannot run under inference mode.
    with torch.no_grad():
        for round_index in range(warmup + repeats):
            for name, model in models.items():
                _synchronize(device)
                start = time.perf_counter()
                model(*inputs)
                _synchronize(device)
                if round_index >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def time_forward(
    model: nn.Module, batch_size: int = 8, sample_size: int | None = None, warmup: int = 2, repeats: int = 5
) -> float:
    """Median seconds of one forward of ``model`` on a random batch (no grad, device synchronised)."""
    inputs = example_inputs(model, batch_size, sample_size)
    return interleaved_median_times({"model": model}, inputs, warmup, repeats)["model"]


def median_call_seconds(
    function: Callable[[], Any], device: torch.device | str = "cpu", warmup: int = 1, repeats: int = 3
) -> float:
    """Median wall-clock seconds of ``function()`` after ``warmup`` untimed calls, device synchronised."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"`warmup` must be >= 0 and `repeats` >= 1, got warmup={warmup}, repeats={repeats}.")
    device = torch.device(device)
    times = []
    with torch.no_grad():
        for round_index in range(warmup + repeats):
            _synchronize(device)
            start = time.perf_counter()
            function()
            _synchronize(device)
            if round_index >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)
